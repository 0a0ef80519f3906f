"""The benchmark's human side: markdown tables and report, CSV, plots, and comparison with an older run."""

import csv
import io
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..base.errors import EdgeKDError
from ..bundle.checks import load_json
from ..bundle.rows import BenchResult, BenchRow, BenchSettings, RecordError

BEST = "★ best"


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: Sequence[BenchRow]) -> str:
    """Markdown tables a person reads: one per batch size, one line per row, teacher first."""
    sizes = sorted({r.batch_size for r in rows})
    parts = []
    for b in sizes:
        if len(sizes) > 1:
            parts.append(f"**batch size {b}**\n")
        parts.append(_table([r for r in rows if r.batch_size == b]))
    return "\n\n".join(parts)


def _table(rows: Sequence[BenchRow]) -> str:
    head = ["model", "backend", "precision", "device", "top-1", "Δ top-1 (pts)", "top-5", "agree", "p50 ms", "p90 ms",
            "p99 ms", "img/s", "speedup", "first ms", "load MB", "params", "MFLOPs", "size MB", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        delta = r.top1_delta_vs_teacher
        lat = r.latency_ms
        cells = [
            r.model, r.backend, r.precision,
            r.device + (f" (emulated: {r.emulated})" if r.emulated else ""), _num(r.top1, ".4f"),
            "-" if delta is None else f"{delta * 100:+.2f}", _num(r.top5, ".4f"),
            _num(r.agreement_vs_teacher, ".4f"),
            _num(lat and lat.p50, ".3f"), _num(lat and lat.p90, ".3f"), _num(lat and lat.p99, ".3f"),
            _num(r.throughput_ips, ",.0f"),
            "-" if r.speedup_vs_teacher is None else f"{r.speedup_vs_teacher:.2f}x",
            _num(r.first_inference_ms, ",.0f"), _num(r.load_mb, ".1f"), _num(r.params, ","),
            "-" if r.flops is None else f"{r.flops / 1e6:.2f}", _num(r.size_mb, ".3f"),
            r.status + (f" {BEST}" if r.best else ""),
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def summary(rows: Sequence[BenchRow], max_drop: float) -> str:
    """One sentence per batch size naming the best deployment, in words."""
    lines = []
    for b in sorted({r.batch_size for r in rows}):
        group = [r for r in rows if r.batch_size == b]
        best = next((r for r in group if r.best), None)
        if best is None:
            lines.append(f"- batch {b}: no row other than the reference is within {max_drop * 100:.1f} pts of its top-1"
                         + _fastest(group) + ".")
            continue
        lines.append(f"- batch {b}: **{best.model}** ({best.backend}, {best.precision}, {best.device}): "
                     f"p50 {best.p50:.3f} ms, {best.speedup_vs_teacher:.2f}x the teacher's speed, "
                     f"top-1 {best.top1:.4f} ({(best.top1_delta_vs_teacher or 0.0) * 100:+.2f} pts), "
                     f"{best.throughput_ips:,.0f} images/s.")
    return "\n".join(lines)


def _fastest(group: Sequence[BenchRow]) -> str:
    """The fastest measured row outside the accuracy budget, named so the reader still sees the trade-off."""
    timed = [r for r in group[1:] if r.ok and not r.emulated and r.top1_delta_vs_teacher is not None]
    if not timed:
        return ""
    r = min(timed, key=lambda r: r.p50)
    return (f"; the fastest is {r.model} ({r.backend}, {r.precision}): p50 {r.p50:.3f} ms, "
            f"{r.speedup_vs_teacher:.2f}x the teacher's speed at {(r.top1_delta_vs_teacher or 0.0) * 100:+.2f} pts "
            "top-1 (--max-drop sets the budget)")


def _drift(rows: Sequence[BenchRow]) -> Optional[Tuple[float, BenchRow]]:
    """The largest spread of per-visit medians (max/min - 1) over the timed rows: how much the machine moved.

    Every visit counts here, those set aside as slow too: this is the machine's noise, not the figures'.
    """
    medians = [([v.p50_ms for v in r.visits] if r.visits else r.round_p50_ms or [], r) for r in rows if r.ok]
    spreads = [(max(m) / min(m) - 1, r) for m, r in medians if len(m) > 1 and min(m) > 0]
    return max(spreads, key=lambda s: s[0]) if spreads else None


def _remeasured(rows: Sequence[BenchRow], settings: BenchSettings) -> Optional[str]:
    """A sentence on the visits measured again because the machine ran slow around them (--remeasure-slow)."""
    tolerance = settings.remeasure_slow
    logged = [r.visits for r in rows if r.ok and r.visits]
    if not tolerance or not logged:
        return None
    total = sum(len(v) for v in logged)
    dropped = sum(not x.kept for v in logged for x in v)
    short = [r for r in rows if r.visits and len(r.round_p50_ms or []) < settings.rounds]
    text = (f"- Slow spells: a visit counts when the machine ran at full speed throughout it: its median, and "
            f"the slower of {settings.check_s * 1000:g} ms of untimed calls just before and just after it, "
            f"each within {tolerance * 100:g}% of the fastest among the row's visits (--remeasure-slow). Others were "
            f"measured again in extra rounds (at most {settings.max_extra_rounds}): {dropped} of {total} visits "
            f"were set aside; the figures use the other {total - dropped}, and results.json keeps every visit "
            "(`visits`).")
    if short:
        text += (f" {len(short)} row(s) kept fewer than {settings.rounds} visits after the extra rounds: "
                 + "; ".join(f"{r.model} {r.backend} batch {r.batch_size} ({len(r.round_p50_ms or [])})" for r in short)
                 + ".")
    return text


def markdown_report(result: BenchResult, comparison: Optional[str] = None) -> str:
    """report.md: the verdict, how it was measured, the tables, the plots, the machine."""
    rows, s = result.rows, result.settings
    ref = rows[0]
    threads = sorted({str(r.threads) for r in rows if r.ok})
    lines = [
        "# edgekd benchmark", "",
        f"Reference (first row): **{ref.model}** ({ref.backend}, {ref.device}). Best deployment "
        f"(fastest with top-1 within {s.max_drop * 100:.1f} pts of the reference), marked {BEST} in the tables:", "",
        summary(rows, s.max_drop), "",
        "## How it was measured", "",
        f"- Data: `{result.data}`, test split, {ref.images} held-out images"
        + (f" (capped by --limit {s.limit})" if s.limit and ref.images == s.limit else "") + "; top-1/top-5 over all of them.",
        f"- Every model, backend and device in its own worker process, loaded once; latency of each call on a "
        f"different batch of real images; {s.warmup} warm-up calls, then {s.runs} timed calls per model and "
        f"batch size (at least {s.min_time_s:g} s and at most {s.max_time_s:g} s of them) in {s.rounds} interleaved rounds, so machine drift lands on "
        "every model alike.",
        f"- Threads: {s.threads or 'each library default'} (in use: {', '.join(threads) or '-'}); "
        f"CPUs pinned: {','.join(map(str, s.cpus)) if s.cpus else 'no'}.",
        "- first ms: load + compile + first call; load MB: resident memory added by loading and the first call.",
    ]
    lines += _notes(result)
    lines += ["", "## Results", "", table(rows), "",
              "![accuracy against latency](accuracy_vs_latency.png)", "",
              "![latency by model, backend and precision](latency.png)", ""]
    if s.profile:
        lines += where_the_time_goes(rows)
    if comparison:
        lines += ["## Compared with an earlier run", "", "```", comparison, "```", ""]
    return "\n".join(lines + _environment(result))


def _notes(result: BenchResult) -> List[str]:
    """report.md's notes on precision, emulation, slow spells, noise and load, where they apply."""
    rows, env, lines = result.rows, result.environment, []
    ov = sorted({f"{r.model} {r.runtime_precision}" for r in rows if r.runtime_precision})
    if ov:
        lines.append("- OpenVINO CPU inference precision (fp32 bundles are held to f32; the CPU plugin would pick bf16 "
                     f"on CPUs with AVX-512 BF16 or AMX): {', '.join(ov)}.")
    emulated = sorted({f"{r.device} ({r.emulated})" for r in rows if r.emulated})
    if emulated:
        lines.append(f"- Emulated devices: {', '.join(emulated)}. Their rows are numerics (top-1, agreement) only: "
                     "emulated timings are not latency (hundreds to thousands of times slower than the board, and "
                     "not by a constant factor), so they are neither ranked nor compared for speed.")
    remeasured = _remeasured(rows, result.settings)
    if remeasured:
        lines.append(remeasured)
    drift = _drift(rows)
    if drift:
        lines.append(f"- Noise: the medians of one row's visits differed by up to {drift[0] * 100:.0f}% "
                     f"({drift[1].model}, {drift[1].backend}, batch {drift[1].batch_size}).")
    start, end = env.loadavg_start, env.loadavg_end
    if start and end:
        busy = max(start[0], end[0]) > len(env.usable_cpus or [1])
        lines.append(f"- Load average (1 min) {start[0]:.2f} at start, {end[0]:.2f} at end"
                     + (" — other work was running on this machine; compare rows within this run, as ratios." if busy else "."))
    return lines


def _environment(result: BenchResult) -> List[str]:
    """report.md's last section: the machine and the software."""
    env = result.environment
    v = env.versions
    return ["## Environment", "",
            f"- CPU: {env.cpu} ({env.cores} cores, usable {len(env.usable_cpus or [])})",
            f"- {env.platform}, Python {env.python}, edgekd {env.edgekd} (commit {env.git_commit or 'n/a'})",
            "- " + ", ".join(f"{k} {v[k]}" for k in sorted(v)),
            f"- started {env.started_utc}; command: `{env.command}`", ""]


PROFILE_TYPES = 5  # operator types named per row in report.md
PROFILE_LAYERS = 3  # and its slowest layers


def _precisions(shares: Dict[str, float]) -> str:
    """{"int8": 0.8, "fp32": 0.2} -> "int8 80% / fp32 20%" (largest first); one precision alone is just named."""
    total = sum(shares.values()) or 1.0
    parts = sorted(shares.items(), key=lambda kv: -kv[1])
    if len(parts) == 1:
        return parts[0][0]
    return " / ".join(f"{k} {v / total * 100:.0f}%" for k, v in parts)


def where_the_time_goes(rows: Sequence[BenchRow]) -> List[str]:
    """report.md's --profile section: per row, the operator types that take the time and what precision they ran in."""
    lines = ["## Where the time goes", "",
             "Per-operator time of each ONNX Runtime and OpenVINO row on the CPU, from a second session with profiling "
             "on, run after all timing (ONNX Runtime's profiler; OpenVINO's performance counters). Profiling adds a "
             "little to every operator, so read the shares, not the totals. The precision is what each operator ran "
             "in: OpenVINO's exec type (e.g. jit_avx512_I8), ONNX Runtime's quantized kernels (QLinearConv, "
             "ConvInteger, ...) or the operator's input type. An INT8 model is faster only where its time moves into "
             "int8 kernels and the added Quantize/Dequantize (Reorder, Convert) steps cost less than they save.", ""]
    for r in rows:
        head = f"- **{r.model}** ({r.backend}, {r.precision}, {r.device}, batch {r.batch_size})"
        p = r.profile
        if not p:
            lines.append(f"{head}: {r.profile_note or 'not profiled'}")
            continue
        types = ", ".join(f"{t.op_type} {t.share * 100:.0f}% ({_precisions(t.precision)})"
                          for t in p.by_type[:PROFILE_TYPES])
        layers = ", ".join(f"{x.name} {x.share * 100:.0f}% ({x.exec_type or x.precision})"
                           for x in p.by_layer[:PROFILE_LAYERS])
        lines.append(f"{head}: {p.total_ms:.3f} ms of operators per call, ran in "
                     f"{_precisions(p.precision_share)}; by type: {types}; slowest layers: {layers}")
    return lines + ["", "![time share by operator type](profile.png)", ""]


CSV_COLUMNS = ["model", "backend", "precision", "device", "batch_size", "status", "best", "top1", "top5",
               "top1_delta_vs_teacher", "agreement_vs_teacher", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms",
               "min_ms", "max_ms", "runs", "throughput_ips", "speedup_vs_teacher", "first_inference_ms", "load_mb",
               "peak_rss_mb", "threads", "params", "flops", "size_mb", "images", "path"]


def csv_text(rows: Sequence[BenchRow]) -> str:
    """results.csv: one flat line per row (latency fields spelled out)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        flat = r.to_json()
        for k, v in (r.latency_ms.to_json() if r.latency_ms else {}).items():
            flat[f"{k}_ms" if k != "runs" else k] = v
        w.writerow(flat)
    return buf.getvalue()


def pareto_front(points: Sequence[tuple]) -> List[tuple]:
    """The (latency, accuracy, ...) points no other point beats on both: sorted by latency, accuracy rising."""
    front: List[tuple] = []
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or p[1] > front[-1][1]:
            front.append(p)
    return front


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _name(r: BenchRow) -> str:
    return f"{r.model} · {r.backend} {r.precision}" + ("" if r.device == "cpu" else f" · {r.device}")


def plot_accuracy_latency(rows: Sequence[BenchRow], path: str) -> None:
    """Top-1 against median latency at the smallest batch size, log latency axis, with the Pareto front."""
    plt = pyplot()
    b = min(r.batch_size for r in rows)
    ok = [r for r in rows if r.batch_size == b and r.ok and not r.emulated and r.top1 is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    points = [(r.p50, (r.top1 or 0.0) * 100, r) for r in ok]
    front = pareto_front(points)
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", linestyle="--",
                label="Pareto front", zorder=2)
    markers = "os^DvP<>Xh"
    for i, (x, y, r) in enumerate(points):
        label = _name(r) + (" (reference)" if r is rows[0] else "") + (" ★ best" if r.best else "")
        ax.scatter(x, y, s=110 if r is rows[0] else 50, marker="*" if r is rows[0] else markers[i % len(markers)],
                   zorder=3, edgecolors="red" if r.best else "none", linewidths=1.5, label=label)
    if points:
        ax.set_xscale("log")
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, frameon=False)
    else:
        ax.text(0.5, 0.5, "no row was measured", ha="center", transform=ax.transAxes)
    ax.set_xlabel(f"median latency at batch {b} (ms, log scale; left is faster)")
    ax.set_ylabel("top-1 on held-out test images (%)")
    ax.set_title("accuracy against latency")
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, plt, path)


def plot_latency(rows: Sequence[BenchRow], path: str) -> None:
    """Per model/backend/precision: a dot at p50, a tick at p90, a line to p99; one panel per batch size."""
    plt = pyplot()
    sizes = sorted({r.batch_size for r in rows})
    labels = list(dict.fromkeys(_name(r) for r in rows))
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes) + 2.8, 0.45 * len(labels) + 1.7), dpi=120,
                             squeeze=False, sharey=True)
    for ax, b in zip(axes[0], sizes):
        by_name = {_name(r): r for r in rows if r.batch_size == b and r.ok and not r.emulated}
        for i, n in enumerate(labels):
            r = by_name.get(n)
            if r is None or r.latency_ms is None:
                ax.text(0.02, i, "not measured", va="center", fontsize=7, color="grey", transform=ax.get_yaxis_transform())
                continue
            lat = r.latency_ms
            color = "tab:orange" if r.best else "tab:blue"
            ax.plot([lat.p50, lat.p99], [i, i], color=color, linewidth=3, alpha=0.5, solid_capstyle="butt")
            ax.plot([lat.p50], [i], "o", color=color)
            ax.plot([lat.p90], [i], "|", color="black", markersize=12)
            ax.annotate(f"{lat.p50:.3g}", (lat.p50, i), textcoords="offset points", xytext=(0, 6), fontsize=7,
                        ha="center")
        if by_name:
            ax.set_xscale("log")
        ax.set_title(f"batch {b}")
        ax.set_xlabel("latency (ms, log): dot p50, tick p90, bar to p99")
        ax.grid(True, axis="x", which="both", alpha=0.3)
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0][0].set_ylim(len(labels) - 0.5, -0.7)
    fig.suptitle("latency by model, backend and precision (orange: best deployment)", fontsize=10)
    save_figure(fig, plt, path)


def plot_profile(rows: Sequence[BenchRow], path: str) -> None:
    """--profile: per profiled row a horizontal bar of time share by operator type (the same colour per type)."""
    plt = pyplot()
    done = [(r, r.profile) for r in rows if r.profile]
    totals: Dict[str, float] = {}
    for _, p in done:
        for t in p.by_type:
            totals[t.op_type] = totals.get(t.op_type, 0.0) + t.share
    named = sorted(totals, key=lambda k: -totals[k])[:11]  # the rest is "other": 12 colours stay distinguishable
    colors = {op: plt.get_cmap("tab20")(i) for i, op in enumerate(named + ["other"])}
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(done) + 2.0), dpi=120)
    labelled = set()
    for i, (r, p) in enumerate(done):
        shares: Dict[str, float] = {}
        for t in p.by_type:
            op = t.op_type if t.op_type in named else "other"
            shares[op] = shares.get(op, 0.0) + t.share
        left = 0.0
        for op in [o for o in named + ["other"] if shares.get(o, 0) > 0]:
            ax.barh(i, shares[op] * 100, left=left * 100, color=colors[op], edgecolor="white", linewidth=0.5,
                    label=None if op in labelled else op)
            labelled.add(op)
            if shares[op] >= 0.08:
                ax.text((left + shares[op] / 2) * 100, i, f"{shares[op] * 100:.0f}%", ha="center", va="center",
                        fontsize=7)
            left += shares[op]
    labels = [f"{_name(r)} · batch {r.batch_size}\nran in {_precisions(p.precision_share)}, "
              f"{p.total_ms:.3g} ms/call profiled" for r, p in done]
    ax.set_yticks(range(len(done)), labels, fontsize=7)
    ax.set_ylim(len(done) - 0.5, -0.5)
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of operator time (%)")
    if done:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    else:
        ax.text(0.5, 0.5, "no row was profiled (ONNX Runtime and OpenVINO rows on the CPU are)", ha="center",
                transform=ax.transAxes)
    ax.set_title("where the time goes: share of operator time by type, per row (--profile)")
    save_figure(fig, plt, path)


def save_figure(fig: Any, plt: Any, path: str) -> None:
    """Write ``fig`` as a PNG at ``path`` and free it."""
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def load_results(path: str) -> BenchResult:
    """An earlier results.json, checked to be one."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    if not os.path.isfile(path):
        raise EdgeKDError(f"--compare: {path!r} does not exist (expected an earlier results.json)")
    old = load_json(path, "--compare: results file", EdgeKDError)  # bounded: size, nesting
    try:
        return BenchResult.from_json(old)
    except RecordError as e:
        raise EdgeKDError(f"--compare: {path!r} is not an edgekd results.json (no rows)") from e


Key = Tuple[Any, ...]


def _key(r: BenchRow, batch: bool = True) -> Key:
    return (r.model, r.backend, r.precision, r.device) + ((r.batch_size,) if batch else ())


def compare_results(old: BenchResult, new: BenchResult, old_path: Optional[str], tolerance: float = 0.10) -> str:
    """Text naming what got faster or slower (p50 beyond ``tolerance``), more or less accurate, added or gone."""
    olds = {_key(r): r for r in old.rows}
    news = {_key(r): r for r in new.rows}
    faster: List[str] = []
    slower: List[str] = []
    better: List[str] = []
    worse: List[str] = []
    steady = 0
    seen_acc = set()
    for k, r in news.items():
        o = olds.get(k)
        if o is None:
            continue
        name = f"{r.model} {r.backend} {r.precision} {r.device}"
        if r.ok and o.ok:
            a, b = o.p50, r.p50
            line = f"  {name} batch {r.batch_size}: p50 {a:.3f} -> {b:.3f} ms"
            if b < a / (1 + tolerance):
                faster.append(f"{line} ({a / b:.2f}x faster)")
            elif b > a * (1 + tolerance):
                slower.append(f"{line} ({b / a:.2f}x slower)")
            else:
                steady += 1
        if _key(r, False) not in seen_acc and r.top1 is not None and o.top1 is not None:
            seen_acc.add(_key(r, False))
            d = r.top1 - o.top1
            line = f"  {name}: top-1 {o.top1:.4f} -> {r.top1:.4f} ({d * 100:+.2f} pts)"
            (better if d > 0 else worse if d < 0 else []).append(line)
    pct = f"{tolerance * 100:.0f}%"
    out = [f"compared with {old_path} (measured {old.environment.started_utc or '?'})"]
    if old.environment.cpu != new.environment.cpu:
        out.append(f"note: different CPU ({old.environment.cpu}); speed changes may be the machine")
    for title, items in ((f"faster (p50 down by more than {pct})", faster), (f"slower (p50 up by more than {pct})", slower),
                         ("more accurate", better), ("less accurate", worse)):
        out.append(f"{title}:" + ("" if items else " none"))
        out.extend(items)
    out.append(f"within ±{pct}: {steady} row(s)")
    gone = [k for k in olds if k not in news]
    added = [k for k in news if k not in olds]
    for title, keys in (("only in this run", added), ("only in the earlier run", gone)):
        if keys:
            out.append(f"{title}: " + "; ".join(f"{k[0]} {k[1]} {k[2]} {k[3]} batch {k[4]}" for k in keys))
    return "\n".join(out)
