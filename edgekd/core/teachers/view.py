"""The teacher seen through the student's data: the student's normalised view in, logits in the data's
class order out (back to [0, 1] pixels, grey <-> RGB, RGB -> BGR, an antialiased resize, the teacher's own
mean/std; outputs permuted or sliced to the data's classes)."""

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ... import EdgeKDError
from ..data import InputSpec
from .classes import ClassMatch

# Probabilities of exactly 0 would give -inf logits: clamp before the log (KD losses see log-probs).
PROB_FLOOR = 1e-12


@dataclass
class Loaded:
    """A teacher as its source found it, before the view and the classes are settled."""

    kind: str
    run: Optional[Callable[[torch.Tensor], Any]]  # teacher-view float tensor -> outputs (no module: a runtime)
    module: Optional[nn.Module] = None  # the PyTorch model when there is one (moved to the device)
    hookable: bool = False       # feature hooks work (fitnet)
    channels: Optional[int] = None
    size: Optional[Tuple[int, int]] = None  # (height, width)
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    color: Optional[str] = None
    names: Optional[List[str]] = None  # class names in output order, when the teacher carries them
    names_from: Optional[str] = None
    outputs: Optional[str] = None
    file: Optional[str] = None
    sha256: Optional[str] = None
    metrics: Dict[str, Any] = field(default_factory=dict)
    runtime: Optional[Dict[str, Any]] = None
    found: Dict[str, str] = field(default_factory=dict)   # where each input setting came from
    keep: object = None          # e.g. an unpacked bundle whose folder must live as long as the teacher

    def settle(self, where: str, **settings: Any) -> None:
        """Set input settings (channels, size, mean, std, color, outputs) and record where each came from."""
        for name, value in settings.items():
            setattr(self, name, value)
            self.found[name] = where


class Teacher(nn.Module):
    """A frozen teacher seen through the student's data: view in, logits in the data's class order out."""

    s_mean: torch.Tensor  # buffers: the student's and the teacher's normalisation, (1, C, 1, 1)
    s_std: torch.Tensor
    t_mean: torch.Tensor
    t_std: torch.Tensor

    def __init__(self, loaded: Loaded, student_input: InputSpec, index: Optional[List[int]] = None,
                 classes_record: Optional[ClassMatch] = None, spec: Optional[str] = None) -> None:
        super().__init__()
        self.kind, self.spec, self.loaded = loaded.kind, spec, loaded
        self.model = loaded.module.eval().requires_grad_(False) if loaded.module is not None else None
        self.run = loaded.run if loaded.module is None else None
        self.is_module = loaded.hookable
        self.sha256, self.metrics = loaded.sha256, dict(loaded.metrics)
        self.input = t = _input_spec(loaded, spec)
        self.color, self.outputs = loaded.color, loaded.outputs or "logits"
        s = student_input
        self.student = (s.channels, s.height, s.width)
        self.resize = (s.height, s.width) != (t.height, t.width)
        self.recolor = s.channels != t.channels or self.color == "BGR"
        self.renorm = (list(s.mean), list(s.std)) != (list(t.mean), list(t.std))
        shape = (1, -1, 1, 1)
        self.register_buffer("s_mean", torch.tensor(s.mean, dtype=torch.float32).view(shape))
        self.register_buffer("s_std", torch.tensor(s.std, dtype=torch.float32).view(shape))
        self.register_buffer("t_mean", torch.tensor(t.mean, dtype=torch.float32).view(shape))
        self.register_buffer("t_std", torch.tensor(t.std, dtype=torch.float32).view(shape))
        self.index = None if index is None else torch.as_tensor(index, dtype=torch.long)
        self.classes_record = classes_record
        self.seconds = 0.0  # the teacher's own forward time since the last take_seconds()
        self.probs_checked = False

    def train(self, mode: bool = True) -> "Teacher":  # the teacher never leaves eval mode
        return super().train(False)

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """The student's normalised batch as the teacher expects it (resized unless it already comes at the
        teacher's size: edgekd.core.stream decodes the teacher's own view of each crop)."""
        size = (self.input.height, self.input.width)
        resize = tuple(x.shape[-2:]) != size
        if not (resize or self.recolor):
            return (x * self.s_std + self.s_mean - self.t_mean) / self.t_std if self.renorm else x
        pixels = x * self.s_std + self.s_mean
        channels = self.input.channels
        if pixels.shape[1] == 1 and channels == 3:
            pixels = pixels.expand(-1, 3, -1, -1)
        elif pixels.shape[1] == 3 and channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
            pixels = (pixels * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if self.color == "BGR":
            pixels = pixels.flip(1)
        if resize:
            pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (pixels - self.t_mean) / self.t_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        with torch.inference_mode():  # cheaper than no_grad: no version counters, no autograd metadata
            runner = self.model if self.model is not None else self.run
            if runner is None:
                raise RuntimeError("a teacher has a module or a runtime")  # every source gives one: our bug
            out = runner(self.view(x))
            out = as_logits(out)
            if self.outputs == "probs":  # log-probabilities are logits up to a constant per image
                if not self.probs_checked:  # the first real batch: the blank probe may not show logits for what they are
                    check_probs(out, self.spec)
                    self.probs_checked = True
                out = out.float().clamp_min(PROB_FLOOR).log()
            if self.index is not None:
                out = out[:, self.index.to(out.device)]
        out = out.float().to(x.device).clone()  # a normal tensor again, so the loss may save it for backward
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        self.seconds += time.perf_counter() - start
        return out

    def take_seconds(self) -> float:
        """The teacher's forward seconds since the last call (the training loop asks once per epoch)."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def cache_key(self) -> Dict[str, Any]:
        """What besides the file decides the teacher's answer: its view of the data and the class mapping."""
        return {"input": self._input_record(), "outputs": self.outputs,
                "index": None if self.classes_record is None else self.classes_record.index}

    def describe(self) -> Dict[str, Any]:
        """The resolved teacher: kind, file, sha256, input view, outputs, class mapping (config.yaml, metrics.json)."""
        lo, t = self.loaded, self.input
        return {"kind": self.kind, "spec": self.spec, "file": lo.file, "sha256": self.sha256,
                "input": self._input_record(),
                "view": {"from": list(self.student), "resize": self.resize, "interpolation": "bilinear, antialias",
                         "channels": f"{self.student[0]} -> {t.channels}"},
                "outputs": self.outputs,
                "classes": {} if self.classes_record is None else self.classes_record.to_json(),
                "black_box": lo.module is None, "runtime": lo.runtime}

    def _input_record(self) -> Dict[str, Any]:
        """The teacher's input view and where each setting came from."""
        lo, t = self.loaded, self.input
        return {"channels": t.channels, "size": [t.height, t.width], "color": lo.color, "mean": list(t.mean),
                "std": list(t.std), "from": dict(lo.found)}


class FrozenTeacher(Teacher):
    """A PyTorch teacher of the data's own size in eval mode with no gradients, re-normalising inputs made for
    the student when the two were trained with different mean/std (the pre-registry form, kept for callers)."""

    def __init__(self, model: nn.Module, teacher_input: InputSpec, student_input: InputSpec) -> None:
        loaded = Loaded("module", None, module=model, hookable=True, channels=teacher_input.channels,
                        size=(teacher_input.height, teacher_input.width), mean=list(teacher_input.mean),
                        std=list(teacher_input.std), color=teacher_input.color)
        super().__init__(loaded, student_input)


def _input_spec(loaded: Loaded, spec: Optional[str]) -> InputSpec:
    """The teacher's input, as load_teacher settled it (from the teacher, the options or the data)."""
    channels, size, mean, std = loaded.channels, loaded.size, loaded.mean, loaded.std
    if channels is None or size is None or mean is None or std is None:  # load_teacher settles all four: our bug
        raise RuntimeError(f"teacher {spec!r}: its input is not settled")
    return InputSpec(channels, size[0], size[1], list(mean), list(std))


PROBS_TOLERANCE = 1e-3  # float16/int8 teachers' softmax rows sum to 1 within about this


def check_probs(out: torch.Tensor, spec: Optional[str]) -> None:
    """EdgeKDError unless ``out`` (N, K) looks like probabilities, as --teacher-outputs probs (or the teacher's
    metadata) claims: every value in [0, 1] and every row summing to 1. Logits taken for probabilities are
    clamped and logged into nonsense (a KD loss hundreds of times too large), silently."""
    out = out.detach().double()
    if not out.numel():
        return
    low, high = out.min().item(), out.max().item()
    sums = out.sum(1)
    far = (sums - 1).abs().max().item()
    if math.isfinite(low) and math.isfinite(high) and low >= -PROBS_TOLERANCE and high <= 1 + PROBS_TOLERANCE \
            and far <= PROBS_TOLERANCE * max(1, out.shape[1] ** 0.5):
        return
    raise EdgeKDError(f"teacher {spec!r} is said to return probabilities (--teacher-outputs probs or its metadata), "
                      f"but its outputs look like logits: values from {low:.4g} to {high:.4g}, rows summing to "
                      f"{sums.min().item():.4g}..{sums.max().item():.4g} (probabilities lie in [0, 1] and sum to 1); "
                      "pass --teacher-outputs logits")


def as_logits(out: Any) -> torch.Tensor:
    """A model's output as an (N, K) tensor: the first of several outputs, trailing 1x1 dims dropped."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif isinstance(out, dict):
        out = out.get("logits", next(iter(out.values())))
    if out.dim() == 4 and out.shape[2:] == (1, 1):
        out = out.flatten(1)
    return out
