"""The patience curve: a distilled student's test top-1 against its time (and epochs), one line per mode.

    python tools/plot_patience.py RUN_DIR [RUN_DIR ...] --out docs/distillation/patience-few-labels.png \
        [--time wall|cpu] [--teacher-top1 0.8145] [--mark SECONDS:LABEL] [--table]

Each RUN_DIR is an `edgekd distill` output folder (its metrics.json gives the epochs, the views, the mix and the
last-epoch test top-1). A run's times are measured from outside and read from files beside the folder: RUN_DIR.wall
(wall seconds) and RUN_DIR.cpu (user + system seconds of the process and its loader workers), one number each, as
/usr/bin/time prints them; they cover start-up, the teacher cache's build when this run built it, training and
the test passes. On a core shared with other work the wall time stretches and the CPU time does not, so --time cpu
compares runs made under different load (on an idle core the two agree within a few per cent). Without RUN_DIR.wall
the wall falls back to the cache build plus the epochs' seconds from metrics.json, marked "~" in the table.

A run that replayed a cache another run built (its build_seconds 0) is also given a from-scratch time: its own
plus that cache's build (the largest build_seconds among the runs given, and those named by --builds, that used
the same cache folder; in CPU seconds, the build's wall scaled by the building run's CPU/wall ratio).
The plot uses the from-scratch times. Runs are grouped into lines by mode (loss, mix kind and alpha, views), each
line in order of time; each point is labelled with its epochs. The teacher's top-1 (from the first run's
metrics.json unless --teacher-top1) is drawn as a horizontal line. --table prints a Markdown table of every run.
"""

import argparse
import json
import os
import sys


def _number(path):
    """The number in a one-number file, or None when it is missing or empty."""
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    return float(text) if text else None


def load_run(path):
    """One run's figures: mode, epochs, views, wall and CPU seconds, cache build, top-1, teacher top-1."""
    with open(os.path.join(path, "metrics.json")) as f:
        m = json.load(f)
    data, cache = m.get("train_data", {}), m.get("teacher_cache") or {}
    mix = data.get("mix")
    mode = m.get("loss", "?") + (f" + {mix['kind']} alpha {mix['alpha']:g}" if mix else "")
    if data.get("views"):
        mode += f", {data['views']} views"
    base = path.rstrip("/")
    wall, cpu = _number(base + ".wall"), _number(base + ".cpu")
    measured = wall is not None
    if not measured:  # cache build + epochs only: start-up and data loading are missing, hence the "~"
        wall = cache.get("build_seconds", 0.0) + sum(h["seconds"] for h in m["history"])
    return {"name": os.path.basename(base), "mode": mode, "epochs": m["epochs"], "wall": wall, "cpu": cpu,
            "measured": measured, "top1": m["test_top1"], "cache": cache.get("path"),
            "cache_build": cache.get("build_seconds"), "teacher_top1": (m.get("teacher") or {}).get("test_top1")}


def add_scratch_times(runs, builders=()):
    """Give each run ``scratch_wall`` and ``scratch_cpu``: its own time plus its cache's build when another run
    built that cache (CPU: the build's wall times the builder's CPU/wall ratio)."""
    builds = {}
    for r in [*runs, *builders]:
        if r["cache"] and (r["cache_build"] or 0.0) > builds.get(r["cache"], (0.0, 1.0))[0]:
            ratio = r["cpu"] / r["wall"] if r["cpu"] else 1.0
            builds[r["cache"]] = (r["cache_build"], ratio)
    for r in runs:
        build, ratio = builds.get(r["cache"], (0.0, 1.0)) if r["cache"] and not r["cache_build"] else (0.0, 1.0)
        r["scratch_wall"] = r["wall"] + build
        r["scratch_cpu"] = None if r["cpu"] is None else r["cpu"] + build * ratio
    return runs


def markdown(runs):
    """A Markdown table of every run, in the order given."""
    lines = ["| run | mode | epochs | wall s | CPU s | cache build s (wall, in this run) | from scratch: wall s | "
             "from scratch: CPU s | top-1 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        wall = f"{r['wall']:.0f}" if r["measured"] else f"~{r['wall']:.0f}"
        cpu = "-" if r["cpu"] is None else f"{r['cpu']:.0f}"
        build = "-" if not r["cache_build"] else f"{r['cache_build']:.0f}"
        s_cpu = "-" if r["scratch_cpu"] is None else f"{r['scratch_cpu']:.0f}"
        lines.append(f"| {r['name']} | {r['mode']} | {r['epochs']} | {wall} | {cpu} | {build} | "
                     f"{r['scratch_wall']:.0f} | {s_cpu} | {100 * r['top1']:.2f}% |")
    return "\n".join(lines)


def plot(runs, out, teacher_top1, basis, marks=()):
    """Top-1 against from-scratch time, one line per mode, each point labelled with its epochs; the teacher as a
    dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "scratch_" + basis
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for mode in dict.fromkeys(r["mode"] for r in runs):  # first-seen order
        line = sorted((r for r in runs if r["mode"] == mode and r[key] is not None), key=lambda r: r[key])
        xs, ys = [r[key] for r in line], [100 * r["top1"] for r in line]
        ax.plot(xs, ys, marker="o", label=mode)
        for r, x, y in zip(line, xs, ys):
            ax.annotate(f"{r['epochs']} ep", (x, y), textcoords="offset points", xytext=(4, -11), fontsize=8)
    if teacher_top1:
        ax.axhline(100 * teacher_top1, color="grey", linestyle="--", label=f"teacher {100 * teacher_top1:.2f}%")
    for x, label in marks:
        ax.axvline(x, color="black", linestyle=":", linewidth=1)
        ax.annotate(label, (x, ax.get_ylim()[0]), textcoords="offset points", xytext=(3, 4), fontsize=8)
    what = "CPU time (user + system), s" if basis == "cpu" else "wall time, s"
    ax.set_xlabel(f"{what}, from scratch (the mode's teacher cache build included), 1 core")
    ax.set_ylabel("student test top-1, %")
    ax.set_title("Patience on few-labels CIFAR-10 (2,000 labels + 48,000 unlabelled)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, 0.92))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)


def _refuse(message):
    """Bad input: one line on stderr, exit 2."""
    print(f"plot_patience: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="edgekd distill output folders (each with metrics.json)")
    p.add_argument("--out", default="patience.png", help="the plot's file (default: %(default)s)")
    p.add_argument("--time", choices=("wall", "cpu"), default="wall",
                   help="the plot's time axis: wall seconds, or CPU seconds from RUN_DIR.cpu (default: %(default)s)")
    p.add_argument("--teacher-top1", type=float, default=None,
                   help="the teacher's top-1 as a fraction (default: from the first run's metrics.json)")
    p.add_argument("--mark", action="append", default=[], metavar="SECONDS:LABEL",
                   help="a dotted vertical line at SECONDS on the time axis, e.g. '582:2x kd 5 epochs' (repeatable)")
    p.add_argument("--builds", action="append", default=[], metavar="RUN_DIR",
                   help="a run not drawn whose teacher cache build counts for the runs that replayed its cache "
                        "(repeatable)")
    p.add_argument("--table", action="store_true", help="also print a Markdown table of every run")
    args = p.parse_args(argv)
    missing = [r for r in [*args.runs, *args.builds] if not os.path.isfile(os.path.join(r, "metrics.json"))]
    if missing:
        _refuse(f"no metrics.json in {', '.join(missing)}: pass finished edgekd distill output folders")
    runs = add_scratch_times([load_run(r) for r in args.runs], [load_run(r) for r in args.builds])
    if args.time == "cpu" and any(r["cpu"] is None for r in runs):
        _refuse("--time cpu: every run needs RUN_DIR.cpu (user + system seconds); use --time wall")
    try:
        marks = [(float(m.split(":", 1)[0]), m.split(":", 1)[1] if ":" in m else "") for m in args.mark]
    except ValueError:
        _refuse(f"--mark {args.mark}: expected SECONDS:LABEL, e.g. '582:2x kd 5 epochs'")
    teacher = args.teacher_top1 if args.teacher_top1 is not None else runs[0]["teacher_top1"]
    plot(runs, args.out, teacher, args.time, marks)
    print(f"wrote {args.out}")
    if args.table:
        print(markdown(runs))


if __name__ == "__main__":
    main()
