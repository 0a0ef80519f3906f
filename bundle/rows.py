"""Typed records of a benchmark (part of the device runner, so standard library only and Python 3.8 syntax): the
rows of results.json (``BenchRow``), what the device runner answers for one bundle (``DeviceRow``), the timing,
accuracy, load and profile figures inside them, and the environments they were measured in.

Every record turns into JSON with ``to_json`` (keys in field order; a field named in ``OPTIONAL`` is left out
while it is None, as the rows always left such keys out) and back with ``from_json``, which reads the fields by
their names and parses nested records; JSON is read and written only there.
"""

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional, Type, TypeVar

RecordT = TypeVar("RecordT", bound="Record")
NAN = float("nan")
JSON = Dict[str, Any]


class RecordError(ValueError):
    """JSON that is not the record it should be (a damaged or foreign file)."""


class Record:
    """A dataclass that is written as, and read from, one JSON object."""

    OPTIONAL = frozenset()  # type: FrozenSet[str]
    # A field left out while None unless the field it names here is set (a row's profile: null beside its note).
    KEPT_BY = {}  # type: Dict[str, str]

    def to_json(self) -> JSON:
        """The JSON object of this record (plain types only)."""
        out = {}  # type: JSON
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            keeper = self.KEPT_BY.get(f.name)
            if value is None and f.name in self.OPTIONAL and (keeper is None or getattr(self, keeper) is None):
                continue
            out[f.name] = plain(value)
        out.update(plain(getattr(self, "extra", None) or {}))
        return out

    @classmethod
    def from_json(cls: Type[RecordT], data: Any) -> RecordT:
        """The record of a JSON object: its fields by name (nested records parsed), other keys kept in ``extra``
        when the record has one and dropped otherwise (a newer edgekd's additions)."""
        if not isinstance(data, dict):
            raise RecordError("%s: expected a JSON object, got %s" % (cls.__name__, type(data).__name__))
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        values = {k: _parse(hints[k], v, k) for k, v in data.items() if k in names and k != "extra"}
        if "extra" in names:
            values.update(extra={k: v for k, v in data.items() if k not in names})
        try:
            return cls(**values)
        except TypeError as e:  # a required field is missing
            raise RecordError("%s: %s" % (cls.__name__, e))


def plain(value: Any) -> Any:
    """``value`` with every record in it turned into its JSON object."""
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def _is_record(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Record)


def _parse(tp: Any, value: Any, name: str) -> Any:
    """A JSON value as the field's type wants it: records (also in lists and dict values) parsed, others as they are."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is None:  # a record, list or mapping field that JSON leaves null: that, with nothing recorded
        return tp.from_json({}) if _is_record(tp) else origin() if origin in (list, dict) else None
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        return _parse(inner[0], value, name) if len(inner) == 1 else value
    if _is_record(tp):
        return tp.from_json(value)
    if origin is list and args and _is_record(args[0]):
        if not isinstance(value, list):
            raise RecordError("%r must be a list, got %s" % (name, type(value).__name__))
        return [args[0].from_json(v) for v in value]
    if origin is dict and len(args) == 2 and _is_record(args[1]):
        if not isinstance(value, dict):
            raise RecordError("%r must be a JSON object, got %s" % (name, type(value).__name__))
        return {k: args[1].from_json(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------- figures

@dataclass
class Latency(Record):
    """Per-call latency of one row in ms (edgekd.bench.stats computes it from the raw timings)."""

    p50: float
    p90: float = NAN  # NaN: not recorded (a partial row from elsewhere); edgekd's own rows have every figure
    p99: float = NAN
    mean: float = NAN
    std: float = NAN
    min: float = NAN
    max: float = NAN
    runs: int = 0


@dataclass
class Accuracy(Record):
    """Top-1 and top-5 over every test image, each image's predicted class, and how many gave NaN or infinity."""

    top1: Optional[float] = None
    top5: Optional[float] = None
    predictions: Optional[List[int]] = None
    nonfinite: Optional[int] = None
    OPTIONAL = frozenset({"nonfinite"})


@dataclass
class Load(Record):
    """What loading a model cost and what the runtime settled on (a bench worker's or the device runner's)."""

    first_inference_ms: Optional[float] = None
    load_mb: Optional[float] = None
    threads: Optional[int] = None
    affinity: Optional[List[int]] = None
    runtime_device: Optional[str] = None
    runtime_precision: Optional[str] = None
    gpu: Optional[str] = None
    OPTIONAL = frozenset({"first_inference_ms", "load_mb", "threads", "affinity", "runtime_device",
                          "runtime_precision", "gpu"})


@dataclass
class VisitLog(Record):
    """One timed visit of a row as results.json keeps it: its median, the machine checks around it, whether it counts."""

    p50_ms: float
    check_ms: Optional[List[float]] = None
    kept: bool = True


@dataclass
class OpTime(Record):
    """One operator type's time in a profile (ms per call), by the precision it ran in."""

    op_type: str
    ms: float = 0.0
    calls: int = 0
    precision: Dict[str, float] = field(default_factory=dict)
    share: float = 0.0


@dataclass
class LayerTime(Record):
    """One layer's time in a profile (ms per call); OpenVINO names the kernel it ran (``exec_type``)."""

    name: str
    op_type: str
    precision: str
    ms: float = 0.0
    share: float = 0.0
    exec_type: Optional[str] = None
    OPTIONAL = frozenset({"exec_type"})


@dataclass
class Profile(Record):
    """Where a row's time goes: per-operator times from the runtime's profiler (edgekd.bench.profile)."""

    runtime: str
    total_ms: float
    runs: int
    precision_share: Dict[str, float]
    by_type: List[OpTime]
    by_layer: List[LayerTime]


# ---------------------------------------------------------------------------------------------- rows

@dataclass
class BenchRow(Record):
    """One row of results.json: a model in one backend, on one device, at one batch size (DESIGN.md's ROW)."""

    model: str = ""
    backend: str = ""
    precision: str = "fp32"
    device: str = "cpu"
    arch: Optional[str] = None
    params: Optional[int] = None
    flops: Optional[int] = None
    size_mb: Optional[float] = None
    path: Optional[str] = None
    batch_size: int = 1
    images: Optional[int] = None
    top1: Optional[float] = None
    top5: Optional[float] = None
    emulated: Optional[str] = None        # "qemu": timed on an emulated device (numerics only, never latency)
    first_inference_ms: Optional[float] = None
    load_mb: Optional[float] = None
    threads: Optional[int] = None
    affinity: Optional[List[int]] = None
    runtime_device: Optional[str] = None
    runtime_precision: Optional[str] = None
    gpu: Optional[str] = None
    peak_rss_mb: Optional[float] = None
    gpu_peak_mb: Optional[float] = None
    latency_ms: Optional[Latency] = None
    throughput_ips: Optional[float] = None
    round_p50_ms: Optional[List[float]] = None
    status: str = "ok"                    # "ok", or why the row has no timings
    visits: Optional[List[VisitLog]] = None
    speedup_vs_teacher: Optional[float] = None
    top1_delta_vs_teacher: Optional[float] = None
    agreement_vs_teacher: Optional[float] = None
    profile: Optional[Profile] = None
    profile_note: Optional[str] = None    # why a profiled run has no profile for this row
    best: bool = False                    # the fastest row within --max-drop of the reference's top-1
    OPTIONAL = frozenset({"emulated", "peak_rss_mb", "gpu_peak_mb", "round_p50_ms", "visits", "profile",
                          "profile_note"}) | Load.OPTIONAL
    KEPT_BY = {"profile": "profile_note"}

    @property
    def ok(self) -> bool:
        """Timed (status ok)."""
        return self.status == "ok"

    @property
    def p50(self) -> float:
        """The median latency of a timed row (NaN for one without timings, which compares false to everything)."""
        return self.latency_ms.p50 if self.latency_ms is not None else float("nan")

    @property
    def p90(self) -> Optional[float]:
        return self.latency_ms.p90 if self.latency_ms is not None else None

    @property
    def p99(self) -> Optional[float]:
        return self.latency_ms.p99 if self.latency_ms is not None else None


@dataclass
class DeviceRow(Record):
    """The device runner's answer for one bundle: raw per-call times by batch size (the statistics are computed
    where edgekd runs), accuracy and load; or only ``status``, why it failed."""

    status: Optional[str] = None
    times: Optional[Dict[str, List[float]]] = None
    batch_status: Optional[Dict[str, str]] = None
    accuracy: Optional[Accuracy] = None
    load: Optional[Load] = None
    bundle: str = ""
    OPTIONAL = frozenset({"times", "batch_status", "accuracy", "load"})


# ---------------------------------------------------------------------------------------------- environments

@dataclass
class MachineEnvironment(Record):
    """A machine as the bundle layer's ``environment()`` describes it (the device runner reports the same)."""

    cpu: Optional[str] = None
    cores: Optional[int] = None
    machine: Optional[str] = None
    platform: Optional[str] = None
    python: Optional[str] = None
    versions: Dict[str, Optional[str]] = field(default_factory=dict)
    cpu_flags: Optional[List[str]] = None
    emulated: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    OPTIONAL = frozenset({"cpu", "cores", "machine", "platform", "python", "cpu_flags", "emulated"})


@dataclass
class BenchEnvironment(MachineEnvironment):
    """results.json's ``environment``: the machine, the benchmark's CPU settings, the software and the command."""

    usable_cpus: Optional[List[int]] = None
    threads_requested: Optional[int] = None
    cpus_pinned: Optional[List[int]] = None
    edgekd: Optional[str] = None
    git_commit: Optional[str] = None
    command: Optional[str] = None
    started_utc: Optional[str] = None
    loadavg_start: Optional[List[float]] = None
    loadavg_end: Optional[List[float]] = None


@dataclass
class DeviceBench(Record):
    """What ``device_runner.py bench JOB.json`` prints: the device's environment and one row per bundle."""

    environment: MachineEnvironment
    rows: List[DeviceRow]


# ---------------------------------------------------------------------------------------------- results.json

@dataclass
class BenchSettings(Record):
    """How a benchmark was measured, as results.json records it (and as the measuring steps read it)."""

    batch_sizes: List[int] = field(default_factory=lambda: [1])
    warmup: int = 0
    runs: int = 1
    rounds: int = 1
    max_time_s: float = 0.0
    min_time_s: float = 0.0
    remeasure_slow: float = 0.0
    check_s: float = 0.0
    max_extra_rounds: int = 0
    threads: Optional[int] = None
    cpus: Optional[List[int]] = None
    limit: Optional[int] = None
    max_drop: float = 0.01
    devices: List[str] = field(default_factory=lambda: ["cpu"])
    backends: Optional[List[str]] = None
    profile: bool = False


@dataclass
class BenchResult(Record):
    """results.json: the environment, the data, the settings, one row per model, backend, device and batch size, and
    the environments of SSH devices."""

    rows: List[BenchRow]
    environment: BenchEnvironment = field(default_factory=BenchEnvironment)
    data: Optional[str] = None
    settings: BenchSettings = field(default_factory=BenchSettings)
    device_environments: Optional[Dict[str, MachineEnvironment]] = None
    OPTIONAL = frozenset({"device_environments"})
    ORDER = ("environment", "data", "settings", "rows", "device_environments")

    def to_json(self) -> JSON:
        """results.json's object, its keys in the order results.json has always had them."""
        out = Record.to_json(self)
        return {k: out[k] for k in self.ORDER if k in out}
