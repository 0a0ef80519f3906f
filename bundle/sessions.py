"""Runtime sessions on a bundle, torch-free and standalone (part of the device runner): ONNX Runtime and
OpenVINO, one precision policy, static-batch slicing."""

import os
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..base.errors import BundleError
from .checks import RUNTIME_PACKAGE, check_outputs
from .environment import affinity_cpu_count, library_version
from .manifest import Manifest, precision_hint

Runner = Callable[[Any], Any]  # a float32 NCHW batch -> the model's logits


def in_batches_of(run: Runner, n: int) -> Runner:
    """``run`` for a model with a static batch of ``n``: any batch goes through in slices of ``n``, the last
    one padded with zeros (images do not interact in an inference-mode classifier)."""
    import numpy as np

    def sliced(batch: Any) -> Any:
        if len(batch) == n:
            return run(batch)
        outputs = []
        for i in range(0, len(batch), n):
            part = np.asarray(batch[i:i + n], dtype=np.float32)
            if len(part) < n:
                pad = np.zeros((n - len(part),) + part.shape[1:], dtype=np.float32)
                outputs.append(np.asarray(run(np.concatenate([part, pad])))[:len(part)])
            else:
                outputs.append(np.asarray(run(part)))
        return np.concatenate(outputs)

    return sliced


def open_session(folder: str, manifest: Manifest, threads: Optional[int] = None, device: str = "cpu",
                 runtime: Optional[str] = None) -> Tuple[Runner, Dict[str, Any]]:
    """``(run, info)`` for a verified bundle: ``run(batch float32 NCHW) -> logits``, and ``info`` with the
    device, threads and precision the runtime actually uses. ``runtime`` defaults to the format's.
    A static-batch bundle's ``run`` takes any batch (in slices of its batch size). A model whose number of
    outputs (when the model states it) is not the manifest's number of classes is refused."""
    run, info = open_model(manifest.model_path(folder), manifest.format, threads, device, precision_hint(manifest),
                           runtime)
    check_outputs(info.get("outputs"), manifest.classes)
    n = manifest.static_batch
    return (in_batches_of(run, n), dict(info, static_batch=n)) if n else (run, info)


def open_model(path: str, fmt: str, threads: Optional[int] = None, device: str = "cpu", precision: str = "f32",
               runtime: Optional[str] = None) -> Tuple[Runner, Dict[str, Any]]:
    """``(run, info)`` for one model file (see open_session); a BundleError names what is missing."""
    runtime = runtime or RUNTIME_PACKAGE.get(fmt)
    if runtime not in ("onnxruntime", "openvino") or (runtime == "onnxruntime" and fmt != "onnx"):
        raise BundleError("no runtime %r for bundle format %r: this runner runs onnx (onnxruntime, openvino) "
                          "and openvino (openvino)" % (runtime, fmt))
    os.environ.setdefault("OPENVINO_TELEMETRY_OPT_OUT", "1")
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"  # before the import: else a device id under ~/.cache/Microsoft
    try:
        module = __import__(runtime)
    except ImportError:
        raise BundleError("%s is not installed here: pip install %s" % (runtime, runtime))
    try:
        if runtime == "onnxruntime":
            return _onnxruntime(module, path, threads, str(device).lower())
        return _openvino(module, path, threads, openvino_device(device), precision)
    except BundleError:
        raise
    except Exception as e:
        raise BundleError("%s %s cannot load this bundle: %s" % (runtime, library_version(runtime), message(e)))


def message(e: BaseException) -> str:
    """The line of a runtime's exception that says what failed: OpenVINO's first lines only name its source
    files ("Exception from src/inference/src/cpp/core.cpp:112:")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if not re.match(r"^(Exception from )?\S+\.(cpp|hpp|h|c):\d+:?$", line):
            return line
    return lines[0] if lines else type(e).__name__


def _onnxruntime(ort: Any, path: str, threads: Optional[int], device: str) -> Tuple[Runner, Dict[str, Any]]:
    """ONNX Runtime on the CPU, or on a GPU through its CUDA execution provider (cuda or cuda:N)."""
    import numpy as np

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    # provider names, or (name, options) pairs
    providers = ["CPUExecutionProvider"]  # type: List[Any]
    cuda = device.split(":")[0] == "cuda"
    if cuda:
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BundleError("ONNX Runtime here has no CUDAExecutionProvider: pip install onnxruntime-gpu, or use cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
    elif device != "cpu":
        raise BundleError("ONNX Runtime runs on cpu or cuda[:N], not %r" % device)
    session = ort.InferenceSession(path, opts, providers=providers)
    provider = session.get_providers()[0]
    if cuda and provider != "CUDAExecutionProvider":
        raise BundleError("ONNX Runtime could not start its CUDA execution provider (fell back to %s)" % provider)
    name = session.get_inputs()[0].name

    def run(batch: Any) -> Any:  # session.run copies outputs to host memory, so CUDA timings are synchronised
        try:
            return session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        except Exception as e:  # ONNX Runtime's own error types: a manifest whose input does not fit the model
            raise BundleError("onnxruntime cannot run this bundle on a %s input: %s"
                              % ("x".join(map(str, np.shape(batch))), message(e)[:300]))

    last = session.get_outputs()[0].shape[-1] if session.get_outputs()[0].shape else None
    return run, {"threads": session.get_session_options().intra_op_num_threads or affinity_cpu_count(),
                 "runtime_device": provider, "outputs": last if isinstance(last, int) else None}



def openvino_device(device: str) -> str:
    """OpenVINO's device name: cpu -> CPU, openvino:GPU -> GPU, gpu -> GPU."""
    device = str(device)
    if device.lower() == "cpu":
        return "CPU"
    return device.split(":", 1)[1] if device.lower().startswith("openvino:") else device.upper()


def openvino_config(name: str, threads: Optional[int], precision: str) -> Dict[str, Any]:
    """LATENCY hint (one synchronous request, the way an edge application calls it); on the CPU, the
    bundle's precision and the thread count, which are CPU-plugin properties."""
    config: Dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if name.split(".")[0] == "CPU":
        config["INFERENCE_PRECISION_HINT"] = precision
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
    return config


def _openvino(ov: Any, path: str, threads: Optional[int], name: str, precision: str) -> Tuple[Runner, Dict[str, Any]]:
    import numpy as np

    core = ov.Core()
    available = core.available_devices
    base = name.split(".")[0].split(":")[0]
    if base not in ("AUTO", "MULTI", "HETERO") and name not in available and base not in {
            d.split(".")[0] for d in available}:
        raise BundleError("OpenVINO device %s is not available here (available: %s)" % (name, ", ".join(available) or "none"))
    compiled = core.compile_model(core.read_model(path), name, openvino_config(name, threads, precision))
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def run(batch: Any) -> Any:
        try:
            return request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)}, share_inputs=True)[output]
        except RuntimeError as e:  # OpenVINO's error type: a manifest whose input does not fit the model
            raise BundleError("openvino cannot run this bundle on a %s input: %s"
                              % ("x".join(map(str, np.shape(batch))), message(e)[:300]))

    shape = output.get_partial_shape()
    last = shape[shape.rank.get_length() - 1] if shape.rank.is_static and shape.rank.get_length() else None
    info: Dict[str, Any] = {"runtime_device": name, "outputs": last.get_length() if last is not None and last.is_static else None}

    if base == "CPU":
        info["threads"] = int(compiled.get_property("INFERENCE_NUM_THREADS")) or affinity_cpu_count()
        info["runtime_precision"] = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    return run, info
