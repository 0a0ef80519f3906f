"""Bench backends, registered by name: each loads one model and returns ``(run, info)`` where
``run(batch ndarray) -> logits ndarray`` is the call that is timed.

A backend is only ever loaded inside its own worker process, so thread pools never compete.
Registry metadata: ``reads`` (artifact kinds it runs: checkpoint, onnx, openvino), ``devices``
(device kinds it accepts: cpu, cuda, openvino) and ``module`` (the library imported before the
first-inference clock starts, so that import time is not charged to the model).
"""

import os

from .. import EdgeKDError
from ..registry import Registry

BACKENDS = Registry("bench backend")


def device_kind(device):
    """cpu, cuda (also cuda:N) or openvino (openvino:CPU/GPU/NPU/AUTO)."""
    return device.split(":", 1)[0]


def unsupported(backend, device):
    """Why ``backend`` cannot run on ``device`` (a row's status), or None when it can try."""
    kinds = BACKENDS.meta(backend)["devices"]
    if device_kind(device) in kinds:
        return None
    hint = "use openvino:CPU/GPU/NPU/AUTO" if backend == "openvino" else "OpenVINO devices need --backends openvino"
    return f"{backend} does not run on {device} (runs on {', '.join(kinds)}; {hint})"


def usable_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@BACKENDS.register("torch", reads=("checkpoint",), devices=("cpu", "cuda"), module="torch")
def load_torch(path, threads, device):
    """PyTorch eager; inputs arrive as numpy; on CUDA every call is synchronised before the clock stops."""
    import torch

    from ..checkpoint import load_model

    if threads:
        torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise EdgeKDError("CUDA is not available on this machine (torch.cuda.is_available() is False)")
    model, _ = load_model(path)
    model.to(device)

    @torch.inference_mode()
    def run(batch):
        out = model(torch.from_numpy(batch).to(device, non_blocking=True))
        if cuda:
            torch.cuda.synchronize()
        return out.cpu().numpy()

    info = {"threads": torch.get_num_threads(), "runtime_device": str(device)}
    if cuda:
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return run, info


@BACKENDS.register("onnxruntime", reads=("onnx",), devices=("cpu", "cuda"), module="onnxruntime")
def load_onnxruntime(path, threads, device):
    """ONNX Runtime through the bundle runtime (checksums verified, no torch imported).

    session.run copies outputs back to host memory, so CUDA timings are synchronised by construction.
    """
    from ..export.runtime import load_bundle

    bundle = load_bundle(path, threads=threads, device=device)
    session = bundle.session.session
    provider = session.get_providers()[0]
    if device.startswith("cuda") and provider != "CUDAExecutionProvider":
        raise EdgeKDError(f"ONNX Runtime could not start its CUDA execution provider (fell back to {provider})")
    threads_used = session.get_session_options().intra_op_num_threads or usable_cpus()
    return bundle, {"threads": threads_used, "runtime_device": provider}


@BACKENDS.register("openvino", reads=("openvino", "onnx"), devices=("cpu", "openvino"), module="openvino")
def load_openvino(path, threads, device):
    """OpenVINO runtime on an OpenVINO IR bundle (or an ONNX bundle, which it reads directly).

    LATENCY hint: one synchronous request, the way an edge application calls it.
    """
    import openvino as ov

    manifest = verify_bundle(path)
    core = ov.Core()
    name = "CPU" if device == "cpu" else device.split(":", 1)[1]
    _check_openvino_device(core, name)
    config = {"PERFORMANCE_HINT": "LATENCY"}
    on_cpu = name.split(".")[0] == "CPU"
    if threads and on_cpu:  # INFERENCE_NUM_THREADS is a CPU-plugin property
        config["INFERENCE_NUM_THREADS"] = threads
    if on_cpu and manifest["precision"] == "fp32":
        # On CPUs with AVX-512 BF16 or AMX the CPU plugin silently computes in bf16; an fp32 row must be fp32.
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = core.compile_model(core.read_model(os.path.join(path, manifest["model_file"])), name, config)
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def run(batch):
        return request.infer({0: batch}, share_inputs=True)[output]

    info = {"runtime_device": name}
    if on_cpu:
        info["threads"] = int(compiled.get_property("INFERENCE_NUM_THREADS")) or usable_cpus()
        info["runtime_precision"] = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    return run, info


def _check_openvino_device(core, name):
    available = core.available_devices
    base = name.split(".")[0].split(":")[0]
    if base in ("AUTO", "MULTI", "HETERO"):
        return
    if name not in available and base not in {d.split(".")[0] for d in available}:
        raise EdgeKDError(f"OpenVINO device {name} is not available here (available: {', '.join(available) or 'none'})")


def verify_bundle(folder):
    """The bundle's manifest, after checking every listed file against its sha256."""
    from ..export.manifest import read_manifest, sha256_file

    manifest = read_manifest(folder)
    for name, digest in manifest["files"].items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise EdgeKDError(f"bundle {folder!r} is missing {name!r}")
        if sha256_file(path) != digest:
            raise EdgeKDError(f"bundle file {name!r} does not match its sha256 in manifest.json (corrupt or edited)")
    if "model_file" not in manifest:
        raise EdgeKDError(f"bundle {folder!r} has no model_file in manifest.json")
    return manifest
