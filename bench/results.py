"""``edgekd bench``, results: one row per job and batch size against the reference (the first model), the
best deployment, the environment, and results.json, results.csv, report.md and the plots."""

import json
import logging
import os
import subprocess
import sys
from datetime import datetime, timezone

from .. import __version__
from ..bundle.environment import environment
from ..bundle.manifest import library_versions
from .report import csv_text, markdown_report, plot_accuracy_latency, plot_latency, plot_profile
from .stats import summarize

log = logging.getLogger(__name__)


def attach_profiles(rows, jobs):
    """Each row's profile (by operator type and top layers, with precisions), or None and why in profile_note."""
    for row in rows:
        got = (job_of(jobs, row).profile or {}).get(row["batch_size"])
        row["profile"] = got if isinstance(got, dict) else None
        if row["profile"] is None:
            row["profile_note"] = got or ("not profiled: " + (row["status"] if row["status"] != "ok" else
                                                              "rows on SSH devices are not profiled"))
ROW_FROM_JOB = ("model", "backend", "precision", "device", "arch", "params", "flops", "size_mb", "path")
ROW_FROM_LOAD = ("first_inference_ms", "load_mb", "threads", "affinity", "runtime_device", "runtime_precision", "gpu")


def build_rows(jobs, batch_sizes):
    """One row per job and batch size, with speedup, top-1 delta and agreement against the first job."""
    ref = jobs[0]
    rows = []
    for job in jobs:
        acc, load, close = job.accuracy or {}, job.load or {}, job.close or {}
        for b in batch_sizes:
            row = {k: getattr(job, k) for k in ROW_FROM_JOB}
            row.update(batch_size=b, images=job.images_n, top1=acc.get("top1"), top5=acc.get("top5"))
            if job.emulated:
                row["emulated"] = job.emulated
            row.update({k: load[k] for k in ROW_FROM_LOAD if k in load})
            row.update({k: close[k] for k in ("peak_rss_mb", "gpu_peak_mb") if k in close})
            times = (job.times or {}).get(b)
            status = job.status or (job.batch_status or {}).get(b)
            if status or not times:
                row.update(latency_ms=None, throughput_ips=None, status=status or "no timings")
            else:
                row.update(summarize(times, b), round_p50_ms=job.round_p50[b], status="ok")
                if job.visit_log.get(b):
                    row["visits"] = job.visit_log[b]
            rows.append(row)
    refs = {r["batch_size"]: r for r in rows[:len(batch_sizes)]}
    for row in rows:
        _against_reference(row, refs[row["batch_size"]], job_of(jobs, row), ref)
    return rows


def job_of(jobs, row):
    return next(j for j in jobs if (j.model, j.backend, j.device) == (row["model"], row["backend"], row["device"]))


def _against_reference(row, ref_row, job, ref_job):
    # an emulated device's timings are not latency: no speedup against a real one (nor the other way)
    timed = row["status"] == "ok" and ref_row["status"] == "ok" and not row.get("emulated") and not ref_row.get("emulated")
    row["speedup_vs_teacher"] = ref_row["latency_ms"]["p50"] / row["latency_ms"]["p50"] if timed else None
    both = row["top1"] is not None and ref_row["top1"] is not None
    row["top1_delta_vs_teacher"] = row["top1"] - ref_row["top1"] if both else None
    mine = (job.accuracy or {}).get("predictions")
    theirs = (ref_job.accuracy or {}).get("predictions")
    if mine is not None and theirs is not None and len(mine) == len(theirs):
        row["agreement_vs_teacher"] = sum(a == b for a, b in zip(mine, theirs)) / len(mine)
    else:
        row["agreement_vs_teacher"] = None


def mark_best(rows, max_drop):
    """Per batch size, the fastest row other than the reference whose top-1 is within ``max_drop`` of it."""
    for b in sorted({r["batch_size"] for r in rows}):
        group = [r for r in rows if r["batch_size"] == b]
        ref = group[0]
        for r in group:
            r["best"] = False
        if ref["top1"] is None:
            continue
        fit = [r for r in group[1:] if r["status"] == "ok" and not r.get("emulated") and r["top1"] is not None
               and r["top1"] >= ref["top1"] - max_drop]
        if fit:
            min(fit, key=lambda r: r["latency_ms"]["p50"])["best"] = True


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _git_commit():
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


def bench_environment(threads, cpus):
    """The machine and software a benchmark was measured on: the bundle layer's ``environment()`` (the record
    the device runner also reports) with the benchmark's own settings, the CPU ids it may run on
    (``usable_cpus`` in results.json) and its library versions."""
    env = environment()
    versions = library_versions(("torch", "torchvision", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "numpy",
                                 "matplotlib"))
    allowed_cpu_ids = sorted(os.sched_getaffinity(0))
    env.update({"usable_cpus": allowed_cpu_ids, "threads_requested": threads, "cpus_pinned": cpus,
                "edgekd": __version__, "git_commit": _git_commit(), "versions": versions,
                "command": " ".join(["edgekd"] + sys.argv[1:]),
                "started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "loadavg_start": _loadavg()})
    return env


def write_outputs(out, result, comparison=None):
    """results.json, results.csv, report.md, the two plots (and compare.md), each written atomically."""
    from ..base.files import atomic_write

    os.makedirs(out, exist_ok=True)
    texts = {"results.json": json.dumps(result, indent=2) + "\n", "results.csv": csv_text(result["rows"]),
             "report.md": markdown_report(result, comparison)}
    if comparison:
        texts["compare.md"] = comparison + "\n"
    for name, text in texts.items():
        atomic_write(os.path.join(out, name), lambda tmp, text=text: _write_text(tmp, text))
        os.chmod(os.path.join(out, name), 0o644)  # the temporary file was private; a report is for sharing
    plots = [("accuracy_vs_latency.png", plot_accuracy_latency), ("latency.png", plot_latency)]
    if any("profile" in r for r in result["rows"]):
        plots.append(("profile.png", plot_profile))
    for name, plot in plots:
        try:
            atomic_write(os.path.join(out, name), lambda tmp, plot=plot: plot(result["rows"], tmp))
            os.chmod(os.path.join(out, name), 0o644)
        except ImportError:
            log.warning("matplotlib is not installed; %s not written", name)


def _write_text(path, text):
    with open(path, "w") as f:
        f.write(text)
