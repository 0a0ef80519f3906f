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

RUNTIME_PACKAGE = {"onnx": "onnxruntime", "openvino": "openvino"}


class BundleError(Exception):
    """A bundle that cannot be used here; the message says why and what to install."""


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
    path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(path):
        raise BundleError("%s has no manifest.json" % folder)
    with open(path) as f:
        return json.load(f)


def verify(folder):
    """Every listed file lies inside the folder (no links, no ../) and matches its sha256."""
    manifest = read_manifest(folder)
    root = os.path.realpath(folder)
    for name, digest in manifest["files"].items():
        path = os.path.join(root, name)
        if os.path.islink(path) or os.path.dirname(os.path.realpath(path)) != root:
            raise BundleError("bundle file %r points outside the bundle folder" % name)
        if not os.path.isfile(path):
            raise BundleError("bundle file %r is missing" % name)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != digest:
            raise BundleError("bundle file %r does not match its sha256 (corrupt copy?)" % name)
    return manifest


def open_session(folder, manifest, threads=None, openvino_device="CPU"):
    """``run(batch float32 NCHW) -> logits`` with the bundle's runtime, or a BundleError naming the package."""
    fmt = manifest["format"]
    package = RUNTIME_PACKAGE.get(fmt)
    if package is None:
        raise BundleError("unknown bundle format %r" % fmt)
    import numpy as np

    path = os.path.join(folder, manifest.get("model_file") or ("model.onnx" if fmt == "onnx" else "model.xml"))
    try:
        if fmt == "onnx":
            import onnxruntime as ort
        else:
            import openvino as ov
    except ImportError:
        raise BundleError("%s is not installed on the device: pip install %s" % (package, package))
    try:
        if fmt == "onnx":
            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
            session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            return lambda batch: session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = ov.Core().compile_model(path, openvino_device, config)
        request = compiled.create_infer_request()
        return lambda batch: request.infer([np.ascontiguousarray(batch, dtype=np.float32)])[compiled.output(0)]
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError("%s %s cannot load this bundle: %s" % (package, _version(package), first))


def bench_one(folder, job, images, labels):
    """Accuracy on every image, then raw per-call times for each batch size, each call on different
    images; the caller computes the statistics. A failure is the row's status."""
    import numpy as np

    try:
        manifest = verify(folder)
        start = time.perf_counter()
        run = open_session(folder, manifest, job.get("threads"), job.get("openvino_device", "CPU"))
        run(images[:1])
        first_ms = (time.perf_counter() - start) * 1000.0
    except BundleError as e:
        return {"status": str(e)}
    logits = np.concatenate([np.asarray(run(images[i:i + 64])) for i in range(0, len(images), 64)])
    top5 = np.argsort(-logits, axis=1)[:, :5]
    times = {}
    for b in job["batch_sizes"]:
        count = max(1, min(job["runs"], len(images) // b))
        batches = [np.ascontiguousarray(images[i * b:(i + 1) * b]) for i in range(count)]
        times[str(b)] = time_calls(run, batches, job["warmup"], job["runs"])
    return {"status": None, "times": times,
            "accuracy": {"top1": float((logits.argmax(1) == labels).mean()),
                         "top5": float((top5 == labels[:, None]).any(1).mean()),
                         "predictions": logits.argmax(1).tolist()},
            "load": {"first_inference_ms": first_ms, "threads": job.get("threads") or os.cpu_count()}}


def bench(job_path):
    with open(job_path) as f:
        job = json.load(f)
    base = os.path.dirname(os.path.abspath(job_path))
    try:
        import numpy as np
    except ImportError:
        raise BundleError("numpy is not installed on the device: pip install numpy")
    images = np.load(os.path.join(base, job["images"]))
    labels = np.load(os.path.join(base, job["labels"]))
    rows = [dict(bench_one(os.path.join(base, b), job, images, labels), bundle=b) for b in job["bundles"]]
    return {"environment": environment(), "rows": rows}


def preprocess(image, spec):
    """PIL image -> (C, H, W) float32 exactly as the manifest says: mode, bilinear resize, /255, normalise."""
    import numpy as np
    from PIL import Image

    if image.mode != spec["color"]:
        image = image.convert(spec["color"])
    height, width = spec["resize"]
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(-1, 1, 1)
    return (pixels - mean) / std


def predict(folder, paths, top_k=1):
    import numpy as np
    from PIL import Image

    manifest = verify(folder)
    run = open_session(folder, manifest)
    batch = []
    for path in paths:
        with Image.open(path) as img:
            batch.append(preprocess(img, manifest["input"]))
    logits = np.asarray(run(np.stack(batch)), dtype=np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    results = []
    for path, p in zip(paths, probs):
        order = np.argsort(-p)[:top_k]
        results.append({"image": path, "top": [{"label": manifest["classes"][i], "index": int(i),
                                                "score": float(p[i])} for i in order]})
    return results


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
