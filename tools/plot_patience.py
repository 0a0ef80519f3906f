"""The patience curve: a distilled student's test top-1 against its wall time (and epochs), one line per mode.

    python tools/plot_patience.py RUN_DIR [RUN_DIR ...] --out docs/distillation/patience-few-labels.png \
        [--teacher-top1 0.8145] [--table]

Each RUN_DIR is an `edgekd distill` output folder (its metrics.json gives the epochs, the views, the mix and the
last-epoch test top-1). A run's wall time is read from RUN_DIR.wall beside it (one number, seconds, as measured
from outside, e.g. with /usr/bin/time: start-up, the teacher cache's build when this run built it, training and
the test passes); without that file it falls back to the cache build plus the epochs' seconds from metrics.json,
and the table marks it with "~". A run that replayed a cache another run built (its build_seconds 0) is also
given a from-scratch wall: its wall plus that cache's build time (the largest build_seconds among the runs
given that used the same cache folder); the plot uses the from-scratch wall. Runs are grouped into lines by mode (loss, mix kind and alpha, views); each line
runs through its runs in order of wall time. The teacher's top-1 (from the first run's metrics.json unless
--teacher-top1) is drawn as a horizontal line. --table prints a Markdown table of every run.
"""

import argparse
import json
import os
import sys


def load_run(path):
    """One run's figures: mode, epochs, views, wall seconds (and whether measured), top-1, teacher top-1."""
    with open(os.path.join(path, "metrics.json")) as f:
        m = json.load(f)
    data = m.get("train_data", {})
    mix = data.get("mix")
    mode = m.get("loss", "?") + (f" + {mix['kind']} (alpha {mix['alpha']:g})" if mix else "")
    views = data.get("views")
    if views:
        mode += f", {views} views"
    wall_file = path.rstrip("/") + ".wall"
    measured = os.path.isfile(wall_file) and open(wall_file).read().strip() != ""
    if measured:
        wall = float(open(wall_file).read())
    else:  # cache build + epochs only: start-up and data loading are missing, hence the "~"
        wall = (m.get("teacher_cache") or {}).get("build_seconds", 0.0) + sum(h["seconds"] for h in m["history"])
    cache = m.get("teacher_cache") or {}
    return {"name": os.path.basename(path.rstrip("/")), "mode": mode, "epochs": m["epochs"], "views": views,
            "wall": wall, "measured": measured, "top1": m["test_top1"], "cache_build": cache.get("build_seconds"),
            "cache": cache.get("path"), "teacher_top1": (m.get("teacher") or {}).get("test_top1")}


def add_scratch_walls(runs):
    """Give each run ``scratch``: its wall plus its cache's build time when another run built that cache."""
    builds = {}
    for r in runs:
        if r["cache"]:
            builds[r["cache"]] = max(builds.get(r["cache"], 0.0), r["cache_build"] or 0.0)
    for r in runs:
        reused = r["cache"] and not r["cache_build"]
        r["scratch"] = r["wall"] + (builds[r["cache"]] if reused else 0.0)
    return runs


def markdown(runs):
    """A Markdown table of every run, in the order given."""
    lines = ["| run | mode | epochs | wall s | cache build s (in this run) | from scratch s | top-1 |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        wall = f"{r['wall']:.0f}" if r["measured"] else f"~{r['wall']:.0f}"
        build = "-" if r["cache_build"] is None else f"{r['cache_build']:.0f}"
        lines.append(f"| {r['name']} | {r['mode']} | {r['epochs']} | {wall} | {build} | {r['scratch']:.0f} | "
                     f"{100 * r['top1']:.2f}% |")
    return "\n".join(lines)


def plot(runs, out, teacher_top1):
    """Top-1 against wall time, one line per mode, each point labelled with its epochs; the teacher as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode in dict.fromkeys(r["mode"] for r in runs):  # first-seen order
        line = sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["scratch"])
        xs, ys = [r["scratch"] for r in line], [100 * r["top1"] for r in line]
        ax.plot(xs, ys, marker="o", label=mode)
        for r, x, y in zip(line, xs, ys):
            ax.annotate(f"{r['epochs']} ep", (x, y), textcoords="offset points", xytext=(4, -11), fontsize=8)
    if teacher_top1:
        ax.axhline(100 * teacher_top1, color="grey", linestyle="--", label=f"teacher {100 * teacher_top1:.2f}%")
    ax.set_xlabel("wall time from scratch, s (the mode's teacher cache build included), 1 core")
    ax.set_ylabel("student test top-1, %")
    ax.set_title("Patience on few-labels CIFAR-10 (2,000 labels + 48,000 unlabelled)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="edgekd distill output folders (each with metrics.json)")
    p.add_argument("--out", default="patience.png", help="the plot's file (default: %(default)s)")
    p.add_argument("--teacher-top1", type=float, default=None,
                   help="the teacher's top-1 as a fraction (default: from the first run's metrics.json)")
    p.add_argument("--table", action="store_true", help="also print a Markdown table of every run")
    args = p.parse_args(argv)
    missing = [r for r in args.runs if not os.path.isfile(os.path.join(r, "metrics.json"))]
    if missing:
        sys.exit(f"no metrics.json in {', '.join(missing)}: pass finished edgekd distill output folders")
    runs = add_scratch_walls([load_run(r) for r in args.runs])
    plot(runs, args.out, args.teacher_top1 if args.teacher_top1 is not None else runs[0]["teacher_top1"])
    print(f"wrote {args.out}")
    if args.table:
        print(markdown(runs))


if __name__ == "__main__":
    main()
