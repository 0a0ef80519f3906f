"""The device runner's commands (env, verify, bench, predict, check, logits) and its entry point ``main``."""

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, List, Optional, Sequence

from ..base.errors import BundleError
from .checks import RUNTIME_PACKAGE, check_outputs
from .environment import environment, library_version, time_calls
from .manifest import Parity, verify
from .preprocessing import load_images, printable
from .rows import Accuracy, DeviceRow, Load, Record
from .sessions import in_batches_of, message, open_model, open_session

# What the runner prints when its arguments are not one of its commands.
USAGE = """edgekd device runner: runs edgekd bundles with the device's own Python (3.8+), numpy and the bundle's
runtime (onnxruntime or openvino; Pillow for predict) - never torch, never an edgekd install.

    python3 device_runner.py env
    python3 device_runner.py verify BUNDLE_DIR
    python3 device_runner.py bench JOB.json          # prints {"environment": ..., "rows": [...]}
    python3 device_runner.py predict BUNDLE_DIR IMAGE... [--json] [--top-k K]
    python3 device_runner.py check BUNDLE_DIR        # verify, load, one batch, the manifest's parity images
    python3 device_runner.py logits JOB.json         # export's gate on a device: a model file's logits
"""


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
    def read(cls, path: str) -> "BenchJob":
        """The job in a JSON file; keys this runner does not know (from a newer edgekd) are left alone."""
        with open(path) as f:
            values = json.load(f)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_json(self) -> str:
        """The job as JSON, for the device."""
        return json.dumps(asdict(self))


@dataclass
class LogitsJob:
    """What ``logits JOB.json`` asks for (edgekd.export.target writes it): a model file, its format and precision,
    the images (.npy beside the job file), where to save the logits, and a static batch if the model has one."""

    model: str
    format: str
    images: str
    out: str
    precision: Optional[str] = None
    static_batch: Optional[int] = None

    @classmethod
    def read(cls, path: str) -> "LogitsJob":
        """The job in a JSON file; keys this runner does not know are left alone."""
        with open(path) as f:
            values = json.load(f)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class Scored(Record):
    """One class of a prediction: its name, its index in the model's output, its softmax score (None: not finite)."""

    label: str
    index: int
    score: Optional[float]


@dataclass
class Prediction(Record):
    """predict's answer for one image: the top classes, best first; ``finite`` is written only when False."""

    image: Any
    top: List[Scored]
    finite: Optional[bool] = None
    OPTIONAL = frozenset({"finite"})


@dataclass
class CheckResult(Record):
    """What ``check BUNDLE_DIR`` prints: the bundle ran one batch here, and how many parity images agreed."""

    ok: bool
    output_shape: List[int]
    runtime_device: Optional[str]
    runtime_precision: Optional[str]
    parity_images: int = 0


def bench_one(folder: str, job: BenchJob, images: Any, labels: Any) -> DeviceRow:
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
        return DeviceRow(status=str(e))
    logits = np.concatenate([np.asarray(run(images[i:i + 64])) for i in range(0, len(images), 64)])
    bad = int((~np.isfinite(logits)).any(1).sum())
    if bad:  # a top-1 of NaN rows is no answer: the row fails, by name
        return DeviceRow(status="failed: the model returned non-finite outputs (NaN or infinity) for %d images" % bad)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    times = {}  # type: Dict[str, List[float]]
    skipped = {}  # type: Dict[str, str]
    static = manifest.static_batch
    for b in job.batch_sizes:
        if static and b != static:
            skipped[str(b)] = unsupported_batch(static, b)
            continue
        count = max(1, min(job.runs, len(images) // b))
        batches = [np.ascontiguousarray(images[i * b:(i + 1) * b]) for i in range(count)]
        times[str(b)] = time_calls(run, batches, job.warmup, job.runs)
    accuracy = Accuracy(top1=float((logits.argmax(1) == labels).mean()),
                        top5=float((top5 == labels[:, None]).any(1).mean()), predictions=logits.argmax(1).tolist())
    threads = Load.from_json(info).threads or job.threads or os.cpu_count()
    return DeviceRow(status=None, times=times, batch_status=skipped, accuracy=accuracy,
                     load=Load(first_inference_ms=first_ms, threads=threads))


def unsupported_batch(static: int, b: int) -> str:
    """The status of a batch size that a static-batch bundle cannot run."""
    return "not run: the bundle has a static batch of %d (exported for a target whose runtime needs it)" % static


def bench(job_path: str) -> Dict[str, Any]:
    """The device's environment and one row per bundle of the BenchJob in ``job_path``."""
    job = BenchJob.read(job_path)
    base = os.path.dirname(os.path.abspath(job_path))
    try:
        import numpy as np
    except ImportError:
        raise BundleError("numpy is not installed on the device: pip install numpy")
    images = np.load(os.path.join(base, job.images))
    labels = np.load(os.path.join(base, job.labels))
    rows = [replace(bench_one(os.path.join(base, b), job, images, labels), bundle=b) for b in job.bundles]
    return {"environment": environment(), "rows": [row.to_json() for row in rows]}


def ranked(paths: Sequence[Any], logits: Any, classes: List[str], k: int = 1) -> List[Dict[str, Any]]:
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
        top = [Scored(label=classes[i], index=int(i), score=float(p[i]) if finite else None) for i in order]
        results.append(Prediction(image=path, top=top, finite=None if finite else False).to_json())
    return results


def text_lines(results: List[Dict[str, Any]]) -> List[str]:
    """predict's text output: one line per image, names from files escaped."""
    lines = []
    for r in map(Prediction.from_json, results):
        scores = ", ".join("%s %s" % (printable(t.label), "nan" if t.score is None else "%.4f" % t.score)
                           for t in r.top)
        lines.append(printable(str(r.image)) + ": " + scores + ("" if r.finite is not False else
                                                                   " (the model returned non-finite scores)"))
    return lines


def predict(folder: str, paths: Sequence[Any], k: int = 1) -> List[Dict[str, Any]]:
    """The top ``k`` classes of each image file, by the verified bundle in ``folder``."""
    manifest = verify(folder)
    run, _ = open_session(folder, manifest)
    return ranked(paths, run(load_images(paths, manifest.input)), manifest.classes, k)


def agreement(parity: Parity, logits: Any) -> Optional[str]:
    """Why the logits of the manifest's parity images disagree with the exporting machine's (``parity``), or None.

    FP32 and FP16 are held to the bundle's own logit tolerance; INT8 (whose integer kernels differ between
    CPUs) to top-1 agreement on at least ``min_agreement`` of the images.
    """
    import numpy as np

    expected = np.asarray(parity.logits, dtype=np.float64)
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape != expected.shape:
        return "output shape %s, the exporting machine's was %s" % (logits.shape, expected.shape)
    if not np.isfinite(logits).all():
        return "the output holds NaN or infinity"
    if parity.atol is not None:
        diff = float(np.abs(logits - expected).max())
        if not diff <= parity.atol:
            return "max |logit difference| %.3g from the exporting machine's exceeds %g on %d parity images" % (
                diff, parity.atol, len(expected))
    same = float((logits.argmax(1) == expected.argmax(1)).mean())
    if not same >= parity.min_agreement:
        return "top-1 agrees with the exporting machine's on %.0f%% of %d parity images (needs %.0f%%)" % (
            same * 100, len(expected), parity.min_agreement * 100)
    return None


def check(folder: str) -> Dict[str, Any]:
    """What deploy runs on the device before installing: verify, load (compile), one batch, and the
    manifest's parity images against the logits the exporting machine recorded."""
    import numpy as np

    manifest = verify(folder)
    run, info = open_session(folder, manifest)
    (h, w), parity = manifest.resize, manifest.parity
    try:
        out = np.asarray(run(np.zeros((manifest.static_batch or 1, manifest.channels, h, w), dtype=np.float32)))
        load = Load.from_json(info)
        result = CheckResult(ok=True, output_shape=list(out.shape), runtime_device=load.runtime_device,
                             runtime_precision=load.runtime_precision)
        if parity:
            images = np.load(os.path.join(folder, parity.file))
            problem = agreement(parity, run(images))
            if problem:
                raise BundleError("parity check failed on this device: " + problem)
            result.parity_images = len(images)
    except BundleError:
        raise
    except Exception as e:
        runtime = RUNTIME_PACKAGE[manifest.format]  # the schema allows only its keys
        raise BundleError("%s %s cannot run this bundle: %s" % (runtime, library_version(runtime), message(e)))
    return result.to_json()


def logits(job_path: str) -> Dict[str, Any]:
    """Export's parity gate on a device: a LogitsJob -> the model file's logits on the images, saved to ``out``
    (.npy)."""
    import numpy as np

    job = LogitsJob.read(job_path)
    base = os.path.dirname(os.path.abspath(job_path))
    run, info = open_model(os.path.join(base, job.model), job.format, precision=job.precision or "f32")
    if job.static_batch:
        run = in_batches_of(run, job.static_batch)
    images = np.load(os.path.join(base, job.images))
    out = np.concatenate([np.asarray(run(images[i:i + 64])) for i in range(0, len(images), 64)])
    np.save(os.path.join(base, job.out), out.astype(np.float32))
    return {"environment": environment(), "runtime": info}


def main(argv: List[str]) -> int:
    """The runner's command line; exit status 0, or 2 with one line on stderr."""
    try:  # the arguments: a command, its path(s), predict's --top-k K (a whole number from 1)
        top_k = int(argv[argv.index("--top-k") + 1]) if "--top-k" in argv else 1
        known = argv[0] in ("env", "verify", "bench", "predict", "check", "logits") and top_k >= 1 \
            and len(argv) > {"env": 0, "predict": 2}.get(argv[0], 1)
    except (IndexError, ValueError):
        known = False
    if not known:
        print(USAGE, file=sys.stderr)
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

