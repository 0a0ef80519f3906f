"""Checkpoints: the ``Checkpoint`` record in memory; on disk a dict of plain types and tensors (DESIGN.md,
"Artifacts"), written atomically and loaded with weights_only=True. The dict exists only here, at the edge."""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import nn

from .. import EdgeKDError, __version__
from ..base.files import atomic_write, portable, spec_for_file, spec_from_file
from ..base.jsonrec import field_names, record_dict, record_from
from ..bundle.checks import sha256_file as file_sha256  # noqa: F401  (edgekd's one sha256, by the core's name)
from .data import InputSpec
from .models import count_flops, count_params
from .safe_load import Refused, torch_file

CHECKPOINT_FORMAT = "edgekd-checkpoint/1"
REQUIRED_KEYS = ("model", "state_dict", "classes", "input")
MAX_SIDE = 8192  # an input height or width beyond this is a damaged field, not a model


@dataclass(frozen=True)
class QatState:
    """A QAT checkpoint's ``qat`` entry (``edgekd quantize``): NNCF's quantizer configuration as JSON types, the
    FP32 student it started from (relative to the checkpoint's folder) and what it quantized."""

    quantizers: Dict[str, Any]
    source: Optional[str] = None
    source_top1: Optional[float] = None
    layers_int8: List[str] = field(default_factory=list)
    calib_size: Optional[int] = None

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "QatState":
        """The state in a checkpoint's ``qat`` dict (a field it lacks reads as None or empty)."""
        state = record_from(cls, {**dict.fromkeys(field_names(cls)), **d})
        return replace(state, quantizers=state.quantizers or {}, layers_int8=list(state.layers_int8 or []))

    def to_dict(self) -> Dict[str, Any]:
        return {**record_dict(self), "layers_int8": list(self.layers_int8)}


_FIELDS = ("format", "edgekd_version", "model", "state_dict", "classes", "input", "data", "params", "flops",
           "metrics", "config", "qat")


@dataclass(frozen=True)
class Checkpoint(Mapping[str, Any]):
    """A checkpoint: the model spec and weights, class names, the input spec, and what made it.

    Read its attributes. It also reads as the dict it is on disk (a read-only Mapping of the file's keys), since
    DESIGN.md defines a checkpoint as that dict."""

    model: str                                  # the model spec build_model takes
    state_dict: Dict[str, torch.Tensor]
    classes: List[str]
    input: InputSpec
    data: Optional[str] = None                  # the data spec, an image folder relative to the checkpoint's folder
    params: Optional[int] = None
    flops: Optional[int] = None
    metrics: Dict[str, Any] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    qat: Optional[QatState] = None
    format: Optional[str] = CHECKPOINT_FORMAT
    edgekd_version: Optional[str] = __version__
    extra: Dict[str, Any] = field(default_factory=dict)   # keys of a newer edgekd, kept as they are

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Checkpoint":
        """The record of a checked checkpoint dict (``checkpoint_problem`` found nothing); a field an older edgekd
        did not write reads as None (or empty)."""
        values: List[Any] = [d.get(k) for k in _FIELDS]
        fmt, version, model, state, classes, spec, data, params, flops, metrics, config, qat = values
        return cls(model=model, state_dict=state, classes=[str(c) for c in classes], input=InputSpec.from_dict(spec),
                   data=data, params=params, flops=flops, metrics=dict(metrics or {}), config=dict(config or {}),
                   qat=QatState.from_dict(qat) if isinstance(qat, dict) else None, format=fmt,
                   edgekd_version=version, extra={k: v for k, v in d.items() if k not in _FIELDS})

    def to_dict(self) -> Dict[str, Any]:
        """The dict torch.save writes: plain types and tensors only (``qat`` only on a QAT checkpoint)."""
        values = (self.format, self.edgekd_version, self.model, self.state_dict, list(self.classes),
                  self.input.to_dict(), self.data, self.params, self.flops, self.metrics, self.config,
                  None if self.qat is None else self.qat.to_dict())
        d = {k: v for k, v in zip(_FIELDS, values) if not (k == "qat" and v is None)}
        return {**d, **self.extra}

    def data_spec(self, path: str) -> Optional[str]:
        """The data spec, an image folder resolved against the folder of the checkpoint file ``path``."""
        return spec_from_file(self.data, os.path.dirname(os.path.abspath(path)))

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def save_checkpoint(path: str, model: nn.Module, *, spec: str, classes: List[str], input_spec: InputSpec,
                    data_spec: Optional[str], metrics: Dict[str, Any], config: Dict[str, Any],
                    qat: Optional[QatState] = None, params: Optional[int] = None,
                    flops: Optional[int] = None) -> Checkpoint:
    """Write a checkpoint that needs nothing but torch to read back; ``params``/``flops`` override the counts of
    ``model`` (a QAT model keeps its FP32 student's)."""
    folder = os.path.dirname(os.path.abspath(path))  # the checkpoint records paths relative to its own folder
    ckpt = Checkpoint(
        model=spec, state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}, classes=list(classes),
        input=replace(input_spec), data=spec_for_file(data_spec, folder),
        params=count_params(model) if params is None else params,
        flops=count_flops(model, input_spec) if flops is None else flops,
        metrics=portable(metrics, folder), config=config, qat=qat)
    write_checkpoint(path, ckpt)
    return ckpt


def write_checkpoint(path: str, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically, as the dict of DESIGN.md."""
    atomic_write(path, lambda tmp: torch.save(ckpt.to_dict(), tmp))


def read_checkpoint(path: str) -> Checkpoint:
    """The checked checkpoint at ``path`` (EdgeKDError in one line when it is not one)."""
    return Checkpoint.from_dict(load_checkpoint(path))


def load_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint file's dict, read without running any pickled code; anything that is not ours is refused."""
    if not os.path.isfile(path):
        raise EdgeKDError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch_file(path, "checkpoint")
    except Refused as e:
        raise EdgeKDError(f"{path!r} is not a usable edgekd checkpoint: {e.reason}") from e.__cause__
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        found = f"a {type(ckpt).__name__}" if not isinstance(ckpt, dict) else \
            "no " + ", ".join(k for k in REQUIRED_KEYS if k not in ckpt)
        raise EdgeKDError(f"{path!r} is not an edgekd checkpoint (expected a dict with {', '.join(REQUIRED_KEYS)}; "
                          f"found {found})")
    problem = checkpoint_problem(ckpt)
    if problem:
        raise EdgeKDError(f"{path!r} is a damaged edgekd checkpoint: {problem}")
    return ckpt


def _numbers(value: Any, length: int) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == length
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == v for v in value))


def checkpoint_problem(ckpt: Dict[str, Any]) -> Optional[str]:
    """The first field of a checkpoint dict with the wrong type, as 'field X: what is wrong', else None."""
    model, state, classes, spec = (ckpt[k] for k in REQUIRED_KEYS)
    if not isinstance(model, str) or not model:
        return "field 'model' must be a model spec (a string)"
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        return "field 'state_dict' must map parameter names to tensors"
    if not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) for c in classes):
        return "field 'classes' must be a non-empty list of class names"
    return _input_problem(spec)


def _input_problem(spec: Any) -> Optional[str]:
    if not isinstance(spec, dict):
        return "field 'input' must be a dict with channels, height, width, mean and std"
    for key in ("channels", "height", "width"):
        value = spec.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_SIDE:
            return f"field 'input.{key}' must be a whole number from 1 to {MAX_SIDE}, got {value!r}"
    values: List[Any] = [spec.get(k) for k in ("channels", "mean", "std")]
    channels, mean, std = values
    if channels not in (1, 3):
        return f"field 'input.channels' must be 1 or 3, got {channels!r}"
    if not _numbers(mean, channels):
        return f"field 'input.mean' must hold {channels} numbers"
    if not _numbers(std, channels) or min(std) <= 0:
        return f"field 'input.std' must hold {channels} positive numbers"
    return None
