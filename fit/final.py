"""The finalists: the full schedule from the same teacher cache, export at their precision and runtime (INT8
through export's ladder, its QAT rung handed in by the CLI), the parity gate, and a second measurement on the
device of the trained bundle (which must meet the budget itself, not its untrained estimate)."""

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from .. import EdgeKDError
from ..export.options import ExportOptions
from . import latency, search
from .budget import DEVICE_KEYS, Budget
from .clock import Clock, finalist_epochs, trial_cost
from .options import FitOptions
from .space import RUNTIMES

if TYPE_CHECKING:  # heavy (torch): only for the type checker
    from ..export.ladder import TrainQat

log = logging.getLogger(__name__)


Row = Dict[str, Any]


@dataclass
class FinalPlan:
    """The finalists' groups (one student at one size, its feasible precisions and runtimes), the trial weights
    each continues from (None: from scratch) and the epochs each trains."""

    groups: List[List[Row]]
    weights: List[Optional[str]]
    epochs: int
    seconds_left: Optional[float] = None  # of --hours when the plan was made


def pick_finalists(trials: List[Row], by_key: Dict[str, Row], n: int, margin: float) -> List[Row]:
    """The best complete, feasible trial of each trained pair (student, size), best first, at most ``n``; a
    runner-up only if its short-schedule top-1 is within ``margin`` of the best's."""
    done = [t for t in trials if t["state"] == "COMPLETE" and t["top1_short"] is not None
            and all(v <= 0 for v in (t["constraints"] or [1.0]))]
    best: Dict[str, Row] = {}
    for t in sorted(done, key=lambda t: -t["top1_short"]):
        best.setdefault(search.trained_key(by_key[t["candidate"]]), t)
    ranked = list(best.values())[:n]
    return [t for t in ranked if ranked[0]["top1_short"] - t["top1_short"] <= margin]


def plan_finalists(finalists: List[Row], trials: List[Row], groups: List[List[Row]], settings: Dict[str, Any],
                   opts: FitOptions, clock: Clock, export_seconds: Optional[float]) -> FinalPlan:
    """Each finalist continues from the weights its trial trained (when that trial ran here); with --hours its
    epochs fill the time left, priced by the trials' own seconds per epoch."""
    by_number = {t["number"]: t for t in trials}
    # a trial that reused another's training (same student and size) points at the trial that trained
    sources = [by_number.get(t["reused_from"], t) if t.get("reused_from") is not None else t for t in finalists]
    from ..core.pretrained import pretrained_norm  # heavy: torch

    costs = [trial_cost(s.get("seconds"), len(s.get("history") or []), s.get("wall")) for s in sources]
    left = clock.left()
    epochs = finalist_epochs(opts.epochs, costs, left, sum(len(g) for g in groups), export_seconds)
    weights = []
    for s, group in zip(sources, groups):
        path = os.path.join(search.trial_folder(settings["work"], s["number"]), "student.pt")
        # a weights file that would switch distill to a pretrained normalisation (torchvision, timm) is not the
        # trial's training: such a finalist starts again
        ok = os.path.isfile(path) and pretrained_norm(group[0]["student"], path) is None
        weights.append(path if ok else None)
    return FinalPlan(groups, weights, epochs, left)


def run_finalists(plan: FinalPlan, budget: Budget, settings: Dict[str, Any], opts: FitOptions,
                  out: str, train_qat: Optional["TrainQat"], say: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Each group is one student at one size with its feasible precisions and runtimes: trained once on the full
    schedule (from its trial's weights where they are here; the test split only after the last epoch), then every
    variant exported, gated and measured again (one result per variant)."""
    results = []
    for i, (group, weights) in enumerate(zip(plan.groups, plan.weights)):
        first = group[0]
        start_from = "continued from its trial's weights" if weights else "from scratch"
        if plan.seconds_left is not None and not opts.epochs:
            start_from += f" (to fill the {plan.seconds_left:.0f} s left of --hours)"
        say(f"finalist {i + 1}/{len(plan.groups)}: {first['student']}@{first['size']}, {plan.epochs} epochs "
            f"{start_from}, then "
            f"{len(group)} export(s): " + ", ".join(f"{c['precision']}/{c['runtime']}" for c in group))
        start = time.time()
        folder = os.path.join(out, "work", "final", f"{i:02d}")
        metrics, _, _ = search.distill_trial(first, settings, folder, plan.epochs, student_weights=weights,
                                             eval_every=plan.epochs)
        if metrics is None:  # only a pruned trial has none, and a finalist is never pruned
            raise RuntimeError(f"finalist {first['key']} ended without metrics")
        trained = time.time() - start
        for j, cand in enumerate(group):
            r = _export_and_measure(cand, folder, f"bundle-{j:02d}", metrics, budget, settings, opts, out, train_qat)
            r["seconds"] += trained if j == 0 else 0.0  # the training is paid once, by the group's first export
            r.update(epochs=plan.epochs, from_trial=weights is not None)
            results.append(r)
            say(f"finalist {cand['key']}: top-1 {_f(r['top1'], '.4f')}, p50 {_f(r['measured'].get('p50_ms'), '.3f')} "
                f"ms measured trained (untrained {cand['measured']['p50_ms']:.3f} ms)"
                + ("" if not r["misses"] else f"; misses {', '.join(r['misses'])}"))
    return results


def _f(value: Optional[float], fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _export_and_measure(cand: Dict[str, Any], folder: str, name: str, metrics: Dict[str, Any], budget: Budget,
                        settings: Dict[str, Any], opts: FitOptions, out: str,
                        train_qat: Optional["TrainQat"]) -> Dict[str, Any]:
    from ..export.pipeline import export_checkpoint  # heavy: torch, onnx

    start = time.time()
    bundle = os.path.join(folder, name)
    eopts = ExportOptions(format=cand["format"] if "format" in cand else _format(cand), precision=cand["precision"],
                          out=bundle, data_root=settings["data_root"], progress=False, speed_check=False, force=True)
    try:
        manifest = export_checkpoint(os.path.join(folder, "student.pt"), eopts, train_qat=train_qat)
    except EdgeKDError as e:
        return {"key": cand["key"], "status": f"export failed: {e}", "top1": None, "measured": {},
                "misses": {"export": 1.0}, "seconds": time.time() - start}
    work = os.path.join(out, "work")
    with latency.device_lock(opts.latency_cache or latency.default_cache(), "final-" + _safe(opts.device)):
        entry = latency.measure({cand["key"]: bundle}, settings["device"], settings, work)[cand["key"]]
    measured = {k: entry.get(k) for k in DEVICE_KEYS}
    top1 = entry.get("top1") if entry.get("top1") is not None else manifest["validation"]["top1"]
    misses = budget.misses({**measured, "top1": top1}) if entry["status"] == "ok" else {"status": 1.0}
    return {"key": cand["key"], "student": cand["student"], "size": cand["size"], "precision": cand["precision"],
            "runtime": cand["runtime"], "status": entry["status"], "top1": top1, "distill_top1": metrics["test_top1"],
            "measured": measured, "untrained": cand["measured"], "misses": misses, "bundle": bundle,
            "ladder": [r.get("rung") for r in manifest.get("ladder", [])], "seconds": time.time() - start}


def _format(cand: Dict[str, Any]) -> str:
    return RUNTIMES[cand["runtime"]]


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text)[:64]
