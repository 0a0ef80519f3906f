"""Bench backends, registered by name: each loads one model and returns ``(run, info)`` where
``run(batch ndarray) -> logits ndarray`` is the call that is timed.

A backend is only ever loaded inside its own worker process, so thread pools never compete.
Registry metadata: ``reads`` (artifact kinds it runs: checkpoint, onnx, openvino), ``devices``
(device kinds it accepts: cpu, cuda, openvino) and ``module`` (the library imported before the
first-inference clock starts, so that import time is not charged to the model).
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from ..base.errors import EdgeKDError
from ..base.registry import Registry
from ..bundle.runtime import load_bundle

BACKENDS = Registry("bench backend")
Loaded = Tuple[Callable[[Any], Any], Dict[str, Any]]


@dataclass(frozen=True)
class Backend:
    """A backend's metadata: the artifact kinds it runs, the device kinds it accepts, the library it imports."""

    reads: Tuple[str, ...]
    devices: Tuple[str, ...]
    module: str


_INFO: Dict[str, Backend] = {}


def register(name: str, reads: Tuple[str, ...], devices: Tuple[str, ...],
             module: str) -> Callable[[Callable[..., Loaded]], Callable[..., Loaded]]:
    """Decorator: a backend's loader, registered in BACKENDS with its ``Backend`` record."""
    info = Backend(reads=reads, devices=devices, module=module)

    def add(load: Callable[..., Loaded]) -> Callable[..., Loaded]:
        BACKENDS.register(name, reads=reads, devices=devices, module=module)(load)
        _INFO[name] = info
        return load

    return add


def backend_info(name: str) -> Backend:
    """The ``Backend`` record of a registered backend (EdgeKDError naming the known ones otherwise)."""
    BACKENDS.get(name)
    return _INFO[name]


def backend_module(name: str) -> str:
    """The library a backend imports (imported before the first-inference clock starts)."""
    return backend_info(name).module


def device_kind(device: str) -> str:
    """cpu, cuda (also cuda:N) or openvino (openvino:CPU/GPU/NPU/AUTO)."""
    return device.split(":", 1)[0]


def unsupported(backend: str, device: str) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` (a row's status), or None when it can try."""
    kinds = backend_info(backend).devices
    if device_kind(device) in kinds:
        return None
    hint = "use openvino:CPU/GPU/NPU/AUTO" if backend == "openvino" else "OpenVINO devices need --backends openvino"
    return f"{backend} does not run on {device} (runs on {', '.join(kinds)}; {hint})"


@register("torch", reads=("checkpoint",), devices=("cpu", "cuda"), module="torch")
def load_torch(path: str, threads: Optional[int], device: str) -> Loaded:
    """PyTorch eager; inputs arrive as numpy; on CUDA every call is synchronised before the clock stops."""
    import torch

    from ..core.loading import load_model

    if threads:
        torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise EdgeKDError("CUDA is not available on this machine (torch.cuda.is_available() is False)")
    model, _ = load_model(path)
    model.to(device)

    @torch.inference_mode()
    def run(batch: Any) -> Any:
        out = model(torch.from_numpy(batch).to(device, non_blocking=True))
        if cuda:
            torch.cuda.synchronize()
        return out.cpu().numpy()

    gpu = {"gpu": torch.cuda.get_device_name(torch.device(device))} if cuda else {}
    return run, {"threads": torch.get_num_threads(), "runtime_device": str(device), **gpu}


@register("onnxruntime", reads=("onnx",), devices=("cpu", "cuda"), module="onnxruntime")
def load_onnxruntime(path: str, threads: Optional[int], device: str) -> Loaded:
    """ONNX Runtime through the bundle runtime (checksums verified, no torch imported)."""
    return _bundle(path, threads, device, "onnxruntime")


@register("openvino", reads=("openvino", "onnx"), devices=("cpu", "openvino"), module="openvino")
def load_openvino(path: str, threads: Optional[int], device: str) -> Loaded:
    """OpenVINO runtime on an OpenVINO IR bundle (or an ONNX bundle, which it reads directly), at the
    precision the bundle was validated at (f32 on the CPU, never the plugin's silent bf16)."""
    return _bundle(path, threads, device, "openvino")


def _bundle(path: str, threads: Optional[int], device: str, runtime: str) -> Loaded:
    """The bundle runtime's verified bundle (the callable that is timed) and what its session uses."""

    bundle = load_bundle(path, threads=threads, device=device, runtime=runtime)
    return bundle, dict(bundle.info)
