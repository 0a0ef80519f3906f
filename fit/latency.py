"""Latency before training: every candidate exported untrained and timed on the device, kept in a latency table
per device (keyed by what identifies the device and its runtime versions) that later fits reuse.

A table is JSON with a sha256 over its contents: a table whose checksum does not match (damaged, edited) is
measured again, never trusted. Each device runs one measurement at a time (a lock file beside the table).

Untrained candidates are timed in two passes: a quick one for every candidate (bench's --quick timing, a few test
images), then bench's full timing only for those whose quick latency lies near a latency limit of the budget, the
only ones whose verdict timing noise could change. Each entry says which timing it holds; a later fit whose budget
lies near a quick entry times it fully then. The exports and timings run in a child process: the exporters' thread
pools and patched libraries (ONNX Runtime, OpenVINO, NNCF) would otherwise stay in the fit's process and slow every
training after them (measured: 6-8% on one core, docs/records/fit.md).
"""

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
from dataclasses import replace
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .. import EdgeKDError
from ..base import ssh
from ..base.files import atomic_write
from ..bench.remote import check_device
from ..bench.options import BENCH_QUICK
from ..bench.run import BenchPlan, Measurement, Results, run_bench
from ..bundle import environment
from ..bundle.assemble import runner_source
from ..core.data import Data
from ..export.options import ExportOptions
from .budget import Budget
from .space import Candidate

log = logging.getLogger(__name__)

TABLE_FORMAT = 1
# what identifies a device's timings: the machine, the runtimes' versions, and how it is asked to run
IDENTITY = ("cpu", "machine", "cores", "platform", "python")
RUNTIME_VERSIONS = ("onnxruntime", "openvino", "numpy")
# A quick latency within this factor of a latency limit (either side) is timed again with the full timing.
SCREEN_BAND = 1.25
LATENCY_KEYS = ("p50_ms", "p90_ms")
# An untrained model's accuracy means nothing: this many test images only prove that the bundle runs.
UNTRAINED_IMAGES = 100


def default_cache() -> str:
    """Where latency tables live by default: ~/.cache/edgekd/latency (or under $XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "edgekd", "latency")


def device_environment(device: str, ssh_config: Optional[str], timeout: int) -> Dict[str, Any]:
    """The device runner's own environment record (CPU, machine, runtime versions, ``emulated``), read on the
    device itself: here for a local device, over SSH for ssh:// (unreachable: one-line EdgeKDError)."""
    if not device.startswith("ssh://"):
        return {**environment.environment(), "device": device}
    target = ssh.parse_target(device, ssh_config)
    check_device(target, timeout)
    out = ssh.run(target, f"{ssh.quote(target.python)} - env", timeout, input_bytes=runner_source().encode())
    try:
        env = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise EdgeKDError(f"{device}: the device runner's environment could not be read: {out[:200]!r}") from None
    return {**env, "device": device}


def device_key(env: Dict[str, Any], threads: Optional[int], batch_size: int) -> str:
    """A short name for (device, runtime versions, threads, batch): the latency table's file name."""
    versions = env.get("versions") or {}
    ident = {**{k: env.get(k) for k in IDENTITY}, "device": env.get("device"), "threads": threads,
             "batch_size": batch_size, "versions": {k: versions.get(k) for k in RUNTIME_VERSIONS}}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{env.get('machine', 'device')}-{digest}"


def _checksum(table: Dict[str, Any]) -> str:
    body = {k: v for k, v in table.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class LatencyTable:
    """Measured entries by candidate key for one device key; ``load`` ignores (and logs) a damaged file."""

    def __init__(self, folder: str, key: str, env: Dict[str, Any]) -> None:
        self.folder, self.key, self.env = folder, key, env
        self.path = os.path.join(folder, key + ".json")
        self.entries: Dict[str, Dict[str, Any]] = {}
        self.reused = 0
        self.damaged = False

    def load(self) -> "LatencyTable":
        """The stored table's entries, when its checksum, format and key hold (else it is measured again)."""
        if not os.path.isfile(self.path):
            return self
        try:
            with open(self.path) as f:
                table = json.load(f)
            ok = (isinstance(table, dict) and table.get("sha256") == _checksum(table)
                  and table.get("format") == TABLE_FORMAT and table.get("key") == self.key)
        except (OSError, ValueError):
            ok = False
        if not ok:
            log.warning("latency table %s is damaged (checksum or format): it is measured again", self.path)
            self.damaged = True
            return self
        self.entries = dict(table["entries"])
        return self

    def to_dict(self) -> Dict[str, Any]:
        """The table's JSON, with its checksum."""
        table = {"format": TABLE_FORMAT, "key": self.key, "device": self.env, "entries": self.entries}
        table["sha256"] = _checksum(table)
        return table

    def save(self, *copies: str) -> None:
        """Write the table (atomically) to its own file and to each of ``copies``."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        for path in (self.path,) + copies:
            atomic_write(path, lambda tmp: open(tmp, "w").write(text))


def entry_key(c: Candidate, channels: int, classes: int) -> str:
    """A candidate's key in a latency table (the same architecture differs by its input channels and classes)."""
    return f"{c.key}/c{channels}/k{classes}"


@contextlib.contextmanager
def device_lock(folder: str, key: str) -> Iterator[None]:
    """One measurement at a time on a device: an exclusive lock on FOLDER/KEY.lock, held while timing."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, key + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def untrained_checkpoint(student: str, size: int, data: Data, path: str) -> str:
    """The architecture at ``size`` px with fresh weights, as a checkpoint export reads (latency only)."""
    from ..core.checkpoint import save_checkpoint  # heavy: torch
    from ..core.models import build_model

    spec = replace(data.input, height=size, width=size, crop_pct=None)
    model = build_model(student, len(data.classes), spec).eval()
    save_checkpoint(path, model, spec=student, classes=data.classes, input_spec=spec, data_spec=data.spec,
                    metrics={"untrained": True, "why": "edgekd fit: exported untrained to time it"}, config={})
    return path


def export_untrained(ckpt: str, c: Candidate, out: str, data_root: Optional[str]) -> str:
    """An untrained bundle of ``c`` in ``out`` (no accuracy gate: an untrained model has no accuracy to keep); a
    failed export raises EdgeKDError (the candidate is then left out, with its reason)."""
    from ..export.pipeline import export_checkpoint  # heavy: torch, onnx

    opts = ExportOptions(format=c.format, precision=c.precision, out=out, data_root=data_root, val_size=32,
                         calib_size=32, max_drop=100.0, max_fallback_layers=0, speed_check=False, progress=False,
                         force=True)
    export_checkpoint(ckpt, opts)
    return out


def measure(bundles: Dict[str, str], device: str, settings: Dict[str, Any], work: str) -> Dict[str, Dict[str, Any]]:
    """Time ``bundles`` (name -> folder) on ``device`` with edgekd bench's measurement; name -> entry with
    p50_ms, p90_ms, size_mb, mem_mb (None where the device cannot report it), top1 and status."""
    names = list(bundles)
    plan = BenchPlan(models=[bundles[n] for n in names], devices=[device], data=settings["data"],
                     data_root=settings.get("data_root"), limit=settings.get("limit"),
                     ssh_config=settings.get("ssh_config"), ssh_timeout=settings.get("timeout", 600))
    m = Measurement(batch_sizes=(settings["batch_size"],), threads=settings.get("threads"), progress=False,
                    remeasure_slow=0.0, **settings["timing"])
    out = tempfile.mkdtemp(dir=work, prefix="bench-")
    try:
        result = run_bench(plan, m, Results(out=out, max_drop=1.0))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    by_name = {os.path.basename(os.path.normpath(bundles[n])): n for n in names}
    entries: Dict[str, Dict[str, Any]] = {}
    for row in result.result.rows:
        entries[by_name[row.model]] = {
            "p50_ms": row.latency_ms and row.latency_ms.p50, "p90_ms": row.p90, "size_mb": row.size_mb,
            "mem_mb": row.peak_rss_mb, "top1": row.top1, "status": row.status, "emulated": row.emulated}
    return entries


def quick_settings(settings: Dict[str, Any]) -> Dict[str, Any]:
    """``settings`` with bench's --quick timing and the untrained accuracy check's few images."""
    timing = BENCH_QUICK.to_dict()
    timing.pop("limit", None)
    return {**settings, "timing": timing, "limit": UNTRAINED_IMAGES}


def needs_full_timing(entry: Dict[str, Any], budget: Budget) -> bool:
    """Whether a quickly timed entry's latency is within SCREEN_BAND of a latency limit of ``budget``: there the
    quick timing's noise could change whether it meets the budget, so it is timed fully."""
    if entry.get("timing") != "quick" or entry.get("status") != "ok":
        return False
    for lim in budget.device_limits():
        value = entry.get(lim.key)
        if lim.key in LATENCY_KEYS and value is not None and math.isfinite(value):
            if lim.value / SCREEN_BAND <= value <= lim.value * SCREEN_BAND:
                return True
    return False


def measure_missing(table: LatencyTable, todo: List[Candidate], data: Data, settings: Dict[str, Any], work: str,
                    budget: Budget, retime: List[Candidate]) -> None:
    """Export every candidate of ``todo`` and ``retime`` (quickly timed before, now near a limit of ``budget``)
    and time them into ``table``: ``todo`` quickly first, then fully where near a limit (never fully in a --quick
    fit, ``settings["quick"]``). Runs in a child process (see the module's note)."""
    lean = replace(data, train=None, test=None)  # what an untrained checkpoint needs, without the images
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        entries = pool.submit(_export_and_time, todo, retime, lean, settings, work, budget, table.folder,
                              table.key).result()
    channels, classes = data.input.channels, len(data.classes)
    for c in todo + retime:
        table.entries[entry_key(c, channels, classes)] = entries[c.key]


def _export_and_time(todo: List[Candidate], retime: List[Candidate], data: Data, settings: Dict[str, Any], work: str,
                     budget: Budget, folder_of_table: str, table_key: str) -> Dict[str, Dict[str, Any]]:
    """measure_missing's work, in the child: candidate key -> table entry (an export that failed: its reason)."""
    bundles: Dict[str, str] = {}
    entries: Dict[str, Dict[str, Any]] = {}
    folder = tempfile.mkdtemp(dir=work, prefix="untrained-")
    try:
        ckpts: Dict[Tuple[str, int], str] = {}
        for i, c in enumerate(todo + retime):
            k = (c.student, c.size)
            try:
                if k not in ckpts:
                    ckpts[k] = untrained_checkpoint(c.student, c.size, data, os.path.join(folder, f"m{len(ckpts)}.pt"))
                bundles[c.key] = export_untrained(ckpts[k], c, os.path.join(folder, f"c{i:04d}"), settings.get("data_root"))
            except EdgeKDError as e:
                entries[c.key] = {"status": f"export failed: {e}"}
        with device_lock(folder_of_table, table_key):
            screen = {c.key: bundles[c.key] for c in todo if c.key in bundles}
            if screen:
                entries.update({k: {**e, "timing": "quick"} for k, e in
                                measure(screen, settings["device"], quick_settings(settings), work).items()})
            full = {} if settings.get("quick") else {
                c.key: bundles[c.key] for c in todo + retime
                if c.key in bundles and (c in retime or needs_full_timing(entries.get(c.key, {}), budget))}
            if full:
                entries.update({k: {**e, "timing": "full"} for k, e in
                                measure(full, settings["device"], {**settings, "limit": UNTRAINED_IMAGES}, work).items()})
        return {c.key: entries.get(c.key) or {"status": "not measured"} for c in todo + retime}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
