"""``edgekd bench``, measuring: test images per input spec, a worker process per job (load, accuracy, then
timed visits in interleaved rounds, slow visits measured again), the bundles on SSH devices, profiles."""

import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..base import ssh
from ..base.errors import EdgeKDError
from ..base.progress import bar as progress_bar
from ..bundle.manifest import MANIFEST_FILE
from ..bundle.rows import Accuracy, BenchSettings, Load, MachineEnvironment, Profile, VisitLog
from ..core.data import InputSpec, load_data, take_images
from .plan import Job, Visit
from .process import WorkerProcess
from .protocol import AccuracyRequest, CloseAnswer, LoadRequest, ProfileRequest, TimeAnswer, TimeRequest
from .remote import bench_bundles, check_device as probe
from .stats import p50, schedule, split_runs

Live = Tuple[Job, Any]  # a job and its worker (a WorkerProcess, or a stand-in with its request method)

log = logging.getLogger(__name__)

ACCURACY_BATCH = 64
SETTLE_S = 0.2  # pause between visits so the last worker's spinning threads go idle before the next is timed
CHECK_S = 0.05  # untimed calls before and after each visit that read the machine's state (see Worker.check)
EXTRA_ROUNDS = 2  # --remeasure-slow: at most this many times --rounds extra rounds
EXPORT_VAL_IMAGES = 200
PROFILE_RUNS = 20  # --profile: profiled calls per row and batch size (operator shares settle within a few)


def _ssh_targets(devices: Sequence[str], ssh_config: Optional[str], timeout: int) -> Dict[str, ssh.Target]:
    """Parse and probe every ssh:// device up front, so an unreachable one fails before any measuring."""
    targets: Dict[str, ssh.Target] = {}
    for device in devices:
        if device.startswith("ssh://"):
            targets[device] = ssh.parse_target(device, ssh_config)
            probe(targets[device], timeout)
    return targets


def _steps_per_job(settings: BenchSettings) -> int:
    """Progress steps of one job: a load, an accuracy pass and its visits."""
    return 2 + settings.rounds * len(settings.batch_sizes)


def _measure_remote(jobs: Sequence[Job], targets: Dict[str, ssh.Target], settings: BenchSettings, timeout: int,
                    bar: Any) -> Dict[str, MachineEnvironment]:
    """Run the bundles on each SSH device (one trip per device and input spec); fill the jobs as local workers do."""
    per_job = _steps_per_job(settings)
    envs: Dict[str, MachineEnvironment] = {}
    groups: Dict[Tuple[str, Optional[str], Optional[str]], List[Job]] = {}
    for job in jobs:
        if job.status:
            bar.update(per_job if job.images else 0)
            continue
        groups.setdefault((job.device, job.images, job.labels), []).append(job)
    for (device, images, labels), group in groups.items():
        bar.set_postfix_str(f"{len(group)} bundle(s) on {targets[device]}")
        env, results = bench_bundles(targets[device], [(j.model, j.run_path or j.path) for j in group], images or "",
                                     labels or "", settings.batch_sizes, settings.warmup, settings.runs,
                                     settings.threads, timeout)
        envs[device] = env
        for job in group:
            r = results[job.model]
            job.status, job.accuracy, job.load = r.status, r.accuracy, r.load
            job.times = {int(b): t for b, t in (r.times or {}).items()}
            job.batch_status.update({int(b): t for b, t in (r.batch_status or {}).items()})
            if env.emulated:  # detected on the device by the runner: its timings are not latency
                job.emulated = env.emulated
            job.round_p50 = {b: [p50(t)] for b, t in job.times.items()}
            bar.update(per_job)
    return envs


def _prepare(jobs: Sequence[Job], data_spec: str, data_root: Optional[str], limit: Optional[int], folder: str) -> None:
    """Preprocessed test images per input spec (shared by every job with it) and ONNX files for checkpoints."""
    images: Dict[str, Tuple[str, str, List[str], int]] = {}
    onnx: Dict[str, Tuple[Optional[str], Optional[str]]] = {}
    for i, job in enumerate(jobs):
        if job.status:
            continue
        key = json.dumps([job.input.channels, job.input.height, job.input.width, job.input.mean,
                          job.input.std])
        if key not in images:
            images[key] = save_images(data_spec, data_root, job.input, limit, os.path.join(folder, f"images{len(images)}"))
        job.images, job.labels, classes, job.images_n = images[key]
        if len(job.classes) != len(classes):
            job.status = f"model has {len(job.classes)} classes, data {data_spec!r} has {len(classes)}"
        elif job.kind == "checkpoint" and job.backend != "torch":
            if job.path not in onnx:
                onnx[job.path] = _export_onnx(job.path, data_spec, data_root, os.path.join(folder, f"onnx{i}"))
            job.run_path, reason = onnx[job.path]
            job.status = reason
            if job.run_path is not None:
                job.size_mb = sum(os.path.getsize(os.path.join(job.run_path, f))
                                     for f in os.listdir(job.run_path) if f != MANIFEST_FILE) / 1e6
        else:
            job.run_path = job.path


def save_images(data_spec: str, data_root: Optional[str], spec: InputSpec, limit: Optional[int],
                stem: str) -> Tuple[str, str, List[str], int]:
    """``limit`` test images of the data, preprocessed to ``spec``, saved as .npy files at ``stem`` (what a worker
    reads); returns (images path, labels path, class names, count)."""
    import numpy as np

    data = load_data(data_spec, data_root, input_spec=spec)
    images, labels = take_images(data.test, limit)
    np.save(stem + ".npy", images.numpy())
    np.save(stem + "-labels.npy", labels.numpy())
    return stem + ".npy", stem + "-labels.npy", data.classes, len(labels)


def _export_onnx(checkpoint: str, data_spec: str, data_root: Optional[str],
                 out: str) -> Tuple[Optional[str], Optional[str]]:
    """An ONNX FP32 file of a checkpoint, checked against PyTorch, for running it in ONNX Runtime or OpenVINO."""
    from ..export.pipeline import ExportOptions, export_checkpoint

    try:
        export_checkpoint(checkpoint, ExportOptions(format="onnx", precision="fp32", out=out, data=data_spec,
                                                    data_root=data_root, val_size=EXPORT_VAL_IMAGES, progress=False))
    except EdgeKDError as e:
        return None, f"ONNX export for this backend failed: {e}"
    return out, None


def _progress_bar(jobs: Sequence[Job], settings: BenchSettings, progress: bool) -> Any:
    """One bar over the whole benchmark: preparing images, then per job a load, an accuracy pass and its visits."""
    total = 1 + _steps_per_job(settings) * sum(1 for j in jobs if not j.status)
    return progress_bar(total=total, desc="bench", unit="step", disable=not progress, leave=True)


def _measure(jobs: Sequence[Job], folder: str, settings: BenchSettings, bar: Any) -> None:
    """Start and load every runnable job's worker, take accuracy, then time in interleaved rounds."""
    per_job = _steps_per_job(settings)
    live: List[Live] = []
    try:
        for i, job in enumerate(jobs):
            if job.status:
                bar.update(per_job if job.images else 0)  # failed in _prepare: its steps are skipped
                continue
            bar.set_postfix_str(f"loading {_label(job)}")
            worker = WorkerProcess(os.path.join(folder, f"worker{i}.log"), settings.cpus)
            try:
                _load(job, worker, settings, bar)
                live.append((job, worker))
            except EdgeKDError as e:
                job.status = str(e)
                job.close = CloseAnswer.from_json(worker.close())
                bar.update(per_job - 1 + (job.load is None))
                continue
            bar.update()
        _timed_rounds(live, settings, bar)
        if settings.profile:
            _profile(live, settings, bar)
    finally:
        for job, worker in live:
            job.close = CloseAnswer.from_json(worker.close())


def _load(job: Job, worker: WorkerProcess, settings: BenchSettings, bar: Any) -> None:
    """Load the job's model in its worker and take its accuracy (EdgeKDError: why the row fails)."""
    job.load = Load.from_json(worker.request("load", **LoadRequest(
        backend=job.backend, path=os.path.abspath(job.run_path or job.path), device=job.device,
        threads=settings.threads, images=job.images or "", labels=job.labels or "").to_json()))
    bar.update()
    bar.set_postfix_str(f"accuracy {_label(job)}")
    accuracy = Accuracy.from_json(worker.request("accuracy", **AccuracyRequest(batch_size=ACCURACY_BATCH).to_json()))
    if accuracy.nonfinite:  # a top-1 of NaN rows is no answer: the row fails, by name
        raise EdgeKDError(f"failed: the model returned non-finite outputs (NaN or infinity) for {accuracy.nonfinite} "
                          "images")
    job.accuracy = accuracy


def _timed_rounds(live: Sequence[Live], settings: BenchSettings, bar: Any) -> None:
    """The planned interleaved rounds, then extra rounds for the visits a slow spell of the machine spoiled."""
    rounds, batch_sizes = settings.rounds, settings.batch_sizes
    runs = split_runs(settings.runs, rounds)
    for r, b, k in schedule(len(live), batch_sizes, rounds):
        _visit(live[k], b, r, runs[r], settings, bar)
    tolerance = settings.remeasure_slow or 0.0
    for extra in range(settings.max_extra_rounds if tolerance else 0):
        short = [(k, b) for b in batch_sizes for k, (job, _) in enumerate(live)
                 if b not in job.batch_status and kept_visits(job.visits[b], tolerance).count(True) < rounds]
        if not short:
            break
        bar.total = (bar.total or 0) + len(short)
        for k, b in short[extra % len(short):] + short[:extra % len(short)]:  # rotate, as planned rounds do
            _visit(live[k], b, rounds + extra, runs[-1], settings, bar)
    for job, _ in live:
        _keep(job, tolerance)


def _visit(entry: Live, b: int, r: int, runs: int, settings: BenchSettings, bar: Any) -> None:
    """One visit: warm-up, a check of the machine's state, ``runs`` timed calls (or ``--min-time``'s share), a check."""
    job, worker = entry
    rounds = settings.rounds
    bar.set_postfix_str(f"round {r + 1}/{rounds} batch {b} {_label(job)}" if r < rounds else
                        f"extra round {r - rounds + 1} batch {b} {_label(job)}")
    job.visits.setdefault(b, [])
    if b not in job.batch_status:
        time.sleep(SETTLE_S)
        # later visits re-warm briefly: caches went cold while other workers ran
        request = TimeRequest(batch_size=b, runs=runs, warmup=settings.warmup if r == 0 else
                              max(2, settings.warmup // rounds), max_s=settings.max_time_s / rounds,
                              min_s=settings.min_time_s / rounds, check_s=settings.check_s)
        try:
            answer = TimeAnswer.from_json(worker.request("time", **request.to_json()))
            job.visits[b].append(Visit(times_ms=answer.times_ms, check_ms=answer.check_ms, p50_ms=p50(answer.times_ms)))
        except EdgeKDError as e:
            job.batch_status[b] = f"failed at batch {b}: {e}"
    bar.update()


def _profile(live: Sequence[Live], settings: BenchSettings, bar: Any) -> None:
    """--profile, after all timing: each row's per-operator times from a second session with profiling on."""
    bar.total = (bar.total or 0) + len(live) * len(settings.batch_sizes)
    for job, worker in live:
        job.profile = {}
        for b in settings.batch_sizes:
            bar.set_postfix_str(f"profiling batch {b} {_label(job)}")
            request = ProfileRequest(batch_size=b, runs=min(settings.runs, PROFILE_RUNS))
            try:
                job.profile[b] = Profile.from_json(worker.request("profile", **request.to_json()))
            except EdgeKDError as e:
                job.profile[b] = f"not profiled: {e}"
            bar.update()


def kept_visits(visits: Sequence[Visit], tolerance: float) -> List[bool]:
    """Which visits count: those the machine ran at full speed throughout.

    A visit's slowness is the larger of two ratios: its median over the fastest median among the row's
    visits, and the slower of its two checks (untimed calls just before and after the timed ones) over
    the fastest such check. A visit counts when that is within ``tolerance``; the least slow visit always
    counts. A slow spell of a shared machine slows every call of a visit, timed or not; a model's own
    spread within a visit does not move its median.
    """
    if not tolerance or not visits:
        return [True] * len(visits)
    checks = [max(v.check_ms) if v.check_ms else None for v in visits]
    known = [c for c in checks if c is not None]
    p50_floor = min(v.p50_ms for v in visits)
    slowness = [max(v.p50_ms / p50_floor, c / min(known) if c is not None else 1.0)
                for v, c in zip(visits, checks)]
    kept = [s <= 1 + tolerance for s in slowness]
    kept[slowness.index(min(slowness))] = True
    return kept


def _keep(job: Job, tolerance: float) -> None:
    """The timings of the kept visits become the row's; every visit stays on record with its check."""
    job.times, job.round_p50, job.visit_log = {}, {}, {}
    for b, visits in job.visits.items():
        kept = kept_visits(visits, tolerance)
        job.times[b] = [t for v, k in zip(visits, kept) if k for t in v.times_ms]
        job.round_p50[b] = [v.p50_ms for v, k in zip(visits, kept) if k]
        job.visit_log[b] = [VisitLog(p50_ms=v.p50_ms, check_ms=v.check_ms, kept=k) for v, k in zip(visits, kept)]


def _label(job: Job) -> str:
    return f"{job.model} ({job.backend}, {job.device})"
