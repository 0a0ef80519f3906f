"""``edgekd bench``, results: one row per job and batch size against the reference (the first model), the
best deployment, the environment, and results.json, results.csv, report.md and the plots."""

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timezone
from functools import partial
from typing import List, Optional, Sequence

from .. import __version__
from ..base.files import atomic_write
from ..bundle.environment import environment
from ..bundle.manifest import library_versions
from ..bundle.rows import BenchEnvironment, BenchResult, BenchRow, Load, Profile
from .plan import Job
from .report import csv_text, markdown_report, plot_accuracy_latency, plot_latency, plot_profile
from .stats import timing

log = logging.getLogger(__name__)


def attach_profiles(rows: List[BenchRow], jobs: Sequence[Job]) -> None:
    """Each row's profile (by operator type and top layers, with precisions), or None and why in profile_note."""
    for i, row in enumerate(rows):
        got = (job_of(jobs, row).profile or {}).get(row.batch_size)
        if isinstance(got, Profile):
            rows[i] = replace(row, profile=got)
        else:
            rows[i] = replace(row, profile=None, profile_note=got or (
                "not profiled: " + (row.status if not row.ok else "rows on SSH devices are not profiled")))


def _row(job: Job, b: int) -> BenchRow:
    """The row of one job at batch size ``b`` (before the comparison with the reference)."""
    acc, close = job.accuracy, job.close
    load = job.load or Load()
    times = job.times.get(b)
    status = job.status or job.batch_status.get(b)
    row = BenchRow(model=job.model, backend=job.backend, precision=job.precision, device=job.device, arch=job.arch,
                   params=job.params, flops=job.flops, size_mb=job.size_mb, path=job.path, batch_size=b,
                   images=job.images_n, top1=acc.top1 if acc else None, top5=acc.top5 if acc else None,
                   emulated=job.emulated or None, first_inference_ms=load.first_inference_ms, load_mb=load.load_mb,
                   threads=load.threads, affinity=load.affinity, runtime_device=load.runtime_device,
                   runtime_precision=load.runtime_precision, gpu=load.gpu,
                   peak_rss_mb=close.peak_rss_mb if close else None, gpu_peak_mb=close.gpu_peak_mb if close else None)
    if status or not times:
        return replace(row, status=status or "no timings")
    latency, throughput = timing(times, b)
    return replace(row, latency_ms=latency, throughput_ips=throughput, round_p50_ms=job.round_p50[b], status="ok",
                   visits=job.visit_log.get(b) or None)


def build_rows(jobs: Sequence[Job], batch_sizes: Sequence[int]) -> List[BenchRow]:
    """One row per job and batch size, with speedup, top-1 delta and agreement against the first job."""
    rows = [_row(job, b) for job in jobs for b in batch_sizes]
    refs = {r.batch_size: r for r in rows[:len(batch_sizes)]}
    return [_against_reference(row, refs[row.batch_size], job_of(jobs, row), jobs[0]) for row in rows]


def job_of(jobs: Sequence[Job], row: BenchRow) -> Job:
    return next(j for j in jobs if (j.model, j.backend, j.device) == (row.model, row.backend, row.device))


def _against_reference(row: BenchRow, ref_row: BenchRow, job: Job, ref_job: Job) -> BenchRow:
    # an emulated device's timings are not latency: no speedup against a real one (nor the other way)
    timed = row.ok and ref_row.ok and not row.emulated and not ref_row.emulated
    both = row.top1 is not None and ref_row.top1 is not None
    mine = job.accuracy.predictions if job.accuracy else None
    theirs = ref_job.accuracy.predictions if ref_job.accuracy else None
    agreement = None
    if mine is not None and theirs is not None and len(mine) == len(theirs):
        agreement = sum(a == b for a, b in zip(mine, theirs)) / len(mine)
    return replace(row, speedup_vs_teacher=ref_row.p50 / row.p50 if timed else None,
                   top1_delta_vs_teacher=row.top1 - ref_row.top1 if both else None,  # type: ignore[operator]
                   agreement_vs_teacher=agreement)


def mark_best(rows: List[BenchRow], max_drop: float) -> None:
    """Per batch size, the fastest row other than the reference whose top-1 is within ``max_drop`` of it."""
    for b in sorted({r.batch_size for r in rows}):
        group = [r for r in rows if r.batch_size == b]
        ref = group[0]
        for r in group:
            r.best = False
        if ref.top1 is None:
            continue
        fit = [r for r in group[1:] if r.ok and not r.emulated and r.top1 is not None
               and r.top1 >= ref.top1 - max_drop]
        if fit:
            min(fit, key=lambda r: r.p50).best = True


def _loadavg() -> Optional[List[float]]:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _git_commit() -> Optional[str]:
    """The commit of the edgekd source tree this runs from (None outside a git checkout), '+dirty' if edited."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def bench_environment(threads: Optional[int], cpus: Optional[List[int]]) -> BenchEnvironment:
    """The machine and software a benchmark was measured on: the bundle layer's ``environment()`` (the record
    the device runner also reports) with the benchmark's own settings, the CPU ids it may run on
    (``usable_cpus`` in results.json) and its library versions."""
    versions = library_versions(("torch", "torchvision", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "numpy",
                                 "matplotlib"))
    allowed_cpu_ids = sorted(os.sched_getaffinity(0))
    return BenchEnvironment.from_json({
        **environment(), "usable_cpus": allowed_cpu_ids, "threads_requested": threads, "cpus_pinned": cpus,
        "edgekd": __version__, "git_commit": _git_commit(), "versions": versions,
        "command": " ".join(("edgekd", *sys.argv[1:])),
        "started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "loadavg_start": _loadavg()})


def write_outputs(out: str, result: BenchResult, comparison: Optional[str] = None) -> None:
    """results.json, results.csv, report.md, the two plots (and compare.md), each written atomically."""
    os.makedirs(out, exist_ok=True)
    texts = {"results.json": json.dumps(result.to_json(), indent=2) + "\n", "results.csv": csv_text(result.rows),
             "report.md": markdown_report(result, comparison)}
    if comparison:
        texts["compare.md"] = comparison + "\n"
    for name, text in texts.items():
        atomic_write(os.path.join(out, name), partial(_write_text, text=text))
        os.chmod(os.path.join(out, name), 0o644)  # the temporary file was private; a report is for sharing
    plots: List[tuple] = [("accuracy_vs_latency.png", plot_accuracy_latency), ("latency.png", plot_latency)]
    if result.settings.profile:
        plots.append(("profile.png", plot_profile))
    for name, plot in plots:
        try:
            atomic_write(os.path.join(out, name), partial(plot, result.rows))
            os.chmod(os.path.join(out, name), 0o644)
        except ImportError:
            log.warning("matplotlib is not installed; %s not written", name)


def _write_text(path: str, *, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
