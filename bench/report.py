"""The benchmark's human side: a markdown table, a report and an accuracy-vs-latency plot."""

import os


def _num(value, fmt):
    return "-" if value is None else format(value, fmt)


def table(rows):
    """A markdown table a person reads: one line per model, teacher first."""
    head = ["model", "device", "backend", "precision", "top-1", "Δ top-1 (pts)", "p50 ms", "p90 ms", "p99 ms", "speedup",
            "params", "MFLOPs", "size MB", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        lat = r.get("latency_ms") or {}
        delta = r.get("top1_delta_vs_teacher")
        cells = [
            r["model"], r.get("device", "cpu"), r["backend"], r["precision"], _num(r.get("top1"), ".4f"),
            "-" if delta is None else f"{delta * 100:+.2f}",
            _num(lat.get("p50"), ".3f"), _num(lat.get("p90"), ".3f"), _num(lat.get("p99"), ".3f"),
            "-" if r.get("speedup_vs_teacher") is None else f"{r['speedup_vs_teacher']:.2f}x",
            _num(r.get("params"), ","), "-" if r.get("flops") is None else f"{r['flops'] / 1e6:.2f}",
            _num(r.get("size_mb"), ".3f"), r.get("status", "?"),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def markdown_report(result):
    env = result["environment"]
    rows = result["rows"]
    n_images = rows[0].get("images") if rows else 0
    ok = [r for r in rows if r.get("status") == "ok"]
    runs = ok[0]["latency_ms"]["runs"] if ok else 0
    threads = ", ".join(f"{r['model']}: {r.get('threads')}" for r in ok)
    v = env["versions"]
    return "\n".join([
        "# edgekd benchmark",
        "",
        f"Data: `{result['data']}`, test split, {n_images} held-out images. "
        f"Latency: batch 1, {runs} timed runs on different images after warm-up, each model in its own process. "
        "Speedup and Δ top-1 are against the first row (the teacher).",
        "",
        table(rows),
        "",
        "## Environment",
        "",
        f"- CPU: {env['cpu']} ({env['cores']} cores); threads: {threads or '-'}",
        f"- {env['platform']}, Python {env['python']}",
        "- " + ", ".join(f"{k} {v[k]}" for k in sorted(v)),
        f"- command: `{env['command']}`",
        "",
    ]) + "\n"


def plot_accuracy_latency(rows, path):
    """Top-1 against median batch-1 latency, one labelled point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in ok:
        ax.scatter(r["latency_ms"]["p50"], r["top1"] * 100, s=40)
        ax.annotate(f"{r['model']} ({r['backend']})", (r["latency_ms"]["p50"], r["top1"] * 100),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("median batch-1 latency (ms, log scale)")
    ax.set_ylabel("top-1 on held-out test images (%)")
    ax.set_title("accuracy vs latency")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
