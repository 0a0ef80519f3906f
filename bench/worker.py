"""One model measured in its own process: ``python -m edgekd.bench.worker JOB.json RESULT.json``.

Reads preprocessed test images from a .npy file, measures first-inference time, accuracy over all
images, and batch-1 latency over many different images after a warm-up.
"""

import json
import sys
import time


def percentile(sorted_values, q):
    """Linear-interpolated percentile of an already sorted list (numpy-free, tiny)."""
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def measure(job):
    import resource

    import numpy as np

    from .backends import BACKENDS

    images = np.load(job["images"])
    labels = np.load(job["labels"])
    start = time.perf_counter()
    run, info = BACKENDS.get(job["backend"])(job["path"], job.get("threads"), job["device"])
    run(images[:1])
    first_ms = (time.perf_counter() - start) * 1000

    # Accuracy on every image, in batches (the batch size does not change the answer).
    logits = np.concatenate([np.asarray(run(images[i:i + 64])) for i in range(0, len(images), 64)])
    preds = logits.argmax(1)
    top5 = np.argsort(-logits, axis=1)[:, :5]

    # Batch-1 latency: a different real image each call, cycling through the split.
    singles = [np.ascontiguousarray(images[i:i + 1]) for i in range(min(len(images), job["runs"]))]
    for i in range(job["warmup"]):
        run(singles[i % len(singles)])
    times = []
    for i in range(job["runs"]):
        x = singles[i % len(singles)]
        t0 = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    mean = sum(times) / len(times)
    return {
        "top1": float((preds == labels).mean()),
        "top5": float((top5 == labels[:, None]).any(1).mean()),
        "predictions": preds.tolist(),
        "latency_ms": {"p50": percentile(times, 50), "p90": percentile(times, 90), "p99": percentile(times, 99),
                       "mean": mean, "std": (sum((t - mean) ** 2 for t in times) / len(times)) ** 0.5,
                       "min": times[0], "runs": len(times)},
        "throughput_ips": 1000.0 / mean,
        "first_inference_ms": first_ms,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": info["threads"],
    }


def main(job_path, result_path):
    from .. import EdgeKDError

    with open(job_path) as f:
        job = json.load(f)
    try:
        result = {"status": "ok", **measure(job)}
    except EdgeKDError as e:
        result = {"status": str(e)}
    except Exception as e:  # a failing model becomes a row with its reason, never a crashed benchmark
        result = {"status": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
