"""The messages between ``edgekd bench`` and its worker processes (bench/worker.py), one JSON line each way: a
request names its ``op`` and carries that op's record; an answer is the op's answer record, or ``{"error": ...}``.
The JSON is read into these records where it arrives and written from them where it leaves."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..bundle.rows import JSON, Record


@dataclass
class LoadRequest(Record):
    """Load the model at ``path`` into ``backend`` on ``device``, with the preprocessed test images (.npy files)."""

    backend: str
    path: str
    device: str
    images: str
    labels: str
    threads: Optional[int] = None


@dataclass
class AccuracyRequest(Record):
    """Top-1 and top-5 over every image, in batches of ``batch_size``."""

    batch_size: int = 64


@dataclass
class TimeRequest(Record):
    """One timed visit: warm-up calls, then timed calls (see Worker.time)."""

    batch_size: int
    runs: int
    warmup: int = 0
    min_s: Optional[float] = None
    max_s: Optional[float] = None
    check_s: Optional[float] = None


@dataclass
class ProfileRequest(Record):
    """Per-operator times at ``batch_size`` over ``runs`` profiled calls."""

    batch_size: int
    runs: int


@dataclass
class CloseRequest(Record):
    """The final figures; the worker then exits."""


@dataclass
class TimeAnswer(Record):
    """The per-call times (ms) of a visit and, when asked, the machine checks just before and after it."""

    times_ms: List[float]
    check_ms: Optional[List[float]] = None
    OPTIONAL = frozenset({"check_ms"})


@dataclass
class CloseAnswer(Record):
    """Peak memory of the worker (and of the GPU on CUDA)."""

    peak_rss_mb: Optional[float] = None
    gpu_peak_mb: Optional[float] = None
    OPTIONAL = frozenset({"gpu_peak_mb"})


@dataclass
class ErrorAnswer(Record):
    """Why a request failed."""

    error: str


@dataclass
class Envelope(Record):
    """What every request line carries: its op (the Worker method that answers it), beside the op's own fields."""

    op: str
    extra: Dict[str, Any] = field(default_factory=dict)


def error_of(answer: JSON) -> Optional[str]:
    """The reason in an error answer (``{"error": ...}``), or None for any other answer."""
    if set(answer) == {"error"}:
        return ErrorAnswer.from_json(answer).error
    return None
