"""``edgekd bench``, planning: what each MODEL is (``Model``), which (model, backend, device) jobs make
sense (``Job``, ``plan_jobs``), and the checks made before any worker starts (devices, CPUs, memory)."""

import logging
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Set, Union

from ..base.errors import EdgeKDError
from ..base.files import spec_from_file
from ..bundle.manifest import read_manifest
from ..bundle.rows import Accuracy, Load, Profile, VisitLog
from ..bundle.runtime import verify_bundle
from ..core.data import InputSpec
from .backends import BACKENDS, backend_info, unsupported
from .protocol import CloseAnswer

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Model:
    """What a MODEL argument is: a checkpoint or a bundle folder, with what the rows report of it."""

    model: str                     # its name in the rows (the file or folder name)
    path: str = ""
    kind: str = "checkpoint"       # checkpoint | onnx | openvino
    precision: str = "fp32"
    arch: Optional[str] = None     # the model spec it was built from
    params: Optional[int] = None
    flops: Optional[int] = None
    size_mb: Optional[float] = None
    input: InputSpec = field(default_factory=lambda: InputSpec(1, 1, 1))
    classes: List[str] = field(default_factory=list)
    data: Optional[str] = None     # the data spec it was trained on
    static_batch: Optional[int] = None  # a bundle with a static batch (export --target arm64, OpenVINO) runs only that


@dataclass
class Visit:
    """One timed visit of a job at one batch size: its per-call times, its median, the machine checks around it."""

    times_ms: List[float]
    p50_ms: float
    check_ms: Optional[List[float]] = None


@dataclass(kw_only=True)
class Job(Model):
    """One (model, backend, device) of a benchmark: planned (``status`` says why it cannot run), prepared
    (its test images, the folder it runs from), then measured in its worker process."""

    backend: str = ""
    device: str = "cpu"
    status: Optional[str] = None
    # prepared (measure._prepare)
    images: Optional[str] = None   # .npy of the preprocessed test images, shared by jobs of one input spec
    labels: Optional[str] = None
    images_n: Optional[int] = None
    run_path: Optional[str] = None  # the checkpoint or bundle the worker loads (an ONNX export for a checkpoint)
    # measured (measure._measure, measure._measure_remote)
    load: Optional[Load] = None          # the worker's load answer: first inference, threads, ...
    accuracy: Optional[Accuracy] = None  # top1, top5, predictions
    close: Optional[CloseAnswer] = None  # peak memory
    visits: Dict[int, List[Visit]] = field(default_factory=dict)  # batch size -> timed visits
    batch_status: Dict[int, str] = field(default_factory=dict)            # batch size -> why it failed
    times: Dict[int, List[float]] = field(default_factory=dict)           # batch size -> kept per-call ms
    round_p50: Dict[int, List[float]] = field(default_factory=dict)
    visit_log: Dict[int, List[VisitLog]] = field(default_factory=dict)
    profile: Optional[Dict[int, Union[Profile, str]]] = None  # batch size -> its profile, or why there is none
    emulated: Optional[str] = None  # "qemu": the device runner found itself emulated (timings are not latency)

    @classmethod
    def of(cls, described: Model, **values: Any) -> "Job":
        """A job for ``described``; ``values`` set the job's own fields (and may rename the model)."""
        return cls(**{**{f.name: getattr(described, f.name) for f in fields(Model)}, **values})


NATIVE_BACKEND = {"checkpoint": "torch", "onnx": "onnxruntime", "openvino": "openvino"}
DEVICE_FORMS = ("cpu, cuda, cuda:N, openvino:CPU, openvino:GPU, openvino:NPU, openvino:AUTO, "
                "ssh://[user@]host[:port][/python]")


def check_device(device: str) -> str:
    """Refuse a device name that is not a form bench knows (an unavailable one becomes a row instead)."""
    if device.startswith("ssh://"):
        return device
    if device in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", device) or re.fullmatch(r"openvino:[A-Z]+[.\w]*", device):
        return device
    raise EdgeKDError(f"unknown device {device!r}: choose from {DEVICE_FORMS}")


def describe(path: str) -> Model:
    """What a MODEL argument is: a checkpoint (.pt) or a bundle folder, with its size, params and FLOPs."""
    from ..core.checkpoint import read_checkpoint

    name = os.path.basename(os.path.normpath(path))
    if os.path.isdir(path):
        m = verify_bundle(path)  # checksums, and nothing in the folder that the manifest does not list
        if m.format not in NATIVE_BACKEND:
            raise EdgeKDError(f"bundle {path!r} has format {m.format!r}; bench runs onnx and openvino bundles")
        size = sum(os.path.getsize(os.path.join(path, f)) for f in m.files if os.path.isfile(os.path.join(path, f)))
        return Model(model=name, path=path, kind=m.format, precision=m.precision, arch=m.record("model"),
                     params=m.record("params"), flops=m.record("flops"), size_mb=size / 1e6,
                     input=InputSpec(m.channels, *m.input.resize, m.input.mean, m.input.std,
                                     m.input.crop_pct),
                     classes=m.classes, data=spec_from_file(m.record("data"), path),
                     static_batch=m.static_batch)
    if os.path.isfile(path):
        ckpt = read_checkpoint(path)
        return Model(model=name[:-3] if name.endswith(".pt") else name, path=path, kind="checkpoint",
                     precision="fp32", arch=ckpt.model, params=ckpt.params, flops=ckpt.flops,
                     size_mb=os.path.getsize(path) / 1e6, input=ckpt.input, classes=ckpt.classes,
                     data=spec_from_file(ckpt.data, os.path.dirname(os.path.abspath(path))))
    raise EdgeKDError(f"model {path!r} does not exist (expected a .pt checkpoint or a bundle folder)")


# One timed batch in a worker: the input (and one contiguous float32 copy a runtime may make) plus every
# intermediate tensor of one forward pass (an upper bound: runtimes reuse buffers). Refused when it would
# take more than this share of the memory available now, so the machine is not driven into swap.
MEMORY_SHARE = 0.5


def check_batch_memory(described: Sequence[Model], batch_sizes: Sequence[int]) -> None:
    """Refuse, before any worker starts, a batch size whose inputs and activations cannot fit in memory."""
    available = available_memory()
    if not available:
        return
    largest = max(batch_sizes)
    for d in described:
        per_image = 2 * 4 * d.input.channels * d.input.height * d.input.width + (activation_bytes(d) or 0)
        need = largest * per_image
        if need > MEMORY_SHARE * available:
            fits = int(MEMORY_SHARE * available // per_image)
            raise EdgeKDError(f"--batch-sizes {largest} needs about {need / 1e9:.1f} GB for {d.model} (inputs and "
                              f"activations of one batch) but {available / 1e9:.1f} GB of memory is available (half may "
                              f"be used): the largest batch that fits is {fits}")


def available_memory() -> Optional[int]:
    """Bytes of memory available to new allocations now (MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def activation_bytes(d: Model) -> Optional[int]:
    """Bytes of all intermediate tensors of one image's forward pass (float32), or None when unknown."""
    try:
        if d.kind == "checkpoint":
            return _checkpoint_activations(d.path)
        path = os.path.join(d.path, read_manifest(d.path).model_file)
        return _onnx_activations(path) if d.kind == "onnx" else _openvino_activations(path)
    except Exception as e:  # an estimate only: a model this cannot read fails later with its own message
        log.debug("no activation estimate for %s: %s", d.path, e)
        return None


def _checkpoint_activations(path: str) -> int:
    import torch

    from ..core.loading import load_model

    model, ckpt = load_model(path)
    spec = ckpt.input
    total = [0]
    hooks = [m.register_forward_hook(lambda _m, _i, out: total.__setitem__(0, total[0] + _numel(out)))
             for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.zeros(1, spec.channels, spec.height, spec.width))
    finally:
        for h in hooks:
            h.remove()
    return 4 * total[0]


def _numel(out: Any) -> int:
    if hasattr(out, "numel"):
        return out.numel()
    return sum(_numel(o) for o in out) if isinstance(out, (list, tuple)) else 0


def _onnx_activations(path: str) -> int:
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(path, load_external_data=False))
    total = 0
    for value in list(model.graph.value_info) + list(model.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim]
        total += 4 * _product(dims)
    return total


def _openvino_activations(path: str) -> int:
    """From the IR's XML: every layer's output ports list their dimensions (-1 for the dynamic batch)."""
    import xml.etree.ElementTree as ET

    total = 0
    for layer in ET.parse(path).getroot().iter("layer"):
        for port in layer.findall("./output/port"):
            dims = [int(d.text or 0) for d in port.findall("dim")]
            total += 4 * _product([max(1, d) for d in dims])
    return total


def _product(values: Sequence[int]) -> int:
    result = 1
    for v in values:
        result *= v
    return result


def plan_jobs(described: Sequence[Model], backends: Optional[Sequence[str]], devices: Sequence[str]) -> List[Job]:
    """One job per (model, backend, device) that makes sense; ``status`` holds why a job cannot run.

    A checkpoint runs in ONNX Runtime or OpenVINO through an ONNX file exported for the benchmark.
    Without ``backends`` every model runs in its own format's runtime.
    """
    if backends:
        for b in backends:
            BACKENDS.get(b)
    names = _unique([d.model for d in described])
    jobs: List[Job] = []
    for d, name in zip(described, names):
        readable = [b for b in BACKENDS.names() if d.kind in backend_info(b).reads or
                    (d.kind == "checkpoint" and "onnx" in backend_info(b).reads)]
        chosen = [b for b in backends if b in readable] if backends else [NATIVE_BACKEND[d.kind]]
        # A model none of the listed backends can read still gets its rows, saying so.
        what = "a checkpoint" if d.kind == "checkpoint" else f"an {d.kind} bundle"
        for backend in chosen or backends or []:
            reason = None if chosen else f"{backend} cannot run {what} (it runs in {', '.join(readable)})"
            for device in _devices_for(d, devices):
                status = _ssh_status(d, backend, device) if device.startswith("ssh://") else unsupported(backend, device)
                jobs.append(Job.of(d, model=name, backend=backend, device=device, status=reason or status))
    return jobs


def _devices_for(d: Model, devices: Sequence[str]) -> List[str]:
    """Checkpoints are measured here (SSH devices have no torch): on the local devices given, else the CPU."""
    if d.kind != "checkpoint":
        return list(devices)
    return [dev for dev in devices if not dev.startswith("ssh://")] or ["cpu"]


def _ssh_status(d: Model, backend: str, device: str) -> Optional[str]:
    """On an SSH device only bundles run, each in its own runtime (the device has no torch)."""
    if backend != NATIVE_BACKEND[d.kind]:
        return f"on {device} a {d.kind} bundle runs in {NATIVE_BACKEND[d.kind]} only"
    return None


def _unique(names: Sequence[str]) -> List[str]:
    seen: Dict[str, int] = {}
    out: List[str] = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


def parse_cpus(text: str) -> List[int]:
    """``0``, ``0,1`` or ``0-3`` -> sorted CPU ids, which must be ones this process may use."""
    cpus: Set[int] = set()
    try:
        for part in str(text).split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise EdgeKDError(f"--cpus {text!r} is not a CPU list; use e.g. 0, 0,1 or 0-3") from None
    allowed = os.sched_getaffinity(0)
    if not cpus or not cpus <= allowed:
        raise EdgeKDError(f"--cpus {text!r} names CPUs this process cannot use; allowed: "
                          f"{','.join(map(str, sorted(allowed)))}")
    return sorted(cpus)
