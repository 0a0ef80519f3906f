"""The Optuna study: multi-objective (maximise top-1, minimise the measured untrained latency) over the candidates
that meet the budget on the device, the budget as constraints (TPESampler's constraints_func), RDB storage with a
heartbeat so a killed worker's trial is retried and no finished trial is lost. Short schedules are stopped early by
a SuccessiveHalvingPruner on per-epoch top-1 (Optuna prunes single-objective studies only: each trial has a twin
in a one-objective "screen" study that the pruner judges)."""

import logging
import math
import os
import re
import socket
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from .. import EdgeKDError
from ..core.options import DistillOptions
from .budget import KEYS, Budget

log = logging.getLogger(__name__)

STUDY = "edgekd-fit"
SCREEN = "edgekd-fit-screen"
TRAIN_LOGGER = "edgekd.core.train_loop"  # logs one record per epoch with its test_top1

if TYPE_CHECKING:  # optuna is imported where it is used (a dependency of fit only)
    from optuna import Study, Trial
    from optuna.trial import FrozenTrial
    from optuna.storages import RDBStorage as Storage

Report = Callable[[int, Dict[str, Any], float, bool], None]  # trial number, candidate, top-1, pruned


def storage(url: str, heartbeat: int) -> "Storage":
    """Optuna RDB storage (SQLite file or PostgreSQL through psycopg) with a heartbeat: a trial whose worker died
    is marked failed after 2 heartbeats and retried with the same parameters."""
    import optuna

    kwargs: Dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    if not heartbeat:  # the screen study's twins are asked and told by hand: no heartbeat there
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs=kwargs, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
    except Exception as e:  # SQLAlchemy/psycopg: a wrong URL, a server that does not answer
        raise EdgeKDError(f"study storage {redact(url)} cannot be opened: {str(e).splitlines()[0][:200]}") from None


def redact(url: str) -> str:
    """A storage URL without its password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def open_study(store: "Storage", seed: int, create: bool) -> "Study":
    """The fit's study in ``store``: created (or loaded) with ``create``, else loaded (one line when it is not there)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=8)  # constraints: Trial.set_constraint
    if not create:
        try:
            return optuna.load_study(study_name=STUDY, storage=store, sampler=sampler)
        except KeyError:
            raise EdgeKDError("no edgekd fit study in that storage yet: start the fit first (edgekd fit ... "
                              "--storage URL), then --join it") from None
    return optuna.create_study(study_name=STUDY, storage=store, sampler=sampler, load_if_exists=True,
                               directions=["maximize", "minimize"])


def screen_study(store: "Storage") -> "Study":
    """The one-objective twin study whose SuccessiveHalvingPruner judges the short schedules."""
    import optuna

    return optuna.create_study(study_name=SCREEN, storage=store, direction="maximize", load_if_exists=True,
                               pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2))


def finished(study: "Study") -> int:
    """Trials of ``study`` that are finished: complete or pruned (all workers together)."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


class _Prune(Exception):
    pass


class _EpochWatch:
    """A logging filter on the training loop's per-epoch record: reports its test top-1 to the twin trial and
    stops training (raises) when the pruner says the trial is hopeless."""

    def __init__(self, twin: "Trial", epochs: int) -> None:
        self.twin, self.epochs = twin, epochs
        self.history: List[float] = []

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if len(args) == 3 and isinstance(args[2], dict) and "test_top1" in args[2]:
            top1 = float(args[2]["test_top1"])
            self.history.append(top1)
            self.twin.report(top1 if math.isfinite(top1) else 0.0, len(self.history))
            # the last epoch is never pruned: its result is paid for already
            if len(self.history) < self.epochs and self.twin.should_prune():
                raise _Prune()
        return False  # the line is the library's debug record; fit prints its own


def distill_trial(cand: Dict[str, Any], settings: Dict[str, Any], folder: str, epochs: int,
                  twin: Optional["Trial"] = None, **more: Any) -> Tuple[Optional[Dict[str, Any]], List[float], bool]:
    """Distil ``cand`` from the shared teacher cache into ``folder`` (``more``: other distill options, such as a
    finalist's student_weights); returns (metrics, per-epoch top-1, pruned)."""
    from ..core.distill import run_distill  # heavy: torch

    opts = DistillOptions(**{**settings["distill"], "student": cand["student"], "input_size": str(cand["size"]),
                             "epochs": epochs, "out": folder, "progress": False, "force": True, **more})
    os.makedirs(folder, exist_ok=True)
    logger = logging.getLogger(TRAIN_LOGGER)
    watch = _EpochWatch(twin, epochs) if twin is not None else None
    level = logger.level
    if watch:
        logger.addFilter(watch)
        logger.setLevel(logging.INFO)
    try:
        return run_distill(opts), (watch.history if watch else []), False
    except _Prune:
        return None, watch.history if watch else [], True
    finally:
        if watch:
            logger.removeFilter(watch)
            logger.setLevel(level)


def objective_for(budget: Budget, feasible: List[Dict[str, Any]], settings: Dict[str, Any], store: "Storage",
                  report: Optional[Report] = None) -> Callable[["Trial"], Tuple[float, float]]:
    """The trial function: pick a feasible candidate, distil it on the short schedule, return (top-1, p50 ms)."""
    import optuna

    by_key = {c["key"]: c for c in feasible}
    screen = screen_study(storage(store.url, 0))

    def objective(trial: "Trial") -> Tuple[float, float]:
        cand = by_key[trial.suggest_categorical("candidate", sorted(by_key))]
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("trained", trained_key(cand))
        earlier = _trained_before(trial, cand)
        if earlier is not None:  # the same student at the same size: its short schedule is already paid for
            return _reuse(trial, earlier, cand, budget, report)
        twin = screen.ask()
        trial.set_user_attr("screen_trial", twin.number)
        folder = trial_folder(settings["work"], trial.number)
        began = time.time()
        metrics, history, pruned = distill_trial(cand, settings, folder, settings["epochs_short"], twin,
                                                 test_subset=settings.get("trial_test_subset"))
        trial.set_user_attr("history", history)
        top1 = history[-1] if history else math.nan
        if metrics is not None:
            top1 = metrics["test_top1"]
            trial.set_user_attr("seconds", sum(h.get("seconds", 0.0) for h in metrics.get("history", [])))
            # the wall time without the teacher cache's one-off build: what a finalist's schedule is priced by
            build = (metrics.get("teacher_cache") or {}).get("build_seconds") or 0.0
            trial.set_user_attr("wall", time.time() - began - build)
        _constrain(trial, budget, cand, top1)
        if report:
            report(trial.number, cand, top1, pruned)
        if pruned:
            screen.tell(twin, state=optuna.trial.TrialState.PRUNED)
            raise optuna.TrialPruned()
        if not math.isfinite(top1):
            screen.tell(twin, state=optuna.trial.TrialState.FAIL)
            raise EdgeKDError(f"trial {trial.number}: top-1 is not a number")
        screen.tell(twin, top1)
        return top1, cand["measured"]["p50_ms"]

    return objective


def trial_folder(work: str, number: int) -> str:
    """Where trial ``number`` trains (its student.pt is what a finalist continues from)."""
    return os.path.join(work, "trials", f"{number:04d}")


def trained_key(cand: Dict[str, Any]) -> str:
    """What a short schedule trains: the student at its input size. Precision and runtime change only the export,
    so every candidate with the same student and size shares one training (the finalists measure the export)."""
    return f"{cand['student']}@{cand['size']}"


def _trained_before(trial: "Trial", cand: Dict[str, Any]) -> Optional["FrozenTrial"]:
    """A finished trial (any worker's) that trained the same student at the same size, or None."""
    import optuna

    key = trained_key(cand)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    for t in trial.study.get_trials(deepcopy=False, states=states):
        if t.number != trial.number and t.user_attrs.get("trained") == key and "top1" in t.user_attrs:
            return t
    return None


def _constrain(trial: "Trial", budget: Budget, cand: Dict[str, Any], top1: float) -> None:
    values = {**cand["measured"], "top1": top1}
    trial.set_user_attr("top1", top1)
    limits = [lim for lim in (budget.get(k) for k in KEYS) if lim is not None]  # in KEYS' order, as stored
    constraints = {lim.key: lim.excess(values.get(lim.key)) for lim in limits}
    for k, v in constraints.items():  # feasible when every value is <= 0 (Optuna 5's constraints)
        trial.set_constraint(k, min(v, 1e9) if math.isfinite(v) else 1e9)
    trial.set_user_attr("constraints", [min(v, 1e9) for v in constraints.values()])


def _reuse(trial: "Trial", earlier: "FrozenTrial", cand: Dict[str, Any], budget: Budget,
           report: Optional[Report]) -> Tuple[float, float]:
    """This trial's result is an earlier trial's training (same student and size): no second training, no twin."""
    import optuna

    top1 = earlier.user_attrs["top1"]
    trial.set_user_attr("history", earlier.user_attrs.get("history"))
    trial.set_user_attr("seconds", 0.0)
    trial.set_user_attr("reused_from", earlier.number)
    _constrain(trial, budget, cand, top1)
    pruned = earlier.state == optuna.trial.TrialState.PRUNED
    if report:
        report(trial.number, cand, top1, pruned)
    if pruned:
        raise optuna.TrialPruned()
    return top1, cand["measured"]["p50_ms"]


def enqueue_spread(study: "Study", feasible: List[Dict[str, Any]], n: int) -> None:
    """Start with every trained pair (student, size) once, in an order that spreads over the latency range from
    both ends (the slowest feasible first: under a latency budget the largest students are the likeliest winners,
    and a fit stopped by --hours has seen both ends), each pair followed by its other precisions and runtimes
    (free: they reuse the pair's training). Up to ``n`` trials; TPE takes over after them."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for c in sorted(feasible, key=lambda c: (PRECISION_ORDER.get(c["precision"], 9), c["measured"]["p50_ms"])):
        groups.setdefault(trained_key(c), []).append(c)
    by_speed = sorted(groups.values(), key=lambda g: min(c["measured"]["p50_ms"] for c in g))
    picks = [c for g in spread_order(by_speed) for c in g][:n]
    for c in picks:
        study.enqueue_trial({"candidate": c["key"]}, skip_if_exists=True)


# fp32 first within a pair: it loses nothing to quantization, so its short-schedule top-1 is the pair's own
PRECISION_ORDER = {"fp32": 0, "fp16": 1, "int8": 2}


def spread_order(items: List[Any]) -> List[Any]:
    """``items`` (sorted) reordered: last, first, then the midpoints of the widest gaps, so that any prefix covers
    the range evenly."""
    n = len(items)
    if n <= 2:
        return list(reversed(items))
    order, seen = [n - 1, 0], {n - 1, 0}
    gaps = [(0, n - 1)]
    while gaps:
        gaps.sort(key=lambda g: g[1] - g[0], reverse=True)
        lo, hi = gaps.pop(0)
        if hi - lo < 2:
            continue
        mid = (lo + hi) // 2
        if mid not in seen:
            order.append(mid)
            seen.add(mid)
        gaps += [(lo, mid), (mid, hi)]
    return [items[i] for i in order]


def trial_rows(study: "Study") -> List[Dict[str, Any]]:
    """Every trial of the study as the JSON row trials.json and the report show."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, "candidate": t.params.get("candidate"),
                     "top1_short": t.user_attrs.get("top1"), "history": t.user_attrs.get("history"),
                     "seconds": t.user_attrs.get("seconds"), "worker": t.user_attrs.get("worker"),
                     "constraints": t.user_attrs.get("constraints"), "wall": t.user_attrs.get("wall"),
                     "reused_from": t.user_attrs.get("reused_from")})
    return rows


def wait_ready(store: "Storage", seed: int, timeout: float) -> Tuple["Study", Dict[str, Any]]:
    """A joining worker waits (up to ``timeout`` s) for the starting fit to create the study and publish its
    settings and feasible candidates (it measures latency first); returns (study, its user attributes)."""
    start = time.time()
    while True:
        try:
            study = open_study(store, seed, create=False)
            attrs = study.user_attrs
            if attrs.get("ready"):
                return study, attrs
        except EdgeKDError:
            if time.time() - start >= timeout:
                raise
        if time.time() - start >= timeout:
            raise EdgeKDError(f"--join: the study did not become ready within {timeout} s")
        time.sleep(1.0)
