"""The finalists: the full schedule from the same teacher cache, export at their precision and runtime (INT8
through export's ladder, its QAT rung handed in by the CLI), the parity gate, and a second measurement on the
device of the trained bundle (which must meet the budget itself, not its untrained estimate)."""

import logging
import os
import time
from typing import Any, Dict, List

from .. import EdgeKDError
from . import latency, search
from .budget import DEVICE_KEYS, Budget

log = logging.getLogger(__name__)


def run_finalists(groups: List[List[Dict[str, Any]]], budget: Budget, settings: Dict[str, Any], opts, out: str,
                  train_qat, say) -> List[Dict[str, Any]]:
    """Each group is one student at one size with its feasible precisions and runtimes: trained once on the full
    schedule, then every variant exported, gated and measured again (one result per variant)."""
    results = []
    for i, group in enumerate(groups):
        first = group[0]
        say(f"finalist {i + 1}/{len(groups)}: {first['student']}@{first['size']}, {settings['epochs']} epochs, then "
            f"{len(group)} export(s): " + ", ".join(f"{c['precision']}/{c['runtime']}" for c in group))
        start = time.time()
        folder = os.path.join(out, "work", "final", f"{i:02d}")
        metrics, _, _ = search.distill_trial(first, settings, folder, settings["epochs"])
        trained = time.time() - start
        for j, cand in enumerate(group):
            r = _export_and_measure(cand, folder, f"bundle-{j:02d}", metrics, budget, settings, opts, out, train_qat)
            r["seconds"] += trained if j == 0 else 0.0  # the training is paid once, by the group's first export
            results.append(r)
            say(f"finalist {cand['key']}: top-1 {_f(r['top1'], '.4f')}, p50 {_f(r['measured'].get('p50_ms'), '.3f')} "
                f"ms measured trained (untrained {cand['measured']['p50_ms']:.3f} ms)"
                + ("" if not r["misses"] else f"; misses {', '.join(r['misses'])}"))
    return results


def _f(value, fmt):
    return "n/a" if value is None else format(value, fmt)


def _export_and_measure(cand, folder, name, metrics, budget, settings, opts, out, train_qat):
    from ..export.options import ExportOptions
    from ..export.pipeline import export_checkpoint

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


def _format(cand):
    from .space import RUNTIMES

    return RUNTIMES[cand["runtime"]]


def _safe(text):
    return "".join(ch if ch.isalnum() else "_" for ch in text)[:64]
