"""The CLI's --teacher-* flags as one object, validated here so a config file or Python caller is checked too."""

import math
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from ... import EdgeKDError
from ..config import MAX_INPUT_SIDE

COLORS = ("RGB", "BGR", "L")
OUTPUTS = ("logits", "probs")


@dataclass
class TeacherOptions:
    """How to read a teacher that does not describe itself; ``None``: from the teacher, else a default."""

    input_size: Optional[Tuple[int, int]] = None   # (height, width) the teacher takes
    mean: Optional[List[float]] = None  # per-channel mean of the teacher's normalisation, [0, 1] pixel units
    std: Optional[List[float]] = None
    color: Optional[str] = None    # RGB, BGR or L (L: one grey channel)
    outputs: Optional[str] = None  # logits or probs
    classes: Optional[str] = None  # a --teacher-classes file
    weights: Optional[str] = None  # a local state dict / safetensors file for torchvision:, timm:, MODULE:FUNCTION
    views: Optional[int] = None    # --teacher-views K: K fixed augmented views per image, replayed across epochs
    threads: Optional[int] = None  # ONNX Runtime / OpenVINO threads (default: torch's)

    @classmethod
    def from_options(cls, cfg: Any) -> "TeacherOptions":
        """From a command's options (edgekd.core.config: distill's --teacher-* options)."""
        o = cls(input_size=_size(cfg.teacher_input_size), mean=_floats(cfg.teacher_mean, "--teacher-mean"),
                std=_floats(cfg.teacher_std, "--teacher-std"), color=cfg.teacher_color,
                outputs=cfg.teacher_outputs, classes=cfg.teacher_classes,
                weights=cfg.teacher_weights,
                views=_positive(cfg.teacher_views, "--teacher-views"),
                threads=_positive(cfg.teacher_threads, "--teacher-threads"))
        if o.color is not None and o.color.upper() not in COLORS:
            raise EdgeKDError(f"--teacher-color {o.color!r}: choose from {', '.join(COLORS)}")
        o.color = o.color.upper() if o.color else None
        if o.outputs is not None and o.outputs not in OUTPUTS:
            raise EdgeKDError(f"--teacher-outputs {o.outputs!r}: choose from {', '.join(OUTPUTS)}")
        if o.std is not None and min(o.std) <= 0:
            raise EdgeKDError(f"--teacher-std {o.std}: every std must be positive")
        for flag, path in (("--teacher-classes", o.classes), ("--teacher-weights", o.weights)):
            if path is not None and not os.path.isfile(path):
                raise EdgeKDError(f"{flag} {path!r} does not exist")
        return o


def _floats(value: Any, flag: str) -> Optional[List[float]]:
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).replace("/", ",").split(",")
    try:
        out = [float(v) for v in items if str(v).strip()]
    except ValueError:
        raise EdgeKDError(f"{flag} {value!r}: give one number or one per channel, e.g. 0.485,0.456,0.406") from None
    if not out or len(out) > 3 or not all(math.isfinite(v) for v in out):
        raise EdgeKDError(f"{flag} {value!r}: give one number or one per channel, e.g. 0.485,0.456,0.406")
    return out


def _size(value: Any) -> Optional[Tuple[int, int]]:
    """--teacher-input-size as (height, width), each from 1 to MAX_INPUT_SIDE."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        sizes = [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        sizes = []
    if not 1 <= len(sizes) <= 2 or min(sizes) < 1 or max(sizes) > MAX_INPUT_SIDE:
        raise EdgeKDError(f"--teacher-input-size {value!r}: give SIZE or HEIGHT,WIDTH in pixels from 1 to "
                          f"{MAX_INPUT_SIDE}, e.g. 224")
    return (sizes[0], sizes[-1])


def _positive(value: Any, flag: str) -> Optional[int]:
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise EdgeKDError(f"{flag} {value!r}: expected a positive whole number")
    return number
