"""The self-contained runner that edgekd copies to an edge device and runs with the device's Python.

It needs only the standard library, numpy and the bundle's runtime (onnxruntime or openvino; Pillow
for ``predict``) - never torch, never an edgekd install. Python 3.8+ (Raspberry Pi OS, JetPack).

    python3 device_runner.py env
    python3 device_runner.py verify BUNDLE_DIR
    python3 device_runner.py bench JOB.json          # prints {"environment": ..., "rows": [...]}
    python3 device_runner.py predict BUNDLE_DIR IMAGE... [--json] [--top-k K]
"""

import hashlib
import json
import os
import platform
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


def environment():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "model\t")):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {name: _version(name) for name in ("numpy", "onnxruntime", "openvino", "pillow")}
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "platform": platform.platform(),
            "python": platform.python_version(), "versions": {k: v for k, v in versions.items() if v}}


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


def open_session(folder, manifest, threads=None, device="cpu", runtime=None):
    """``(run, info)`` for a verified bundle: ``run(batch float32 NCHW) -> logits``, and ``info`` with the
    device, threads and precision the runtime actually uses. ``runtime`` defaults to the format's."""
    return open_model(model_path(folder, manifest), manifest["format"], threads, device, precision_hint(manifest),
                      runtime)


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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError("%s %s cannot load this bundle: %s" % (runtime, _version(runtime), first))


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
    times = {}
    for b in job.batch_sizes:
        count = max(1, min(job.runs, len(images) // b))
        batches = [np.ascontiguousarray(images[i * b:(i + 1) * b]) for i in range(count)]
        times[str(b)] = time_calls(run, batches, job.warmup, job.runs)
    return {"status": None, "times": times,
            "accuracy": {"top1": float((logits.argmax(1) == labels).mean()),
                         "top5": float((top5 == labels[:, None]).any(1).mean()),
                         "predictions": logits.argmax(1).tolist()},
            "load": {"first_inference_ms": first_ms, "threads": info.get("threads") or job.threads or os.cpu_count()}}


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


def main(argv):
    if not argv or argv[0] not in ("env", "verify", "bench", "predict"):
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
