"""A short FP32-vs-INT8 timing on the exporting machine, run in its own process so no PyTorch thread
pool competes with the runtimes: ``python -m edgekd.export.speed JOB.json`` prints a JSON result.

It measures a few hundred milliseconds per model and batch size, interleaving the two models so a
noisy neighbour slows both alike. It is a warning light, not a benchmark (that is ``edgekd bench``).
"""

import json
import sys
import time

BATCHES = (1, 32)
BUDGET_S = 0.25  # per model and batch size
# INT8 counts as faster only when it beats FP32 by more than timing noise.
FASTER = 1.1


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def time_pair(fp32, int8, batch):
    """Median ms per call of each model on the same batch, interleaved call by call."""
    fp32(batch), int8(batch), fp32(batch), int8(batch)  # warm-up
    times = {"fp32": [], "int8": []}
    spent = 0.0
    while spent < 2 * BUDGET_S and len(times["fp32"]) < 2000:
        for name, run in (("fp32", fp32), ("int8", int8)):
            t0 = time.perf_counter()
            run(batch)
            dt = time.perf_counter() - t0
            times[name].append(dt * 1000)
            spent += dt
    return {k: _median(v) for k, v in times.items()}


def measure(job):
    import numpy as np

    from ..bundle.runner import open_model

    fp32, _ = open_model(job["fp32_path"], job["fp32_format"])
    int8, _ = open_model(job["int8_path"], job["format"])
    rng = np.random.default_rng(0)
    rows = []
    for b in BATCHES:
        batch = rng.standard_normal((b, *job["shape"]), dtype=np.float32)
        ms = time_pair(fp32, int8, batch)
        rows.append({"batch_size": b, "fp32_ms": round(ms["fp32"], 4), "int8_ms": round(ms["int8"], 4),
                     "speedup": round(ms["fp32"] / ms["int8"], 3)})
    return rows


def main(job_path):
    from ..base.telemetry import switch_off

    switch_off()  # an edgekd process: OpenVINO telemetry off before the runtime is imported
    with open(job_path) as f:
        job = json.load(f)
    print(json.dumps(measure(job)))


if __name__ == "__main__":
    main(sys.argv[1])
