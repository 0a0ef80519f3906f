"""What a fit hands back: report.md, trials.csv / trials.json, pareto.png (and the failure report)."""

import csv
import io
import json
import math
import os
from typing import Any, Dict, List, Optional

from ..base.files import atomic_write
from .budget import Budget

COLUMNS = ("number", "state", "student", "size", "precision", "runtime", "p50_ms", "p90_ms", "size_mb", "mem_mb",
           "top1_short", "seconds", "worker")


def teacher_passes(cache: str) -> Dict[str, int]:
    """Teacher forward passes of the whole fit, counted from the shared cache: images x views held, per cache."""
    images = views = passes = 0
    if os.path.isdir(cache):
        for name in sorted(os.listdir(cache)):
            meta = os.path.join(cache, name, "meta.json")
            if not os.path.isfile(meta):
                continue
            with open(meta) as f:
                record = json.load(f)
            # the cache's checksummed index keeps what it holds in its description (edgekd.base.integrity)
            n = (record.get("description") or record).get("images") or 0
            held = len([v for v in os.listdir(os.path.join(cache, name)) if v.startswith("view-") and v.endswith(".npy")])
            images, views, passes = images + n, views + held, passes + n * held
    return {"images": images, "views": views, "passes": passes}


def _write(path: str, text: str) -> None:
    atomic_write(path, lambda tmp: open(tmp, "w").write(text))


def trial_table(summary: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per trial: its candidate, the candidate's untrained measurement and the trial's result."""
    by_key = {c["key"]: c for c in summary["candidates"]}
    rows = []
    for t in summary["trials"]:
        c = by_key.get(t["candidate"], {})
        rows.append({**{k: c.get(k) for k in ("student", "size", "precision", "runtime")},
                     **(c.get("measured") or {}), **{k: t.get(k) for k in ("number", "state", "top1_short", "seconds",
                                                                            "worker")}})
    return rows


def write_outputs(out: str, summary: Dict[str, Any], budget: Budget) -> None:
    """A finished fit's trials.csv, trials.json, pareto.png and report.md in ``out``."""
    rows = trial_table(summary)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    _write(os.path.join(out, "trials.csv"), buf.getvalue())
    record = {k: v for k, v in summary.items() if k != "command"}
    record["options"] = {k: v for k, v in vars(summary["command"]).items()}
    _write(os.path.join(out, "trials.json"), json.dumps(record, indent=2, default=str) + "\n")
    pareto_png(os.path.join(out, "pareto.png"), rows, summary["finalists"], budget)
    _write(os.path.join(out, "report.md"), report_md(summary, rows))


def pareto_png(path: str, rows: List[Dict[str, Any]], finalists: List[Dict[str, Any]], budget: Budget) -> None:
    """Top-1 against measured device latency: every trial (untrained latency), the finalists (trained), the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [(r["p50_ms"], r["top1_short"]) for r in rows if r.get("p50_ms") is not None and r.get("top1_short") is not None]
    if pts:
        xs, ys = zip(*pts)
        ax.scatter(xs, ys, s=18, alpha=0.6, label="trials (short schedule, untrained p50)")
    fin = [(f["measured"].get("p50_ms"), f["top1"]) for f in finalists if f.get("top1") is not None
           and f["measured"].get("p50_ms") is not None]
    if fin:
        xs, ys = zip(*fin)
        ax.scatter(xs, ys, s=40, marker="*", color="C3", label="finalists (full schedule, measured trained)")
    limit = budget.get("p50_ms")
    if limit:
        ax.axvline(limit.value, color="k", ls="--", lw=1, label=f"budget {limit}")
    spread = [x for x, _ in pts + fin] + ([limit.value] if limit else [])
    if spread and min(spread) > 0:
        ax.set_xscale("log")  # candidates span orders of magnitude; the budget line stays in view
    ax.set_xlabel("p50 latency on the device (ms)")
    ax.set_ylabel("top-1")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _num(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _start_from(finalists: List[Dict[str, Any]]) -> str:
    continued = {bool(f.get("from_trial")) for f in finalists}
    if continued == {True}:
        return "continued from their trials' weights"
    return "from scratch" if continued == {False} else "continued from their trials' weights where those were here"


def report_md(summary: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    """The report of a fit that found a winner: the winner, the finalists' estimates, every trial."""
    w, p = summary["winner"], summary["teacher_passes"]
    lines = [f"# edgekd fit: {w['key']} on {summary['device']}", "",
             f"Budget `{summary['budget']}`. Winner: {w['student']} at {w['size']} px, {w['precision']}, {w['runtime']}: "
             f"top-1 {_num(w['top1'], '.4f')}, p50 {_num(w['measured']['p50_ms'])} ms, p90 "
             f"{_num(w['measured']['p90_ms'])} ms, {_num(w['measured']['size_mb'])} MB, peak memory "
             f"{_num(w['measured']['mem_mb'], '.1f')} MB (measured again, trained, on the device). Bundle: `bundle/`.",
             "", f"Teacher forward passes: {p['passes']} ({p['images']} images x views, {p['views']} view(s) held, "
             f"for all {len(rows)} trials together).", "",
             f"Time: {_num(summary.get('seconds'), '.0f')} s for the whole fit; the finalists trained "
             f"{summary.get('finalist_epochs')} epochs each ({_start_from(summary['finalists'])}); a runner-up within "
             f"{_num(summary.get('finalist_margin'), '.2f')} of the best trial's short-schedule top-1 is a finalist.",
             "",
             "## Finalists (full schedule; untrained estimate against the trained bundle's measurement)", "",
             "| candidate | top-1 | p50 ms trained | p50 ms untrained | estimate error | size MB | meets |",
             "|---|---|---|---|---|---|---|"]
    for f in summary["finalists"]:
        m, u = f.get("measured") or {}, f.get("untrained") or {}
        err = (u.get("p50_ms") / m["p50_ms"] - 1) * 100 if m.get("p50_ms") and u.get("p50_ms") else None
        lines.append(f"| {f['key']} | {_num(f.get('top1'), '.4f')} | {_num(m.get('p50_ms'))} | {_num(u.get('p50_ms'))} | "
                     f"{_num(err, '+.1f')}% | {_num(m.get('size_mb'))} | {'yes' if not f['misses'] else 'no'} |")
    scored = summary.get("trial_test_subset")
    lines += ["", f"## Trials (short schedule; top-1 on {f'{scored} class-stratified' if scored else 'all'} test "
              "images; p50 untrained)", "", "| # | state | candidate | p50 ms | size MB | top-1 | worker |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['number']} | {r['state']} | {r['student']}@{r['size']}/{r['precision']}/{r['runtime']} | "
                     f"{_num(r.get('p50_ms'))} | {_num(r.get('size_mb'))} | {_num(r.get('top1_short'), '.4f')} | "
                     f"{r.get('worker') or '-'} |")
    lines += ["", "Files: trials.csv, trials.json, pareto.png, latency.json (the device's latency table), bundle/.", ""]
    return "\n".join(lines)


def write_failure(out: str, budget: Budget, candidates: List[Dict[str, Any]], opts: Any,
                  trials: Optional[List[Dict[str, Any]]] = None,
                  finalists: Optional[List[Dict[str, Any]]] = None) -> None:
    """report.md of a fit that found nothing within the budget: the closest candidates and by how much they miss."""
    ok = sorted((c for c in candidates if c["status"] == "ok"), key=lambda c: c["relative_miss"])
    lines = [f"# edgekd fit FAILED: nothing meets `{budget}` on {opts.device}", "",
             "No bundle was written. The closest candidates (untrained, measured on the device):", "",
             "| candidate | p50 ms | p90 ms | size MB | memory MB | misses by |", "|---|---|---|---|---|---|"]
    for c in ok[:10]:
        m = c["measured"]
        miss = ", ".join(f"{k} {v:.3g}" for k, v in (c["misses"] or {}).items()) or "-"
        lines.append(f"| {c['key']} | {_num(m['p50_ms'])} | {_num(m['p90_ms'])} | {_num(m['size_mb'])} | "
                     f"{_num(m['mem_mb'], '.1f')} | {miss} |")
    bad = [c for c in candidates if c["status"] != "ok"]
    if bad:
        lines += ["", "Not measurable: " + "; ".join(f"{c['key']}: {c['status']}" for c in bad[:10])]
    for f in finalists or []:
        lines.append(f"- finalist {f['key']}: top-1 {_num(f.get('top1'), '.4f')}, misses "
                     + ", ".join(f"{k} by {v:.3g}" for k, v in f["misses"].items()))
    _write(os.path.join(out, "report.md"), "\n".join(lines) + "\n")


def summary_lines(summary: Dict[str, Any], device: str, out: str) -> List[str]:
    """What ``edgekd fit`` prints at the end: the winner and the teacher's forward passes (a worker: its trials)."""
    if "joined" in summary:
        return [f"worker done: {summary['trials_run']} trial(s) run on {summary['joined']}"]
    w, p = summary["winner"], summary["teacher_passes"]
    return [f"winner {w['key']}: top-1 {w['top1']:.4f}, p50 {w['measured']['p50_ms']:.3f} ms on {device}, "
            f"{w['measured']['size_mb']:.3f} MB -> {out}/bundle",
            f"teacher forward passes: {p['passes']} ({p['images']} images x {p['views']} view(s))"]
