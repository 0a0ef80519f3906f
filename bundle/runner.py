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


try:  # edgekd's one regular-file check (edgekd.base.files); on a device the runner stands alone with the same rule
    from edgekd.base.files import require_regular as _require_regular
except ImportError:
    def _require_regular(path, what, shown=None):  # type: ignore[misc]
        import stat

        st = os.stat(path)  # stat, never open: opening a FIFO waits for a writer for ever
        if not stat.S_ISREG(st.st_mode):
            raise BundleError("%s %r is not a regular file; edgekd reads only regular files" % (what, shown or path))
        return st


def _unique_keys(pairs):
    """json's object_pairs_hook: a key given twice is an error, never 'the last one wins'."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError("the key %r appears twice in one object" % key)
        out[key] = value
    return out


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
    text = _cpuinfo()
    fields: dict = {}  # the first value of each /proc/cpuinfo key
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    # x86 names its CPU in "model name" ("model" is a number there); ARM boards in "Hardware" or "Model"
    names = [fields.get(k) for k in ("model name", "hardware", "model")]
    cpu = next((n for n in names if n and not n.isdigit()), None) or platform.processor() or platform.machine()
    flags = (fields.get("flags") or fields.get("features") or "").split()
    versions = {name: _version(name) for name in ("numpy", "onnxruntime", "openvino", "pillow")}
    env = {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "platform": platform.platform(),
           "python": platform.python_version(), "versions": {k: v for k, v in versions.items() if v},
           "cpu_flags": flags}
    emulated = emulation(text)
    if emulated:
        env["emulated"] = emulated
    return env


# A manifest is a few kilobytes (the calibration record lists image ids: a few megabytes at most), and a
# few levels deep; anything far beyond is damage or an attack, refused before it is parsed or walked.
MAX_JSON_BYTES = 64 * 1024 ** 2
MAX_JSON_DEPTH = 32


def json_depth_problem(value, limit=MAX_JSON_DEPTH):
    """'nested N levels deep' when a parsed JSON/YAML value nests deeper than ``limit``, else None (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return "nested more than %d levels deep (at most %d)" % (limit, limit)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return None


def load_json(path, what, error=None, max_bytes=MAX_JSON_BYTES):
    """The JSON value in ``path``, or ``error`` (an exception class, BundleError by default) in one line naming
    ``what``: too large, not UTF-8 JSON, or nested too deeply (json's recursion ends in RecursionError)."""
    error = error or BundleError
    try:
        size = _require_regular(path, what).st_size
    except (OSError, ValueError) as e:
        raise error(str(e)) from None
    if size > max_bytes:
        raise error("%s %r is %.1f MB; a valid one is far smaller (at most %d MB)"
                    % (what, path, size / 1e6, max_bytes // 1024 ** 2))
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read().decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise error("%s %r is not valid JSON: %s" % (what, path, str(e).splitlines()[0] if str(e) else
                                                     type(e).__name__)) from e
    except RecursionError as e:
        raise error("%s %r is not valid: nested too deeply (at most %d levels)" % (what, path, MAX_JSON_DEPTH)) from e
    deep = json_depth_problem(value)
    if deep:
        raise error("%s %r is not valid: %s" % (what, path, deep))
    return value


def read_manifest(folder):
    """The JSON of a bundle's manifest.json: the one place that reads the file (edgekd.bundle.manifest.Manifest
    checks its fields; on a device the runner uses what it needs)."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.lexists(path):
        raise BundleError("%r is not a bundle: it has no %s" % (folder, MANIFEST_FILE))
    if os.path.islink(path) or os.path.dirname(os.path.realpath(path)) != os.path.realpath(folder):
        raise BundleError("bundle %r: its %s is a link; links out of a bundle are refused (copy the file in)"
                          % (folder, MANIFEST_FILE))
    return load_json(path, "bundle manifest")  # bounded: size, nesting


def sha256_file(path, chunk=1 << 20):
    """The sha256 of a file, read in 1 MiB blocks: edgekd's one implementation (checkpoints, teachers, bundles)."""
    h = hashlib.sha256()
    _require_regular(path, "file")  # every file edgekd hashes (teachers, checkpoints, bundles): a FIFO never opened
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def check_files(folder, manifest):
    """A bundle is exactly its manifest: every file the manifest lists lies inside the folder (no links, no ../)
    and matches its sha256, and the folder holds nothing else (a file nobody checked could be what a runtime
    reads: OpenVINO finds model.bin beside model.xml whether or not it is listed)."""
    root = os.path.realpath(folder)
    unlisted = sorted(n for n in os.listdir(root) if n != MANIFEST_FILE and n not in manifest["files"])
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
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):  # (edgekd checks the schema)
        raise BundleError("bundle manifest in %r is not an edgekd manifest (no 'files' map)" % folder)
    check_files(folder, manifest)
    return manifest


def model_path(folder, manifest):
    return os.path.join(folder, manifest.get("model_file") or FORMAT_FILES[manifest["format"]][0])


def precision_hint(manifest):
    """The precision OpenVINO's CPU plugin must compute in: the one the bundle was validated at (f32).

    Left alone, the plugin silently runs FP32 models in bf16 on CPUs with AVX512_BF16 or AMX, which moves
    logits by about 1e-2: an fp32 bundle (or row of a benchmark) would no longer be fp32.
    """
    runtime = manifest.get("runtime")
    hint = runtime.get("inference_precision") if isinstance(runtime, dict) else None
    if hint is None:
        return "f32"
    if hint not in ("f32", "f16", "bf16"):  # what edgekd writes; anything else is damage
        raise BundleError("manifest field 'runtime.inference_precision' must be f32, f16 or bf16, got %r" % (hint,))
    return hint



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
    A static-batch bundle's ``run`` takes any batch (in slices of its batch size). A model whose number of
    outputs (when the model states it) is not the manifest's number of classes is refused."""
    run, info = open_model(model_path(folder, manifest), manifest["format"], threads, device, precision_hint(manifest),
                           runtime)
    if isinstance(manifest.get("classes"), list):
        check_outputs(info.get("outputs"), manifest["classes"])
    n = static_batch(manifest)
    return (in_batches_of(run, n), dict(info, static_batch=n)) if n else (run, info)


def open_model(path, fmt, threads=None, device="cpu", precision="f32", runtime=None):
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
        try:
            return session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        except Exception as e:  # ONNX Runtime's own error types: a manifest whose input does not fit the model
            raise BundleError("onnxruntime cannot run this bundle on a %s input: %s"
                              % ("x".join(map(str, np.shape(batch))), message(e)[:300]))

    last = session.get_outputs()[0].shape[-1] if session.get_outputs()[0].shape else None
    return run, {"threads": session.get_session_options().intra_op_num_threads or usable_cpus(),
                 "runtime_device": provider, "outputs": last if isinstance(last, int) else None}



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
        try:
            return request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)}, share_inputs=True)[output]
        except RuntimeError as e:  # OpenVINO's error type: a manifest whose input does not fit the model
            raise BundleError("openvino cannot run this bundle on a %s input: %s"
                              % ("x".join(map(str, np.shape(batch))), message(e)[:300]))

    shape = output.get_partial_shape()
    last = shape[shape.rank.get_length() - 1] if shape.rank.is_static and shape.rank.get_length() else None
    info = {"runtime_device": name, "outputs": last.get_length() if last is not None and last.is_static else None}

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
    bad = int((~np.isfinite(logits)).any(1).sum())
    if bad:  # a top-1 of NaN rows is no answer: the row fails, by name
        return {"status": "failed: the model returned non-finite outputs (NaN or infinity) for %d images" % bad}
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


# The most pixels edgekd decodes from one image, everywhere it reads images (training, unlabelled folders,
# calibration, predict, the device runner): Pillow's own decompression-bomb threshold (about 89
# megapixels, 0.27 GB decoded as RGB). A larger file is refused from its header, before any pixel is decoded.
MAX_IMAGE_PIXELS = 89_478_485


def image_too_large(path, pixels, size=None):
    """The one-line refusal of an image above MAX_IMAGE_PIXELS."""
    dims = "%dx%d pixels, " % tuple(size) if size else ""
    return ("image %r is too large to decode (%s%.0f megapixels; edgekd reads images up to %.0f megapixels)"
            % (printable(str(path)), dims, pixels / 1e6, MAX_IMAGE_PIXELS / 1e6))


def open_image(path, error=None):
    """An image file opened lazily (header only); ``error`` (BundleError by default) when its header claims more
    than MAX_IMAGE_PIXELS. Pillow warns above its own limit and raises above twice it: both become this refusal."""
    import re
    import warnings

    from PIL import Image

    error = error or BundleError
    if isinstance(path, (str, os.PathLike)) and os.path.exists(path):  # a FIFO would hang Image.open: stat first
        try:
            _require_regular(path, "image", printable(str(path)))
        except (OSError, ValueError) as e:
            raise error(str(e)) from None
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            found = re.search(r"\((\d+) pixels\)", str(e))
            raise error(image_too_large(path, int(found.group(1)) if found else MAX_IMAGE_PIXELS + 1)) from e
    if img.width * img.height > MAX_IMAGE_PIXELS:
        img.close()
        raise error(image_too_large(path, img.width * img.height, img.size))
    return img


# Pillow's modes that hold more than 8 bits per pixel (16-bit grey PNG and TIFF, 32-bit integer, float):
# its own convert("L"/"RGB") clips them to 0..255, which turns a 16-bit grey image into black and white.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_8bit(image):
    """A PIL image with at most 8 bits per channel; 16-bit and float images scaled to 0..255, not clipped.

    16-bit modes (and mode I, which Pillow uses for 16-bit PNGs too) are scaled by 255/65535; float images
    are taken as [0, 1] when every value lies there, else as 0..255. Other modes are returned unchanged.
    """
    if image.mode not in WIDE_MODES:
        return image
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        finite = np.nan_to_num(pixels, nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0 else 1.0
        pixels = finite * scale
    else:
        pixels = pixels * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")


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
    if new[0] * new[1] > MAX_IMAGE_PIXELS:  # bounded before the resize allocates it (edgekd.base.bounds' rule)
        raise BundleError("crop_pct %r resizes a %dx%d image to %dx%d pixels (%.3g; at most %.0f megapixels)"
                          % (crop_pct, width, height, new[0], new[1], new[0] * new[1], MAX_IMAGE_PIXELS / 1e6))
    left = int(round((new[0] - out_w) / 2.0))
    top = int(round((new[1] - out_h) / 2.0))
    return new, (left, top, left + out_w, top + out_h)


def preprocess_pixels(image, spec):
    """PIL image -> the manifest's geometry and colour, as a PIL image (the pixels before /255 and normalising);
    16-bit and float images scaled to 8 bits first (Pillow's own conversion clips them)."""
    from PIL import Image

    image = to_8bit(image)
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
    """The image files as one preprocessed batch; an unreadable or oversized file is a BundleError naming it."""
    import numpy as np
    from PIL import UnidentifiedImageError

    batch = []
    for path in paths:
        try:
            with open_image(path) as img:
                batch.append(preprocess(img, spec))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # truncated, damaged, not an image
            raise BundleError("cannot read image %r: %s" % (printable(str(path)), printable(str(e) or type(e).__name__))) \
                from e
    return np.stack(batch)


def printable(text):
    """``text`` with control characters (escape sequences, carriage returns, bidi overrides) escaped, so a name
    read from a file cannot move the cursor, recolour or rewrite what the terminal shows."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def check_outputs(count, classes):
    """A BundleError when the model's number of outputs is not the manifest's number of class names."""
    if count is not None and count != len(classes):
        raise BundleError("the bundle's model has %d outputs but its manifest names %d classes: the manifest does not "
                          "describe this model (export it again)" % (count, len(classes)))


def ranked(paths, logits, classes, k=1):
    """``[{"image", "top": [{"label", "index", "score"}, ...]}]``: softmax scores, best first. An image whose logits
    are not all finite gets ``"finite": false`` and null scores (never a bare NaN: the JSON stays valid)."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise BundleError("the bundle's model returned a %s output; a classifier's (images, classes) is needed"
                          % (logits.shape,))
    check_outputs(logits.shape[1], classes)
    results = []
    for path, row in zip(paths, logits):
        finite = bool(np.isfinite(row).all())
        p = np.exp(row - row.max()) if finite else np.full_like(row, np.nan)
        p = p / p.sum() if finite else p
        order = np.argsort(-p)[:k] if finite else np.arange(min(k, len(p)))
        top = [{"label": classes[i], "index": int(i), "score": float(p[i]) if finite else None} for i in order]
        results.append({"image": path, "top": top} if finite else {"image": path, "top": top, "finite": False})
    return results


def text_lines(results):
    """predict's text output: one line per image, names from files escaped."""
    lines = []
    for r in results:
        scores = ", ".join("%s %s" % (printable(t["label"]), "nan" if t["score"] is None else "%.4f" % t["score"])
                           for t in r["top"])
        lines.append(printable(str(r["image"])) + ": " + scores + ("" if r.get("finite", True) else
                                                                      " (the model returned non-finite scores)"))
    return lines


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
    try:  # the arguments: a command, its path(s), predict's --top-k K (a whole number from 1)
        top_k = int(argv[argv.index("--top-k") + 1]) if "--top-k" in argv else 1
        known = argv[0] in ("env", "verify", "bench", "predict", "check", "logits") and top_k >= 1 \
            and len(argv) > {"env": 0, "predict": 2}.get(argv[0], 1)
    except (IndexError, ValueError):
        known = False
    if not known:
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
            if "--top-k" in argv:
                args.remove(argv[argv.index("--top-k") + 1])
            results = predict(args[0], args[1:], top_k)
            if "--json" in argv:
                print(json.dumps(results, indent=2, allow_nan=False))
            else:
                print("\n".join(text_lines(results)))
    except BundleError as e:
        print("edgekd device runner: error: %s" % printable(str(e)), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
