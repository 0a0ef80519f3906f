"""``edgekd bench``: every (model, backend, device) in its own long-lived worker process, on the same
preprocessed held-out images, timed in interleaved rounds; rows, report, plots.

``run_bench(plan, measurement, results)`` takes what to measure (``BenchPlan``), how to time it
(``Measurement``) and what to write (``Results``); ``request(options)`` makes the three from the command's
options. The steps live in bench/plan.py (what each model is, which jobs make sense), bench/measure.py
(images, workers, timed rounds, devices over SSH) and bench/results.py (rows, best deployment, files).
"""

import logging
import tempfile
from dataclasses import dataclass, replace
from typing import Any, List, Optional, Sequence, Tuple

from ..base.errors import EdgeKDError
from ..base.outdir import temp_prefix
from ..bundle.card import record_bench
from ..bundle.device import unsupported_batch
from ..bundle.rows import BenchResult, BenchSettings
from .options import BENCH_DEFAULTS, BENCH_QUICK, TIMING_FIELDS
from .measure import CHECK_S, EXTRA_ROUNDS, _measure, _measure_remote, _prepare, _progress_bar, _ssh_targets
from .plan import Job, check_batch_memory, check_device, describe, parse_cpus, plan_jobs
from .report import compare_results, load_results, table
from .results import _loadavg, attach_profiles, bench_environment, build_rows, mark_best, write_outputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchPlan:
    """What to measure: the models (checkpoints and bundle folders; the first is the reference, the teacher),
    on which devices, in which backends (None: each model in its own format's runtime), on which images."""

    models: Sequence[str]
    devices: Sequence[str] = ("cpu",)
    backends: Optional[Sequence[str]] = None
    data: Optional[str] = None          # the test images' data spec (default: the first model's data)
    data_root: Optional[str] = None
    limit: Optional[int] = None         # accuracy on at most this many test images (None: the whole split)
    ssh_config: Optional[str] = None
    ssh_timeout: int = 600              # seconds for each step on an ssh:// device


@dataclass(frozen=True)
class Measurement:
    """How each job is timed (the full preset by default; ``request`` applies --quick's)."""

    batch_sizes: Sequence[int] = (1,)
    warmup: int = BENCH_DEFAULTS.warmup
    runs: int = BENCH_DEFAULTS.runs
    rounds: int = BENCH_DEFAULTS.rounds
    max_time: float = BENCH_DEFAULTS.max_time
    min_time: float = BENCH_DEFAULTS.min_time
    remeasure_slow: float = 0.15        # a fraction (the command line's --remeasure-slow is in percent)
    threads: Optional[int] = None
    cpus: Optional[str] = None          # "0", "0,1" or "0-3": pin every worker there
    profile: bool = False
    progress: bool = True


@dataclass(frozen=True)
class Results:
    """What is written and judged: the output folder, the best deployment's allowed top-1 drop (a fraction),
    and an earlier results.json to compare with."""

    out: str
    max_drop: float = 0.01
    compare: Optional[str] = None
    compare_tolerance: float = 0.10

    def __post_init__(self) -> None:
        if not self.max_drop >= 0:  # NaN must not switch the gate off
            raise EdgeKDError(f"max_drop must be 0 or more, got {self.max_drop}")


@dataclass(frozen=True)
class BenchOutcome:
    """What ``run_bench`` returns: the result written to results.json, its markdown table, and the comparison
    with an earlier run (text) when one was asked for."""

    result: BenchResult
    table: str
    comparison: Optional[str] = None


def request(opts: Any) -> Tuple[BenchPlan, Measurement, Results]:
    """The three parts of a benchmark from ``edgekd bench``'s options (BenchOptions): timing options left
    unset take the full or --quick preset, percentages become fractions."""
    preset = BENCH_QUICK if opts.quick else BENCH_DEFAULTS
    timing = {f: getattr(opts, f) if getattr(opts, f) is not None else getattr(preset, f) for f in TIMING_FIELDS}
    plan = BenchPlan(models=opts.models, devices=opts.device, backends=opts.backends, data=opts.data,
                     data_root=opts.data_root, limit=opts.limit if opts.limit is not None else preset.limit,
                     ssh_config=opts.ssh_config, ssh_timeout=opts.timeout)
    measurement = Measurement(batch_sizes=opts.batch_sizes, remeasure_slow=opts.remeasure_slow / 100,
                              threads=opts.threads, cpus=opts.cpus, profile=opts.profile, progress=opts.progress,
                              **timing)
    results = Results(out=opts.out, max_drop=opts.max_drop / 100, compare=opts.compare,
                      compare_tolerance=opts.compare_tolerance / 100)
    return plan, measurement, results


def _settings(plan: BenchPlan, m: Measurement, results: Results, devices: List[str], cpus: Optional[List[int]],
              threads: Optional[int]) -> BenchSettings:
    """The settings as results.json records them (and as the measuring steps read them)."""
    rounds = min(m.rounds, m.runs)
    return BenchSettings(batch_sizes=list(m.batch_sizes), warmup=m.warmup, runs=m.runs, rounds=rounds,
                         max_time_s=m.max_time, min_time_s=min(m.min_time, m.max_time),
                         remeasure_slow=m.remeasure_slow, check_s=CHECK_S if m.remeasure_slow else 0.0,
                         max_extra_rounds=EXTRA_ROUNDS * rounds if m.remeasure_slow else 0,
                         threads=threads, cpus=cpus, limit=plan.limit, max_drop=results.max_drop,
                         devices=devices, backends=list(plan.backends) if plan.backends is not None else None,
                         profile=m.profile)


def run_bench(plan: BenchPlan, measurement: Measurement, results: Results) -> BenchOutcome:
    """Benchmark ``plan.models`` (the first is the reference, the teacher); write the results into ``results.out``.

    Returns the result with its markdown table and, when ``results.compare`` is given, the comparison's text.
    """
    m = measurement
    devices = [check_device(d) for d in plan.devices]
    targets = _ssh_targets(devices, plan.ssh_config, plan.ssh_timeout)
    old = load_results(results.compare) if results.compare else None
    cpus = parse_cpus(m.cpus) if m.cpus is not None else None
    threads = m.threads or (len(cpus) if cpus else None)
    described = [describe(p) for p in plan.models]
    check_batch_memory(described, m.batch_sizes)
    jobs = plan_jobs(described, plan.backends, devices)
    _static_batch_status(jobs, m.batch_sizes)
    data_spec = plan.data or described[0].data or "digits"
    settings = _settings(plan, m, results, devices, cpus, threads)
    env = bench_environment(threads, cpus)
    bar = _progress_bar(jobs, settings, m.progress)
    with tempfile.TemporaryDirectory(prefix=temp_prefix("bench")) as folder:
        try:
            bar.set_postfix_str("preparing test images")
            _prepare(jobs, data_spec, plan.data_root, plan.limit, folder)
            bar.update()
            _measure([j for j in jobs if j.device not in targets], folder, settings, bar)
            device_envs = _measure_remote([j for j in jobs if j.device in targets], targets, settings,
                                          plan.ssh_timeout, bar)
        finally:
            bar.close()
    rows = build_rows(jobs, m.batch_sizes)
    if m.profile:
        attach_profiles(rows, jobs)
    mark_best(rows, results.max_drop)
    result = BenchResult(environment=replace(env, loadavg_end=_loadavg()), data=data_spec, settings=settings,
                         rows=rows, device_environments=device_envs or None)
    comparison = compare_results(old, result, results.compare, results.compare_tolerance) if old else None
    write_outputs(results.out, result, comparison)
    record_bench(result)  # each measured bundle's MODEL_CARD.md gains its rows
    return BenchOutcome(result=result, table=table(rows), comparison=comparison)


def _static_batch_status(jobs: Sequence[Job], batch_sizes: Sequence[int]) -> None:
    """A bundle with a static batch (``edgekd export --target arm64`` for OpenVINO) is timed at that batch only."""
    for job in jobs:
        if job.static_batch:
            job.batch_status = {b: unsupported_batch(job.static_batch, b) for b in batch_sizes if b != job.static_batch}
