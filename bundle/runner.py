"""The self-contained runner that edgekd copies to an edge device and runs with the device's Python.

It needs only the standard library, numpy and the bundle's runtime (onnxruntime or openvino; Pillow
for ``predict``) - never torch, never an edgekd install. Python 3.8+ (Raspberry Pi OS, JetPack).

    python3 device_runner.py env
    python3 device_runner.py verify BUNDLE_DIR
    python3 device_runner.py bench JOB.json          # prints {"environment": ..., "rows": [...]}
    python3 device_runner.py predict BUNDLE_DIR IMAGE... [--json] [--top-k K]
    python3 device_runner.py check BUNDLE_DIR        # verify, load, one batch, the manifest's parity images
    python3 device_runner.py logits JOB.json         # export's gate on a device: a model file's logits
"""

import hashlib
import json
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, List, Optional

RUNTIME_PACKAGE = {"onnx": "onnxruntime", "openvino": "openvino"}
# The names of a bundle's files, for all of edgekd (edgekd.bundle.manifest re-exports them): the manifest,
# and per format the files its export writes, the model file the runtime opens first.
MANIFEST_FILE = "manifest.json"
FORMAT_FILES = {"onnx": ("model.onnx",), "openvino": ("model.xml", "model.bin")}

try:  # inside edgekd a bundle error is the CLI's one-line user error (exit 2); on a device the runner stands alone
    from edgekd import EdgeKDError as _Base
except ImportError:  # (mypy: one of two bases, chosen at import)
    _Base = Exception  # type: ignore[misc,assignment]


class BundleError(_Base):
    """A bundle that cannot be used here; the message says why and what to install."""


# This file is edgekd's one implementation of bundle verification, preprocessing and session creation:
# edgekd.export.runtime (predict, export validation) and edgekd.bench.backends import it from here.


def time_calls(run, inputs, warmup, runs):
    """Per-call wall times in ms: ``warmup`` untimed calls, then ``runs`` timed ones cycling through inputs."""
    for i in range(warmup):
        run(inputs[i % len(inputs)])
    times = []
    for i in range(runs):
        x = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def _version(module_name):
    try:
        from importlib import metadata

        return metadata.version(module_name)
    except Exception:
        return None


def usable_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _cpuinfo():
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def emulation(cpuinfo=None, machine=None):
    """``"qemu"`` when this Python runs under QEMU user-mode emulation (an ARM board emulated on an x86
    machine), else None. Emulated timings are not latency: the bench labels such rows and ranks none.

    Three signs, any one enough: a /proc/cpuinfo that says so (edgekd's tools/arm_device.sh writes one);
    qemu-user's own view of the host's x86 cpuinfo under an ARM Python; a binfmt_misc entry that hands
    this machine's own binaries to qemu.
    """
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    machine = (machine or platform.machine()).lower()
    if re.search(r"^model name\s*:.*emulated: qemu", text, re.M | re.I):
        return "qemu"
    x86 = re.search(r"^vendor_id\s*:\s*(GenuineIntel|AuthenticAMD)", text, re.M)
    if machine in ("aarch64", "arm64", "armv7l") and x86:
        return "qemu"
    try:
        with open("/proc/sys/fs/binfmt_misc/qemu-" + machine) as f:
            if f.readline().strip() == "enabled":
                return "qemu"
    except OSError:
        pass
    return None


def environment():
    cpu = platform.processor() or platform.machine()
    text = _cpuinfo()
    flags: list[str] = []
    for line in text.splitlines():
        if line.lower().startswith(("model name", "hardware", "model\t")) and cpu == (platform.processor() or platform.machine()):
            cpu = line.split(":", 1)[1].strip()
        elif line.startswith(("flags", "Features")) and not flags:
            flags = line.split(":", 1)[1].split()
    versions = {name: _version(name) for name in ("numpy", "onnxruntime", "openvino", "pillow")}
    env = {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "platform": platform.platform(),
           "python": platform.python_version(), "versions": {k: v for k, v in versions.items() if v},
           "cpu_flags": flags}
    emulated = emulation(text)
    if emulated:
        env["emulated"] = emulated
    return env


def read_manifest(folder):
    """The JSON of a bundle's manifest.json: the one place that reads the file (edgekd.bundle.manifest.Manifest
    checks its fields; on a device the runner uses what it needs)."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise BundleError("%r is not a bundle: it has no %s" % (folder, MANIFEST_FILE))
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise BundleError("%r is not valid JSON: %s" % (path, e)) from e


def sha256_file(path, chunk=1 << 20):
    """The sha256 of a file, read in 1 MiB blocks: edgekd's one implementation (checkpoints, teachers, bundles)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def check_files(folder, manifest):
    """A bundle is exactly its manifest: every file the manifest lists lies inside the folder (no links, no ../)
    and matches its sha256, and the folder holds nothing else (a file nobody checked could be what a runtime
    reads: OpenVINO finds model.bin beside model.xml whether or not it is listed)."""
    root = os.path.realpath(folder)
    unlisted = sorted(n for n in os.listdir(root) if n != "manifest.json" and n not in manifest["files"])
    if unlisted:
        raise BundleError("bundle %r holds %s, which its manifest.json does not list (a bundle is exactly the files "
                          "its manifest lists: remove them, or export again)" % (folder, ", ".join(unlisted)[:200]))
    for name, digest in manifest["files"].items():
        path = os.path.join(root, name)
        if os.path.islink(path) or os.path.dirname(os.path.realpath(path)) != root:
            raise BundleError("bundle file %r points outside the bundle folder" % name)
        if not os.path.isfile(path):
            raise BundleError("bundle %r is missing %r" % (folder, name))
        if sha256_file(path) != digest:
            raise BundleError("bundle file %r does not match its sha256 in manifest.json (corrupt or edited)" % name)


def verify(folder):
    """The bundle's manifest, after checking every listed file."""
    manifest = read_manifest(folder)
    check_files(folder, manifest)
    return manifest


def model_path(folder, manifest):
    return os.path.join(folder, manifest.get("model_file") or FORMAT_FILES[manifest["format"]][0])


def precision_hint(manifest):
    """The precision OpenVINO's CPU plugin must compute in: the one the bundle was validated at (f32).

    Left alone, the plugin silently runs FP32 models in bf16 on CPUs with AVX512_BF16 or AMX, which moves
    logits by about 1e-2: an fp32 bundle (or row of a benchmark) would no longer be fp32.
    """
    return (manifest.get("runtime") or {}).get("inference_precision") or "f32"


def static_batch(manifest):
    """The one batch size a static-batch bundle accepts (``input.shape[0]``), or None for a dynamic batch.

    OpenVINO for aarch64 cannot compile some dynamic-batch models (MobileNetV3-small), so ``edgekd export
    --target arm64`` writes OpenVINO bundles with a static batch.
    """
    n = (manifest.get("input") or {}).get("shape", [-1])[0]
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def in_batches_of(run, n):
    """``run`` for a model with a static batch of ``n``: any batch goes through in slices of ``n``, the last
    one padded with zeros (images do not interact in an inference-mode classifier)."""
    import numpy as np

    def sliced(batch):
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


def open_session(folder, manifest, threads=None, device="cpu", runtime=None):
    """``(run, info)`` for a verified bundle: ``run(batch float32 NCHW) -> logits``, and ``info`` with the
    device, threads and precision the runtime actually uses. ``runtime`` defaults to the format's.
    A static-batch bundle's ``run`` takes any batch (in slices of its batch size)."""
    run, info = open_model(model_path(folder, manifest), manifest["format"], threads, device, precision_hint(manifest),
                           runtime)
    n = static_batch(manifest)
    return (in_batches_of(run, n), dict(info, static_batch=n)) if n else (run, info)


def open_model(path, fmt, threads=None, device="cpu", precision="f32", runtime=None):
    """``(run, info)`` for one model file (see open_session); a BundleError names what is missing."""
    runtime = runtime or RUNTIME_PACKAGE.get(fmt)
    if runtime not in ("onnxruntime", "openvino") or (runtime == "onnxruntime" and fmt != "onnx"):
        raise BundleError("no runtime %r for bundle format %r: this runner runs onnx (onnxruntime, openvino) "
                          "and openvino (openvino)" % (runtime, fmt))
    os.environ.setdefault("OPENVINO_TELEMETRY_OPT_OUT", "1")
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
        raise BundleError("%s %s cannot load this bundle: %s" % (runtime, _version(runtime), message(e)))


def message(e):
    """The line of a runtime's exception that says what failed: OpenVINO's first lines only name its source
    files ("Exception from src/inference/src/cpp/core.cpp:112:")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if not re.match(r"^(Exception from )?\S+\.(cpp|hpp|h|c):\d+:?$", line):
            return line
    return lines[0] if lines else type(e).__name__


def _onnxruntime(ort, path, threads, device):
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

    def run(batch):  # session.run copies outputs to host memory, so CUDA timings are synchronised
        return session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    return run, {"threads": session.get_session_options().intra_op_num_threads or usable_cpus(),
                 "runtime_device": provider}


def openvino_device(device):
    """OpenVINO's device name: cpu -> CPU, openvino:GPU -> GPU, gpu -> GPU."""
    device = str(device)
    if device.lower() == "cpu":
        return "CPU"
    return device.split(":", 1)[1] if device.lower().startswith("openvino:") else device.upper()


def openvino_config(name, threads, precision):
    """LATENCY hint (one synchronous request, the way an edge application calls it); on the CPU, the
    bundle's precision and the thread count, which are CPU-plugin properties."""
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if name.split(".")[0] == "CPU":
        config["INFERENCE_PRECISION_HINT"] = precision
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
    return config


def _openvino(ov, path, threads, name, precision):
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

    def run(batch):
        return request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)}, share_inputs=True)[output]

    info = {"runtime_device": name}
    if base == "CPU":
        info["threads"] = int(compiled.get_property("INFERENCE_NUM_THREADS")) or usable_cpus()
        info["runtime_precision"] = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    return run, info


@dataclass
class BenchJob:
    """What ``bench JOB.json`` asks for (edgekd.bench.remote writes it with ``to_json``): the bundle folders and
    the preprocessed test images (.npy files beside the job file), and how to time each bundle."""

    bundles: List[str]
    images: str
    labels: str
    batch_sizes: List[int]
    warmup: int
    runs: int
    threads: Optional[int] = None
    openvino_device: str = "CPU"

    @classmethod
    def read(cls, path):
        with open(path) as f:
            values = json.load(f)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_json(self):
        return json.dumps(asdict(self))


def bench_one(folder, job, images, labels):
    """Accuracy on every image, then raw per-call times for each batch size, each call on different
    images; the caller computes the statistics. A failure is the row's status."""
    import numpy as np

    try:
        manifest = verify(folder)
        start = time.perf_counter()
        run, info = open_session(folder, manifest, job.threads, job.openvino_device)
        run(images[:1])
        first_ms = (time.perf_counter() - start) * 1000.0
    except BundleError as e:
        return {"status": str(e)}
    logits = np.concatenate([np.asarray(run(images[i:i + 64])) for i in range(0, len(images), 64)])
    top5 = np.argsort(-logits, axis=1)[:, :5]
    times, skipped, static = {}, {}, static_batch(manifest)
    for b in job.batch_sizes:
        if static and b != static:
            skipped[str(b)] = unsupported_batch(static, b)
            continue
        count = max(1, min(job.runs, len(images) // b))
        batches = [np.ascontiguousarray(images[i * b:(i + 1) * b]) for i in range(count)]
        times[str(b)] = time_calls(run, batches, job.warmup, job.runs)
    return {"status": None, "times": times, "batch_status": skipped,
            "accuracy": {"top1": float((logits.argmax(1) == labels).mean()),
                         "top5": float((top5 == labels[:, None]).any(1).mean()),
                         "predictions": logits.argmax(1).tolist()},
            "load": {"first_inference_ms": first_ms, "threads": info.get("threads") or job.threads or os.cpu_count()}}


def unsupported_batch(static, b):
    return "not run: the bundle has a static batch of %d (exported for a target whose runtime needs it)" % static


def bench(job_path):
    job = BenchJob.read(job_path)
    base = os.path.dirname(os.path.abspath(job_path))
    try:
        import numpy as np
    except ImportError:
        raise BundleError("numpy is not installed on the device: pip install numpy")
    images = np.load(os.path.join(base, job.images))
    labels = np.load(os.path.join(base, job.labels))
    rows = [dict(bench_one(os.path.join(base, b), job, images, labels), bundle=b) for b in job.bundles]
    return {"environment": environment(), "rows": rows}


def resize_crop(size, out_hw, crop_pct):
    """Where an image of ``size`` (width, height) goes: ``(resized (w, h), crop box (left, top, right, bottom))``.

    torchvision's and timm's evaluation geometry: resize the shorter side to ``out / crop_pct`` keeping the
    aspect ratio (``int`` truncation of the longer side, as ``transforms.Resize(int)``), then center-crop to
    ``out_hw`` (offsets rounded as ``transforms.CenterCrop``). ``crop_pct`` None (manifests written before it
    was recorded) stretches the whole image to ``out_hw``, as edgekd did then.
    """
    import math

    width, height = size
    out_h, out_w = out_hw
    if crop_pct is None:
        return (out_w, out_h), (0, 0, out_w, out_h)
    if out_h == out_w:  # timm: the scalar case, torchvision's Resize(int)
        short = int(math.floor(out_h / crop_pct))
        if width <= height:
            new = (short, int(short * height / width))
        else:
            new = (int(short * width / height), short)
    else:  # timm's ResizeKeepRatio: the scale that makes both sides at least the target's
        target_h, target_w = int(math.floor(out_h / crop_pct)), int(math.floor(out_w / crop_pct))
        ratio = min(height / target_h, width / target_w)
        new = (int(round(width / ratio)), int(round(height / ratio)))
    left = int(round((new[0] - out_w) / 2.0))
    top = int(round((new[1] - out_h) / 2.0))
    return new, (left, top, left + out_w, top + out_h)


def preprocess_pixels(image, spec):
    """PIL image -> the manifest's geometry and colour, as a PIL image (the pixels before /255 and normalising)."""
    from PIL import Image

    if image.mode != spec["color"]:
        image = image.convert(spec["color"])
    height, width = spec["resize"]
    new, box = resize_crop(image.size, (height, width), spec.get("crop_pct"))
    if image.size != new:
        # Image.Resampling since Pillow 9.1; a device's older Pillow has the constant on Image itself
        image = image.resize(new, getattr(Image, "Resampling", Image).BILINEAR)
    if box != (0, 0) + new:
        image = image.crop(box)  # a crop past the edge (an upscale rounding) pads with zeros, as CenterCrop does
    return image


def preprocess(image, spec):
    """PIL image -> (C, H, W) float32 exactly as the manifest's input spec says (training's evaluation transform):
    mode, bilinear resize of the shorter side to size / crop_pct, center crop, /255, normalise."""
    import numpy as np

    pixels = np.asarray(preprocess_pixels(image, spec), dtype=np.float32) / 255.0
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(-1, 1, 1)
    return (pixels - mean) / std


def load_images(paths, spec):
    """The image files as one preprocessed batch; an unreadable file is a BundleError naming it."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    batch = []
    for path in paths:
        try:
            with Image.open(path) as img:
                batch.append(preprocess(img, spec))
        except (UnidentifiedImageError, OSError) as e:
            raise BundleError("cannot read image %r: %s" % (path, e))
    return np.stack(batch)


def ranked(paths, logits, classes, k=1):
    """``[{"image", "top": [{"label", "index", "score"}, ...]}]``: softmax scores, best first."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    results = []
    for path, p in zip(paths, probs):
        order = np.argsort(-p)[:k]
        results.append({"image": path, "top": [{"label": classes[i], "index": int(i), "score": float(p[i])}
                                               for i in order]})
    return results


def predict(folder, paths, k=1):
    manifest = verify(folder)
    run, _ = open_session(folder, manifest)
    return ranked(paths, run(load_images(paths, manifest["input"])), manifest["classes"], k)


def agreement(manifest, logits):
    """Why the logits of the manifest's parity images disagree with the exporting machine's, or None.

    FP32 and FP16 are held to the bundle's own logit tolerance; INT8 (whose integer kernels differ between
    CPUs) to top-1 agreement on at least ``min_agreement`` of the images.
    """
    import numpy as np

    parity = manifest["parity"]
    expected = np.asarray(parity["logits"], dtype=np.float64)
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape != expected.shape:
        return "output shape %s, the exporting machine's was %s" % (logits.shape, expected.shape)
    if not np.isfinite(logits).all():
        return "the output holds NaN or infinity"
    if parity.get("atol") is not None:
        diff = float(np.abs(logits - expected).max())
        if not diff <= parity["atol"]:
            return "max |logit difference| %.3g from the exporting machine's exceeds %g on %d parity images" % (
                diff, parity["atol"], len(expected))
    same = float((logits.argmax(1) == expected.argmax(1)).mean())
    if not same >= parity.get("min_agreement", 1.0):
        return "top-1 agrees with the exporting machine's on %.0f%% of %d parity images (needs %.0f%%)" % (
            same * 100, len(expected), parity.get("min_agreement", 1.0) * 100)
    return None


def check(folder):
    """What deploy runs on the device before installing: verify, load (compile), one batch, and the
    manifest's parity images against the logits the exporting machine recorded."""
    import numpy as np

    manifest = verify(folder)
    run, info = open_session(folder, manifest)
    c, h, w = manifest["input"]["shape"][1], manifest["input"]["resize"][0], manifest["input"]["resize"][1]
    try:
        out = np.asarray(run(np.zeros((static_batch(manifest) or 1, c, h, w), dtype=np.float32)))
        result = {"ok": True, "output_shape": list(out.shape), "runtime_device": info.get("runtime_device"),
                  "runtime_precision": info.get("runtime_precision"), "parity_images": 0}
        if manifest.get("parity"):
            images = np.load(os.path.join(folder, manifest["parity"]["file"]))
            problem = agreement(manifest, run(images))
            if problem:
                raise BundleError("parity check failed on this device: " + problem)
            result["parity_images"] = len(images)
    except BundleError:
        raise
    except Exception as e:
        runtime = RUNTIME_PACKAGE.get(manifest["format"])
        raise BundleError("%s %s cannot run this bundle: %s" % (runtime, _version(runtime), message(e)))
    return result


def logits(job_path):
    """Export's parity gate on a device: ``{"model", "format", "precision", "images", "out", "static_batch"}``
    -> the model file's logits on the images, saved to ``out`` (.npy)."""
    import numpy as np

    with open(job_path) as f:
        job = json.load(f)
    base = os.path.dirname(os.path.abspath(job_path))
    run, info = open_model(os.path.join(base, job["model"]), job["format"], precision=job.get("precision") or "f32")
    if job.get("static_batch"):
        run = in_batches_of(run, job["static_batch"])
    images = np.load(os.path.join(base, job["images"]))
    out = np.concatenate([np.asarray(run(images[i:i + 64])) for i in range(0, len(images), 64)])
    np.save(os.path.join(base, job["out"]), out.astype(np.float32))
    return {"environment": environment(), "runtime": info}


def main(argv):
    if not argv or argv[0] not in ("env", "verify", "bench", "predict", "check", "logits"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        if argv[0] == "env":
            print(json.dumps(environment()))
        elif argv[0] == "verify":
            verify(argv[1])
            print(json.dumps({"ok": True}))
        elif argv[0] == "bench":
            print(json.dumps(bench(argv[1])))
        elif argv[0] == "check":
            print(json.dumps(check(argv[1])))
        elif argv[0] == "logits":
            print(json.dumps(logits(argv[1])))
        else:
            args = [a for a in argv[1:] if not a.startswith("--")]
            top_k = int(argv[argv.index("--top-k") + 1]) if "--top-k" in argv else 1
            if "--top-k" in argv:
                args.remove(argv[argv.index("--top-k") + 1])
            results = predict(args[0], args[1:], top_k)
            if "--json" in argv:
                print(json.dumps(results, indent=2))
            else:
                for r in results:
                    print(r["image"] + ": " + ", ".join("%s %.4f" % (t["label"], t["score"]) for t in r["top"]))
    except BundleError as e:
        print("edgekd device runner: error: %s" % e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
