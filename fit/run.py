"""``edgekd fit`` from start to end: device, space, latency before training, the study, the finalists, outputs."""

import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Set, Tuple

import yaml

from .. import EdgeKDError
from ..base.files import atomic_write, rebased
from ..base.marker import OUTPUTS
from ..base.outdir import RunFolder, refuse_inputs_inside
from ..bench.options import BENCH_DEFAULTS, BENCH_QUICK
from ..bench.plan import check_device as known_device
from ..bundle.card import record_fit
from ..bundle.checks import manifest_json
from ..bundle.manifest import write_manifest
from ..core.config import saved
from ..core.data import Data, load_data
from ..core.options import DistillOptions
from ..base.cpu import usable_cpus
from . import latency, report, search
from .budget import DEVICE_KEYS, Budget, parse_budget
from .clock import Clock
from .final import pick_finalists, plan_finalists, run_finalists
from .options import FitOptions
from .space import Space, default_space, load_space

if TYPE_CHECKING:  # heavy (torch), or a dependency of fit only (optuna): for the type checker
    from optuna import Study
    from optuna.storages import RDBStorage

    from ..export.ladder import TrainQat

Say = Callable[[str], None]
Row = Dict[str, Any]  # a candidate with its measurement (fit's trial records stay JSON: they live in the study)

log = logging.getLogger(__name__)

SETTINGS_FILE = "config.yaml"  # the fit's options in --out, what --resume reads back (edgekd.core.config)
DISTILL_KEYS = ("teacher", "data", "data_root", "teacher_views", "train_subset", "unlabeled", "teacher_input_size",
                "teacher_mean", "teacher_std", "teacher_classes", "teacher_weights", "seed")


def _abs(path: Optional[str]) -> Optional[str]:
    return os.path.abspath(path) if path and os.path.exists(path) else path


def settings_of(opts: FitOptions, out: str) -> Dict[str, Any]:
    """What every worker needs to run a trial, with paths made absolute (workers may start elsewhere)."""
    distill = {k: getattr(opts, k) for k in DISTILL_KEYS}
    for k in ("teacher", "data", "unlabeled", "teacher_classes", "teacher_weights", "data_root"):
        distill[k] = _abs(distill[k])
    # decoding processes: at most one per usable CPU (a fit pinned to one core would oversubscribe it)
    distill.update(teacher_cache=os.path.abspath(os.path.join(out, "teacher-cache")), threads=opts.train_threads,
                   workers=min(2, usable_cpus()))
    timing = (BENCH_QUICK if opts.quick else BENCH_DEFAULTS).to_dict()
    limit = timing.pop("limit", None)
    return {"distill": distill, "epochs_short": opts.epochs_short, "trial_test_subset": opts.trial_test_subset or None,
            "epochs": opts.epochs, "work": os.path.abspath(out), "device": opts.device, "data": distill["data"],
            "data_root": distill["data_root"], "limit": limit, "threads": opts.threads, "batch_size": opts.batch_size,
            "timing": timing, "quick": opts.quick, "ssh_config": opts.ssh_config, "timeout": opts.timeout}


def check_teacher(opts: FitOptions) -> None:
    """Refuse a missing teacher, or one that is a model to train rather than a trained teacher."""
    from ..core.teachers import TeacherOptions, resolve  # heavy: torch

    if not opts.teacher:
        raise EdgeKDError("--teacher SPEC is required: a trained teacher (checkpoint, bundle, ONNX, pretrained ...)")
    d = DistillOptions(teacher=opts.teacher, teacher_input_size=opts.teacher_input_size, teacher_mean=opts.teacher_mean,
                       teacher_std=opts.teacher_std, teacher_classes=opts.teacher_classes,
                       teacher_weights=opts.teacher_weights, teacher_views=opts.teacher_views, out="unused")
    if resolve(opts.teacher, TeacherOptions.from_options(d)).kind == "model":
        raise EdgeKDError(f"--teacher {opts.teacher!r} is a model spec to train or a path that does not exist; fit "
                          f"needs a trained teacher: train it first (edgekd train --model {opts.teacher} ...)")


def check_device(opts: FitOptions, budget: Budget) -> Dict[str, Any]:
    """The device's environment; refuses an emulated device and a memory limit the device cannot report."""
    known_device(opts.device)
    if opts.device.startswith("ssh://") and budget.get("mem_mb"):
        raise EdgeKDError("--budget mem_mb: peak memory is measured for local devices only (bench's workers); an "
                          "ssh:// device runs every bundle in one runner process. Drop mem_mb or use a local device")
    env = latency.device_environment(opts.device, opts.ssh_config, opts.timeout)
    if env.get("emulated"):
        raise EdgeKDError(f"{opts.device} runs under {env['emulated']} emulation: its timings are not latency "
                          "(hundreds of times slower, not by a constant factor); refused as a latency basis")
    return env


def latency_phase(opts: FitOptions, budget: Budget, env: Dict[str, Any], data: Data, space: Space, out: str,
                  say: Say) -> Tuple[List[Row], Optional[float]]:
    """Every candidate timed untrained (the table first); returns every candidate with its measurement, and the
    seconds one untrained export and its timing took here (None when the table knew every candidate)."""
    folder = opts.latency_cache or latency.default_cache()
    key = latency.device_key(env, opts.threads, opts.batch_size)
    table = latency.LatencyTable(folder, key, env).load()
    cands = space.candidates()
    channels, classes = data.input.channels, len(data.classes)
    key_of = {c.key: latency.entry_key(c, channels, classes) for c in cands}
    todo = [c for c in cands if key_of[c.key] not in table.entries]
    # stored quick timings that lie near a limit of this budget: timed fully now
    retime = [] if opts.quick else [c for c in cands if c not in todo
                                    and latency.needs_full_timing(table.entries[key_of[c.key]], budget)]
    table.reused = len(cands) - len(todo) - len(retime)
    say(f"latency table {table.path}: {table.reused} of {len(cands)} candidates known"
        + (" (the stored table was damaged: measured again)" if table.damaged else "")
        + (f"; exporting and timing {len(todo) + len(retime)} untrained on {opts.device}" if todo or retime else ""))
    per_export = None
    if todo or retime:
        settings = settings_of(opts, out)
        work = os.path.join(out, "work")
        os.makedirs(work, exist_ok=True)
        began = time.time()
        latency.measure_missing(table, todo, data, settings, work, budget, retime)
        per_export = (time.time() - began) / len(todo + retime)
        full = sum(table.entries[key_of[c.key]].get("timing") == "full" for c in todo + retime)
        say(f"{len(todo)} timed quickly, {full} fully (within x{latency.SCREEN_BAND:g} of a latency limit)")
    table.save(os.path.join(out, "latency.json"))
    rows = []
    for c in cands:
        e = table.entries[key_of[c.key]]
        measured = {k: e.get(k) for k in DEVICE_KEYS}
        ok = e.get("status") == "ok"
        rows.append({"key": c.key, **asdict(c), "measured": measured, "status": e.get("status"),
                     "misses": budget.misses(measured, DEVICE_KEYS) if ok else None,
                     "relative_miss": budget.relative_miss(measured, DEVICE_KEYS) if ok else math.inf})
    return rows, per_export


def _closest(rows: List[Row], n: int = 3) -> str:
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["relative_miss"])[:n]
    return "; ".join(f"{r['key']} misses " + ", ".join(f"{k} by {v:.3g}" for k, v in r["misses"].items()) for r in ok)


def run_fit(opts: FitOptions, train_qat: Optional["TrainQat"] = None,
            say: Callable[[str], None] = log.info) -> Dict[str, Any]:
    """A whole fit into ``opts.out``; returns the summary (winner, trials, teacher passes).

    The fit owns its --out like every run (edgekd.base.outdir.RunFolder): checked, locked, marked with what it
    wrote, so ``--force`` later replaces only that; a fit that fails after writing keeps its failure report and
    its finished trials (``keep_failed``), one that fails before leaves the folder as it was."""
    if opts.join:
        return join_fit(opts, say)
    budget, out = _checked_request(opts)
    inputs = [("--teacher", opts.teacher), ("--data", opts.data), ("--space", opts.space),
              ("--unlabeled", opts.unlabeled), ("--teacher-classes", opts.teacher_classes),
              ("--teacher-weights", opts.teacher_weights), ("--config", opts.config)]
    refuse_inputs_inside(out, inputs, set(OUTPUTS["fit"]))
    with RunFolder(out, "fit", force=opts.force, resume=bool(opts.resume), keep_failed=True):
        return _fit(opts, budget, out, train_qat, say)


def _checked_request(opts: FitOptions) -> Tuple[Budget, str]:
    """The budget and --out of a fit that starts or resumes, refused in one line before anything is written."""
    budget = parse_budget(opts.budget) if opts.budget else None
    if budget is None:
        raise EdgeKDError("--budget EXPR is required, e.g. --budget p50_ms<=5,size_mb<=4")
    out = opts.out  # with --resume DIR: DIR (edgekd.core.config read its config.yaml)
    if not out:
        raise EdgeKDError("--out DIR is required (or --resume DIR, --join DIR|URL)")
    if opts.resume and not os.path.isfile(os.path.join(out, "study.db")) and not opts.storage:
        raise EdgeKDError(f"cannot resume {out!r}: it holds no study.db (not an edgekd fit folder)")
    return budget, out


def _fit(opts: FitOptions, budget: Budget, out: str, train_qat: Optional["TrainQat"],
         say: Callable[[str], None]) -> Dict[str, Any]:
    check_teacher(opts)
    env = check_device(opts, budget)
    data = load_data(opts.data, opts.data_root)
    space = default_space(data.input.height, data.input.channels)
    if opts.space:
        space = load_space(opts.space, space)
    os.makedirs(out, exist_ok=True)
    _save_settings(out, opts)
    clock = Clock(opts.hours, opts.search_share)  # --hours counts from here: the latency table is part of the fit
    rows, per_export = latency_phase(opts, budget, env, data, space, out, say)
    feasible = [r for r in rows if r["status"] == "ok" and not r["misses"]]
    say(f"{len(feasible)} of {len(rows)} candidates meet {budget} untrained on {opts.device}; only those are trained")
    if not feasible:
        report.write_failure(out, budget, rows, opts)
        raise EdgeKDError(f"no candidate meets the budget {budget} on {opts.device}; closest: {_closest(rows)} "
                          f"(see {out}/report.md)")
    settings = settings_of(opts, out)
    url = opts.storage or f"sqlite:///{os.path.abspath(os.path.join(out, 'study.db'))}"
    store = search.storage(url, opts.heartbeat)
    study = search.open_study(store, opts.seed, create=True)
    if not study.user_attrs.get("ready"):
        search.enqueue_spread(study, feasible, min(len(feasible), opts.trials))
    for k, v in {"settings": settings, "feasible": feasible, "budget": str(budget), "trials": opts.trials,
                 "ready": True}.items():
        study.set_user_attr(k, v)
    if per_export is not None:
        study.set_user_attr("export_seconds", per_export)
    run_trials(study, store, budget, feasible, settings, opts.trials, clock.search_left(), say)
    return finish(study, budget, feasible, rows, settings, opts, out, env, train_qat, say, clock)


def _save_settings(out: str, opts: FitOptions) -> None:
    """The fit's options as OUT/config.yaml (paths absolute: --resume may start from another folder)."""
    record = saved(opts)
    for k in ("teacher", "data", "data_root", "space", "unlabeled", "teacher_classes", "teacher_weights",
              "latency_cache", "ssh_config"):
        record[k] = _abs(record[k])
    record.pop("resume", None)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            yaml.safe_dump(record, f, sort_keys=True)

    atomic_write(os.path.join(out, SETTINGS_FILE), write)


def run_trials(study: "Study", store: "RDBStorage", budget: Budget, feasible: List[Row], settings: Dict[str, Any],
               trials: int, seconds: Optional[float], say: Say) -> None:
    """Trials until ``trials`` are finished in the study (all workers together) or no trial may start after
    ``seconds`` (None: no limit); at least one trial when the study has none, so that a finalist exists."""
    import optuna

    done0, start = search.finished(study), time.time()
    if done0 >= trials:
        return
    trained0, pairs = len(_trained_pairs(study)), {search.trained_key(c) for c in feasible}

    def progress(number: int, cand: Row, top1: float, pruned: bool) -> None:
        # priced by trainings, not trials: a trial that reuses its pair's training costs nothing
        done = search.finished(study) + 1
        trained = _trained_pairs(study) | {search.trained_key(cand)}
        trainings_here = max(len(trained) - trained0, 1)
        to_train = min(len(pairs - trained), max(trials - done, 0))
        left = to_train * (time.time() - start) / trainings_here
        if seconds is not None:
            left = min(left, max(seconds - (time.time() - start), 0.0))
        say(f"trial {number}: {cand['key']} top-1 {top1:.4f}{' (pruned)' if pruned else ''}, p50 "
            f"{cand['measured']['p50_ms']:.3f} ms untrained; {done}/{trials} trials, about {left / 60:.1f} min left")

    objective = search.objective_for(budget, feasible, settings, store, progress)
    stop = optuna.study.MaxTrialsCallback(trials, states=(optuna.trial.TrialState.COMPLETE,
                                                          optuna.trial.TrialState.PRUNED))
    if seconds is not None and seconds <= 0:
        if done0 == 0:
            say("the search's share of --hours is spent already (the latency table took it): one trial")
            study.optimize(objective, n_trials=1, callbacks=[stop], catch=(EdgeKDError,))
        return
    study.optimize(objective, timeout=seconds, callbacks=[stop], catch=(EdgeKDError,))


def _trained_pairs(study: "Study") -> Set[Any]:
    """The (student, size) pairs some trial of the study has trained (any worker's)."""
    return {t.user_attrs.get("trained") for t in study.get_trials(deepcopy=False) if t.user_attrs.get("top1") is not None}


def join_fit(opts: FitOptions, say: Say) -> Dict[str, Any]:
    """A worker on an existing fit's study (its folder's SQLite file or a storage URL): trials only."""
    target = opts.join or ""
    if "://" in target:
        if not opts.out:
            raise EdgeKDError("--join URL needs --out DIR for this worker's trials")
        url, out = target, opts.out
    else:
        if not os.path.isfile(os.path.join(target, "study.db")):
            raise EdgeKDError(f"--join {target!r}: no study.db there (start the fit with --out {target} first)")
        url, out = f"sqlite:///{os.path.abspath(os.path.join(target, 'study.db'))}", target
    store = search.storage(url, opts.heartbeat)
    study, attrs = search.wait_ready(store, opts.seed, opts.timeout)
    settings = {**attrs["settings"], "work": os.path.abspath(out)}
    budget = parse_budget(attrs["budget"])
    before = {r["number"] for r in search.trial_rows(study)}
    run_trials(study, store, budget, attrs["feasible"], settings, attrs["trials"],
               opts.hours * 3600 if opts.hours else None, say)
    mine = [r for r in search.trial_rows(study) if r["number"] not in before and r["state"] in ("COMPLETE", "PRUNED")]
    return {"joined": search.redact(url), "trials_run": len(mine)}


def finish(study: "Study", budget: Budget, feasible: List[Row], rows: List[Row], settings: Dict[str, Any],
           opts: FitOptions, out: str, env: Dict[str, Any], train_qat: Optional["TrainQat"], say: Say,
           clock: Clock) -> Dict[str, Any]:
    """The finalists on the full schedule, exported, gated and measured again; the winner and the outputs."""
    trials = search.trial_rows(study)
    by_key = {c["key"]: c for c in feasible}
    finalists = pick_finalists(trials, by_key, opts.finalists, opts.finalist_margin)
    if not finalists:
        report.write_failure(out, budget, rows, opts, trials)
        raise EdgeKDError("no trial finished within the budget (every trial was pruned, failed, or missed the "
                          f"top-1 floor); see {out}/report.md")
    groups = [[c for c in feasible if search.trained_key(c) == search.trained_key(by_key[t["candidate"]])]
              for t in finalists]
    plan = plan_finalists(finalists, trials, groups, settings, opts, clock, study.user_attrs.get("export_seconds"))
    results = run_finalists(plan, budget, settings, opts, out, train_qat, say)
    # the most accurate bundle that meets the budget once trained and measured again; the faster one on a tie
    ranked = sorted(results, key=lambda r: (-(r["top1"] or -1), r["measured"].get("p50_ms") or math.inf))
    winner = next((r for r in ranked if not r["misses"]), None)
    passes = report.teacher_passes(settings["distill"]["teacher_cache"])
    summary = {"budget": str(budget), "device": opts.device, "device_environment": env, "trials": trials,
               "candidates": rows, "finalists": results, "winner": winner, "teacher_passes": passes,
               "seconds": time.time() - clock.start, "finalist_epochs": plan.epochs,
               "finalist_margin": opts.finalist_margin, "trial_test_subset": settings.get("trial_test_subset"),
               "command": opts}
    if winner is None:
        report.write_failure(out, budget, rows, opts, trials, results)
        raise EdgeKDError("no finalist meets the budget once trained and measured again: closest "
                          + "; ".join(f"{r['key']} misses " + ", ".join(f"{k} by {v:.3g}" for k, v in r["misses"].items())
                                      for r in results) + f" (see {out}/report.md)")
    bundle = os.path.join(out, "bundle")
    if os.path.exists(bundle):
        shutil.rmtree(bundle)
    shutil.copytree(winner["bundle"], bundle)
    # the manifest's data and source paths are relative to the bundle's folder: right for the new one too
    write_manifest(bundle, rebased(manifest_json(bundle), winner["bundle"], bundle))
    record_fit(bundle, {"budget": str(budget), "device": opts.device, "chosen": winner["key"],
                        "measured": winner["measured"], "untrained estimate": winner["untrained"],
                        "trials": len(trials), "finalists": len(results), "report": "report.md of the fit"})
    report.write_outputs(out, summary, budget)
    return summary
