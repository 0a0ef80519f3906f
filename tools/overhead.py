"""How much the bench harness adds to what it measures: ONNX Runtime timed by the harness's worker
against a bare ``session.run`` loop, both in fresh processes, alternated, on the same images.

    python tools/overhead.py BUNDLE [--batch-sizes 1,32] [--runs 300] [--repeats 3] [--threads N]

Prints one line per batch size and, with --json, the figures as JSON. A ratio near 1.00 means the
harness's own work (the worker protocol, slicing, the backend wrapper) does not show in its numbers.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from edgekd.bench.process import WorkerProcess
from edgekd.bench.stats import summarize

# A loop anyone would write: one session, pre-sliced batches of real images, perf_counter around run().
BARE_LOOP = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
model, images, batch, runs, warmup, threads = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
x = np.load(images)
opts = ort.SessionOptions()
if threads:
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
name = sess.get_inputs()[0].name
per = max(1, len(x) // batch)
batches = [x[(k % per) * batch:(k % per + 1) * batch] for k in range(warmup + runs)]
for b in batches[:warmup]:
    sess.run(None, {name: b})
times = []
for b in batches[warmup:]:
    t0 = time.perf_counter()
    sess.run(None, {name: b})
    times.append((time.perf_counter() - t0) * 1000)
print(json.dumps(times))
"""


def bare_times(model_file, images, batch, runs, warmup, threads):
    proc = subprocess.run([sys.executable, "-c", BARE_LOOP, model_file, images, str(batch), str(runs), str(warmup),
                           str(threads or 0)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def harness_times(bundle, images, labels, batch, runs, warmup, threads, log_path):
    worker = WorkerProcess(log_path)
    try:
        worker.request("load", backend="onnxruntime", path=os.path.abspath(bundle), device="cpu", threads=threads,
                       images=images, labels=labels)
        return worker.request("time", batch_size=batch, runs=runs, warmup=warmup, max_s=None)["times_ms"]
    finally:
        worker.close()


def measure_overhead(bundle, batch_sizes=(1,), runs=300, warmup=20, repeats=3, threads=None, limit=1000):
    """Alternate bare and harness processes ``repeats`` times per batch size; return the p50s and their ratio."""
    import numpy as np

    from edgekd.bundle import verify_bundle
    from edgekd.bench.measure import save_images
    from edgekd.bench.plan import describe

    manifest = verify_bundle(bundle)
    d = describe(bundle)
    out = []
    with tempfile.TemporaryDirectory(prefix="edgekd-overhead-") as folder:
        images, labels, _, _ = save_images(d.data or "digits", None, d.input, limit, os.path.join(folder, "img"))
        model_file = os.path.join(bundle, manifest.model_file)
        for b in batch_sizes:
            bare, harness = [], []
            for i in range(repeats):
                bare += bare_times(model_file, images, b, runs, warmup, threads)
                harness += harness_times(bundle, images, labels, b, runs, warmup, threads,
                                         os.path.join(folder, f"w{b}-{i}.log"))
            p_bare = summarize(bare, b)["latency_ms"]["p50"]
            p_harness = summarize(harness, b)["latency_ms"]["p50"]
            out.append({"batch_size": b, "bare_p50_ms": p_bare, "harness_p50_ms": p_harness,
                        "ratio": p_harness / p_bare, "runs_each": len(bare),
                        "bare_mean_ms": float(np.mean(bare)), "harness_mean_ms": float(np.mean(harness))})
    return out


def main(argv=None):
    from edgekd import EdgeKDError

    p = argparse.ArgumentParser(prog="python tools/overhead.py", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", help="an ONNX bundle folder")
    p.add_argument("--batch-sizes", default="1", help="comma list (default: %(default)s)")
    p.add_argument("--runs", type=int, default=300, help="timed calls per process (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls first (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="bare/harness process pairs (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    p.add_argument("--limit", type=int, default=1000, help="test images to cycle through (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    try:
        rows = measure_overhead(args.bundle, [int(b) for b in args.batch_sizes.split(",")], args.runs, args.warmup,
                                args.repeats, args.threads, args.limit)
    except EdgeKDError as e:
        print(f"overhead: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"batch {r['batch_size']}: bare session.run p50 {r['bare_p50_ms']:.4f} ms, harness p50 "
                  f"{r['harness_p50_ms']:.4f} ms, ratio {r['ratio']:.3f} ({r['runs_each']} calls each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
