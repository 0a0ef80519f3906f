"""The search space: student architectures, input sizes, precisions and runtimes; the default one is made from
the data and the teacher, ``--space FILE`` (YAML) changes it. ``candidates`` lists every combination."""

import difflib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from .. import EdgeKDError
from ..core.config import read_yaml

PRECISIONS = ("fp32", "fp16", "int8")
RUNTIMES = {"onnxruntime": "onnx", "openvino": "openvino"}  # runtime -> edgekd export format
KEYS = ("students", "input_sizes", "precisions", "runtimes")
# At or below this input size the CIFAR ResNets (made for 32 px) make sense; above it they only waste compute.
SMALL_INPUT = 64
MAX_CANDIDATES = 2000


@dataclass(frozen=True)
class Candidate:
    """One point of the space: what is exported untrained, timed, and (if it fits the budget) trained."""

    student: str
    size: int
    precision: str
    runtime: str

    @property
    def key(self) -> str:
        return f"{self.student}@{self.size}/{self.precision}/{self.runtime}"

    @property
    def format(self) -> str:
        return RUNTIMES[self.runtime]


@dataclass(frozen=True)
class Space:
    students: Sequence[str]
    input_sizes: Sequence[int]
    precisions: Sequence[str]
    runtimes: Sequence[str]

    def candidates(self) -> List[Candidate]:
        """Every combination of the space."""
        return [Candidate(s, z, p, r) for s in self.students for z in self.input_sizes
                for p in self.precisions for r in self.runtimes]

    def to_dict(self) -> Dict[str, List[Any]]:
        """The space as its YAML keys."""
        return {k: list(getattr(self, k)) for k in KEYS}


def default_space(data_size: int, channels: int, teacher_size: Optional[int] = None) -> Space:
    """Students that make sense for the data: our compact students at three widths, CIFAR ResNets for small
    inputs, torchvision's (and, where timm is installed, timm's) mobile models for inputs of 32 px and more.
    Input sizes: the data's own, and for large images 3/4 and 1/2 of it (never above the teacher's view)."""
    students = ["compact-student-s", "compact-student", "compact-student-l"]
    if data_size <= SMALL_INPUT:
        students += ["resnet8", "resnet14", "resnet20"]
    if data_size >= 32:
        students.append("torchvision:mobilenet_v3_small")
        if _has_timm() and data_size > SMALL_INPUT:
            students.append("timm:mobilenetv3_small_050")
    top = min(data_size, teacher_size) if teacher_size else data_size
    sizes = [top] + ([s for s in (round(top * 0.75 / 8) * 8, top // 2)] if top >= 96 else [])
    return Space(students, sorted(set(sizes), reverse=True), list(PRECISIONS), list(RUNTIMES))


def _has_timm() -> bool:
    import importlib.util

    return importlib.util.find_spec("timm") is not None


def _list(path: str, key: str, value: Any, check: Callable[[Any], Optional[str]]) -> List[Any]:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise EdgeKDError(f"space file {path!r}: {key} must be a list, got {type(value).__name__}")
    out: List[Any] = []
    for item in value:
        problem = check(item)
        if problem:
            raise EdgeKDError(f"space file {path!r}: {key}: {problem}, got {item!r}")
        if item not in out:
            out.append(item)
    return out


def _student_problem(spec: Any) -> Optional[str]:
    from ..core.models import MODELS, TIMM_PREFIX, TORCHVISION_PREFIX  # heavy: torch

    if not isinstance(spec, str):
        return "expected a model spec"
    if spec.startswith((TORCHVISION_PREFIX, TIMM_PREFIX)) or spec in MODELS:
        return None
    close = difflib.get_close_matches(spec, MODELS.names(), n=1)
    return "unknown student" + (f" (did you mean {close[0]!r}?)" if close else "; use a model spec of edgekd distill")


def _size_problem(size: Any) -> Optional[str]:
    ok = isinstance(size, int) and not isinstance(size, bool) and 8 <= size <= 1024
    return None if ok else "expected a whole number of pixels from 8 to 1024"


def _choice(choices: Sequence[str]) -> Callable[[Any], Optional[str]]:
    return lambda v: None if v in choices else f"expected one of {', '.join(choices)}"


def load_space(path: str, default: Space) -> Space:
    """The YAML file's space: its keys replace the default's; unknown keys are named, an empty list refused."""

    if not os.path.isfile(path):
        raise EdgeKDError(f"--space {path!r} does not exist")
    values = read_yaml(path)
    for key in values:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            raise EdgeKDError(f"space file {path!r}: unknown key {key!r}"
                              + (f"; did you mean {close[0]!r}?" if close else f"; it takes {', '.join(KEYS)}"))
    checks = {"students": _student_problem, "input_sizes": _size_problem, "precisions": _choice(PRECISIONS),
              "runtimes": _choice(tuple(RUNTIMES))}
    merged = default.to_dict()
    for key, value in values.items():
        merged[key] = _list(path, key, value, checks[key])
    empty = [k for k in KEYS if not merged[k]]
    if empty:
        raise EdgeKDError(f"space file {path!r}: the search space is empty ({', '.join(empty)} has no entry); "
                          "give at least one of each of " + ", ".join(KEYS))
    space = Space(**merged)
    if len(space.candidates()) > MAX_CANDIDATES:
        raise EdgeKDError(f"space file {path!r}: {len(space.candidates())} candidates; at most {MAX_CANDIDATES}")
    return space
