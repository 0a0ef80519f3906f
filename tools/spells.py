"""Does this machine have slow spells? A bare ONNX Runtime loop, watched over time, with no harness.

    python tools/spells.py BUNDLE [--seconds 60] [--window 0.5] [--threads 1,2] [--plot spells.png]

One ONNX Runtime session per thread count, all in this process; they take turns, each calling
``session.run`` on real test images for one window at a time. Each window's median latency is one
point of a time series. On a quiet machine the series is flat; on a shared VM it has spells where
every call runs slower for seconds at a time, whatever the code does. A window counts as slow when
its median is more than ``--tolerance`` percent above the series' fastest window. This is the reason
``edgekd bench --remeasure-slow`` exists, and the command docs/records/bench.md names for its figures.
"""

import argparse
import json
import os
import sys
import tempfile
import time


def watch(bundle, seconds=60.0, window=0.5, threads=(1, 2), batch_size=1, limit=1000):
    """Per thread count, the median latency (ms) of every window, the windows taking turns across the sessions."""
    import numpy as np
    import onnxruntime as ort

    from edgekd.bundle import verify_bundle
    from edgekd.bench.measure import save_images
    from edgekd.bench.plan import describe

    manifest = verify_bundle(bundle)
    d = describe(bundle)
    with tempfile.TemporaryDirectory(prefix="edgekd-spells-") as folder:
        images, _, _, _ = save_images(d.data or "digits", None, d.input, limit, os.path.join(folder, "img"))
        x = np.load(images)
    per = max(1, len(x) // batch_size)
    batches = [x[k * batch_size:(k + 1) * batch_size] for k in range(per)] if len(x) >= batch_size else [x]
    sessions = {}
    for n in threads:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = n, 1
        sessions[n] = ort.InferenceSession(os.path.join(bundle, manifest.model_file), opts,
                                           providers=["CPUExecutionProvider"])
    name = next(iter(sessions.values())).get_inputs()[0].name
    series = {n: [] for n in threads}
    k, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        for n, sess in sessions.items():
            for _ in range(20):  # the other session's threads ran last: warm this one's up, untimed
                sess.run(None, {name: batches[k % per]})
                k += 1
            times, stop = [], time.perf_counter() + window
            while time.perf_counter() < stop or len(times) < 3:
                t0 = time.perf_counter()
                sess.run(None, {name: batches[k % per]})
                times.append((time.perf_counter() - t0) * 1000)
                k += 1
            series[n].append(float(np.median(times)))
    return series


def summarize_series(series, tolerance=0.15, window=0.5):
    """Per thread count: fastest and median window, the share of slow windows and the longest slow spell."""
    out = []
    for n, values in series.items():
        floor = min(values)
        slow = [v > floor * (1 + tolerance) for v in values]
        longest = run = 0
        for s in slow:
            run = run + 1 if s else 0
            longest = max(longest, run)
        ordered = sorted(values)
        out.append({"threads": n, "windows": len(values), "fastest_ms": floor, "median_ms": ordered[len(values) // 2],
                    "slowest_ms": ordered[-1], "slow_share": sum(slow) / len(values),
                    "longest_spell_s": longest * window * len(series)})
    return out


def plot_series(series, path, window):
    from edgekd.bench.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.2), dpi=120)
    for n, values in series.items():
        ax.plot([i * window * len(series) for i in range(len(values))], values, ".-", linewidth=0.8, markersize=3,
                label=f"{n} thread(s)")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel(f"median latency per {window:g} s window (ms)")
    ax.set_title("a bare session.run loop over time: slow spells are the machine, not the code")
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    save_figure(fig, plt, path)


def main(argv=None):
    from edgekd import EdgeKDError
    from edgekd.cli import csv_list, positive_float, positive_int

    p = argparse.ArgumentParser(prog="python tools/spells.py", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", help="an ONNX bundle folder (edgekd export --format onnx)")
    p.add_argument("--seconds", type=positive_float, default=60.0, help="how long to watch (default: %(default)g)")
    p.add_argument("--window", type=positive_float, default=0.5, help="seconds per window and session (default: %(default)g)")
    p.add_argument("--threads", type=csv_list("positive whole numbers", positive_int), default=[1, 2],
                   metavar="N[,N...]",
                   help="ONNX Runtime intra-op thread counts, one session each (default: 1,2)")
    p.add_argument("--batch-size", type=positive_int, default=1, metavar="N",
                   help="images per call, a positive whole number (default: %(default)s)")
    p.add_argument("--tolerance", type=positive_float, default=15.0, metavar="PCT",
                   help="a window slower than the fastest by more than this counts as slow (default: %(default)g)")
    p.add_argument("--plot", metavar="PNG", help="also draw the series")
    p.add_argument("--json", action="store_true", help="print the summary and the series as JSON")
    args = p.parse_args(argv)
    try:
        series = watch(args.bundle, args.seconds, args.window, args.threads, args.batch_size)
    except EdgeKDError as e:
        print(f"spells: error: {e}", file=sys.stderr)
        return 2
    summary = summarize_series(series, args.tolerance / 100, args.window)
    if args.plot:
        plot_series(series, args.plot, args.window)
    if args.json:
        print(json.dumps({"summary": summary, "series": {str(n): v for n, v in series.items()}}, indent=2))
        return 0
    for s in summary:
        print(f"{s['threads']} thread(s): {s['windows']} windows, fastest {s['fastest_ms']:.4f} ms, median "
              f"{s['median_ms']:.4f}, slowest {s['slowest_ms']:.4f}; {s['slow_share'] * 100:.0f}% of windows more "
              f"than {args.tolerance:g}% slower than the fastest, longest slow spell {s['longest_spell_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
