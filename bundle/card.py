"""MODEL_CARD.md: the card that travels in every bundle (Hugging Face model card metadata, then prose).

Written by ``edgekd export`` (``add_card``) and updated by ``edgekd bench`` (``record_bench``), ``edgekd deploy``
(``record_deploy``) and ``edgekd fit`` (``record_fit``). Every number comes from a record, never from a person: the
manifest (validation, calibration, layer report, versions), the checkpoint's metrics and config (kept in the card's
front matter under ``edgekd.training`` at export, as the checkpoint is not in the bundle), and bench's rows (kept
under ``edgekd.measurements``). An update re-renders the whole card from those records, then rewrites the
manifest's sha256 of it, so a bundle still verifies; a card edited by hand fails verification like any other file,
and is never re-blessed by an update (``update_card`` refuses a card whose sha256 does not match).

A bundle made before cards (no MODEL_CARD.md) is left as it was: bench and deploy skip it (logged), since
nothing in the bundle records its training, and its checksums stay the ones the user shipped.

Torch-free (the bundle layer); huggingface_hub writes the metadata block, imported where it is used.
"""

import contextlib
import fcntl
import json
import logging
import os
import shlex
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import yaml

from ..base.files import portable, spec_for_file
from .card_records import (CARD_SCHEMA, CardBlock, CardManifest, DataRecord, Deployment, DeviceCheck, Measurement,
                           Recipe, TeacherRecord, TrainingRecord)
from .card_text import render
from .manifest import Manifest, read_manifest, sha256_file, write_manifest
from .rows import BenchResult, MachineEnvironment, Record

log = logging.getLogger(__name__)

CARD_FILE = "MODEL_CARD.md"
MAX_CARD_BYTES = 4 * 1024 ** 2     # a card is a few kilobytes; far beyond is damage, refused before parsing
MAX_ROWS = 500                     # measurements and deployments kept (the newest), so a card stays readable
SKIP_IN_COMMAND = ("out", "resume", "force", "config", "progress")  # where a run wrote, not how it was made


# ---------------------------------------------------------------------------------------------- records

def command_line(command: str, values: Any, table: Optional[Sequence[Any]], positional: Optional[str] = None,
                 skip: Sequence[str] = SKIP_IN_COMMAND, folder: Optional[str] = None) -> Optional[str]:
    """``edgekd COMMAND`` with the options of ``values`` that differ from their defaults in ``table`` (core.config's
    option list for the command: objects with name, flag, default, kind, negate, positional, yaml). With ``folder``,
    absolute paths (a teacher file, ``imagefolder:/data/x``) are written relative to it, as every edgekd record is."""
    if not values or table is None:
        return None
    get: Callable[[str], Any] = values.get if isinstance(values, dict) else (lambda name: getattr(values, name, None))
    words = ["edgekd", command]
    for opt in table:
        value = get(opt.name)
        if folder and isinstance(value, str):
            value = spec_for_file(value, folder)
        if opt.positional:
            words.append(shlex.quote(str(positional if positional is not None else value)))
            continue
        if opt.name in skip or not opt.yaml or value is None or value == opt.default:
            continue
        if opt.kind == "bool":
            words.append(opt.negate if opt.negate else opt.flag)
        else:
            shown = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            words += [opt.flag, shlex.quote(shown)]
    return " ".join(words)


def _plain(record: Any) -> Any:
    """JSON's plain types only (a value of another type, say a tensor in an old checkpoint's metrics, as text)."""
    return json.loads(json.dumps(record, default=str))


@dataclass
class Metrics(Record):
    """What the card reads of a checkpoint's metrics."""

    loss: Optional[str] = None
    loss_params: Optional[Dict[str, Any]] = None
    epochs: Optional[int] = None
    pretrained: Optional[Any] = None
    test_top1: Optional[float] = None
    best_top1: Optional[float] = None
    teacher: Optional[Dict[str, Any]] = None
    train_data: Optional[Dict[str, Any]] = None


@dataclass
class CheckpointView(Record):
    """What the card reads of a checkpoint (its plain fields; the weights stay where they are)."""

    model: Optional[str] = None
    params: Optional[int] = None
    flops: Optional[int] = None
    data: Optional[str] = None
    edgekd_version: Optional[str] = None
    qat: Optional[Any] = None
    metrics: Dict[str, Any] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)


def _recorded(record: Any) -> Any:
    """A record with only what was recorded (no keys of other kinds), or None when nothing was."""
    kept = replace(record, extra={})
    return kept if kept.to_json() else None


def training_record(ckpt: Mapping[str, Any], tables: Optional[Mapping[str, Any]] = None,
                    folder: Optional[str] = None) -> TrainingRecord:
    """What the card says of how the model was made, from a checkpoint's plain fields (its metrics and config):
    the command, the teacher, the data and the recipe. ``tables``: core.config's COMMANDS (for the command line);
    ``folder``: the bundle folder, which paths are made relative to."""
    ck = CheckpointView.from_json(dict(ckpt))
    metrics, config = Metrics.from_json(_plain(ck.metrics or {})), _plain(ck.config or {})
    command = "quantize" if ck.qat is not None else ("distill" if "student" in config else "train")
    data = _recorded(DataRecord.from_json(metrics.train_data)) if isinstance(metrics.train_data, dict) else None
    teacher = _recorded(TeacherRecord.from_json(metrics.teacher)) if isinstance(metrics.teacher, dict) else None
    settings = replace(Recipe.from_json(config), extra={})  # the config's recipe settings
    recipe = replace(settings, loss=metrics.loss or settings.loss, loss_params=metrics.loss_params,
                     epochs=metrics.epochs if metrics.epochs is not None else settings.epochs,
                     input_size=data.input_size if data else None,
                     augment=(data.augment if data else None) or settings.augment, pretrained=metrics.pretrained)
    return TrainingRecord(command=command,
                          command_line=command_line(command, config, (tables or {}).get(command), folder=folder),
                          edgekd=ck.edgekd_version, model=ck.model, params=ck.params, flops=ck.flops,
                          data_spec=ck.data, test_top1=metrics.test_top1, best_top1=metrics.best_top1,
                          teacher=teacher, data=data, recipe=recipe)


def bench_measurements(result: BenchResult, path: str) -> List[Measurement]:
    """The card's measurement records of one bundle folder from a bench result (results.json's record)."""
    env, device_envs = result.environment, result.device_environments or {}
    data = spec_for_file(result.data, path)
    out = []
    for row in result.rows:
        if os.path.abspath(str(row.path)) != os.path.abspath(path):
            continue
        where: MachineEnvironment = device_envs.get(row.device) or env
        out.append(Measurement(
            device=row.device, cpu=where.cpu, emulated=row.emulated, runtime=row.backend,
            runtime_version=where.versions.get(row.backend), precision=row.precision,
            runtime_precision=row.runtime_precision, threads=row.threads or result.settings.threads,
            batch_size=row.batch_size, p50_ms=row.latency_ms.p50 if row.latency_ms else None,
            p90_ms=row.latency_ms.p90 if row.latency_ms else None, peak_rss_mb=row.peak_rss_mb, top1=row.top1,
            images=row.images, data=data, status=row.status, measured_utc=env.started_utc, command=env.command,
            edgekd=env.edgekd, git_commit=env.git_commit))
    return out


def _key(m: Measurement) -> Tuple[Any, ...]:
    return (m.device, m.cpu, m.runtime, m.precision, m.threads, m.batch_size)


def merged(old: Sequence[Any], new: Sequence[Any], key: Callable[[Any], Any] = _key) -> List[Any]:
    """``old`` records with ``new`` ones replacing those of the same key (the newest measurement wins)."""
    keys = {key(n) for n in new}
    return ([o for o in old if key(o) not in keys] + list(new))[-MAX_ROWS:]


# ---------------------------------------------------------------------------------------------- reading

def read_block(path: str) -> CardBlock:
    """The ``edgekd`` record of a card's front matter (what the card was rendered from)."""
    if os.path.getsize(path) > MAX_CARD_BYTES:
        raise ValueError(f"{path!r} is larger than {MAX_CARD_BYTES // 1024 ** 2} MB")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.startswith("---\n") or "\n---\n" not in text[3:]:
        raise ValueError(f"{path!r} has no YAML front matter")
    meta = yaml.safe_load(text[4:text.index("\n---\n", 3)]) or {}
    front = CardFront.from_json(meta) if isinstance(meta, dict) else CardFront()
    block = CardBlock.from_json(front.edgekd) if isinstance(front.edgekd, dict) else None
    if block is None or block.card != CARD_SCHEMA:
        raise ValueError(f"{path!r} is not an edgekd model card (schema {CARD_SCHEMA})")
    return block


@dataclass
class CardFront(Record):
    """The card's front matter: Hugging Face's metadata, and edgekd's own block under ``edgekd``."""

    edgekd: Optional[Any] = None
    extra: Dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- writing

def add_card(folder: str, manifest: Dict[str, Any], ckpt: Mapping[str, Any], export_options: Any = None,
             tables: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Export: write MODEL_CARD.md into the staging ``folder`` and return ``manifest`` (a dict, not yet written)
    with the card among its checksummed files. ``ckpt``: the checkpoint (its dict, or a Mapping of it);
    ``export_options``: the export's options (ExportOptions: a dataclass of them)."""
    opts = {n: getattr(export_options, n) for n in getattr(export_options, "__dataclass_fields__", {})}
    out = getattr(export_options, "out", None)
    bundle = out or folder  # where the bundle will be: its paths are relative to it
    training = TrainingRecord.from_json(portable(training_record(ckpt, tables, bundle).to_json(), bundle))
    if out:
        opts = {**opts, "out": os.path.basename(os.path.normpath(out))}
    card_manifest = CardManifest.from_json(manifest)
    block = CardBlock(card=CARD_SCHEMA, training=training, export_command=command_line(
        "export", opts, (tables or {}).get("export"), positional=card_manifest.source.checkpoint,
        skip=[s for s in SKIP_IN_COMMAND if s != "out"], folder=bundle))
    return _write(folder, Manifest.from_dict(manifest), render(card_manifest, block)).to_dict()


def _write(folder: str, manifest: Manifest, text: str) -> Manifest:
    """Write the card (fsynced, then renamed into place) and return the manifest with its sha256 and size."""
    path = os.path.join(folder, CARD_FILE)
    tmp = os.path.join(folder, "." + CARD_FILE + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        # then the manifest (update_card): two renames; a crash between them leaves a card that fails verification
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # a file the manifest does not list would fail the bundle's verification
            os.unlink(tmp)
    files = dict(sorted({**manifest.files, CARD_FILE: sha256_file(path)}.items()))
    if manifest.record("size_bytes") is None:
        return manifest.with_changes(files=files)
    # the bundle's size is that of every listed file, the card included
    return manifest.with_changes(files=files, size_bytes=sum(os.path.getsize(os.path.join(folder, n)) for n in files))


@contextlib.contextmanager
def _locked(folder: str) -> Iterator[None]:
    """One updater at a time per bundle (two benches finishing together): a lock on the folder itself, so no
    lock file appears among the bundle's files."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def update_card(folder: str, change: Callable[[CardBlock], CardBlock], why: str = "update") -> bool:
    """Re-render ``folder``'s card with ``change(block)`` applied and rewrite the manifest's checksum of it.
    Returns False (logged) when the bundle has no card (made before cards) or its card is not the one its
    manifest lists (edited: never re-blessed)."""
    path = os.path.join(folder, CARD_FILE)
    if not os.path.isfile(path):
        log.info("bundle %s has no %s (exported before cards): not updated; export it again for a card",
                 folder, CARD_FILE)
        return False
    with _locked(folder):
        manifest = read_manifest(folder)
        if manifest.files.get(CARD_FILE) != sha256_file(path):
            log.warning("%s in %s does not match its sha256 in manifest.json (edited?): not updated (%s)",
                        CARD_FILE, folder, why)
            return False
        block = change(read_block(path))
        card = render(CardManifest.from_json(manifest.to_dict()), block)
        write_manifest(folder, _write(folder, manifest, card).to_dict())
    log.info("updated %s in %s (%s)", CARD_FILE, folder, why)
    return True


def _safely(folder: str, change: Callable[[CardBlock], CardBlock], why: str) -> bool:
    """An update that never fails the command it follows (a read-only bundle, a damaged card): logged instead."""
    try:
        return update_card(folder, change, why)
    except (OSError, ValueError) as e:
        log.warning("could not update %s in %s (%s): %s", CARD_FILE, folder, why, e)
    except Exception as e:  # EdgeKDError from the manifest's schema check, yaml's errors: the measurement stands
        log.warning("could not update %s in %s (%s): %s: %s", CARD_FILE, folder, why, type(e).__name__, e)
    return False


def record_bench(result: BenchResult) -> List[str]:
    """Bench: add the rows of every bundle folder it measured to that bundle's card; returns the folders updated."""
    done = []
    for path in sorted({r.path for r in result.rows if r.path}):
        if not os.path.isdir(path):
            continue  # a checkpoint (the teacher) has no card
        rows = bench_measurements(result, path)
        if rows and _safely(path, partial(_measured, rows=rows), "bench"):
            done.append(path)
    return done


def _measured(block: CardBlock, rows: List[Measurement]) -> CardBlock:
    """``block`` with bench's new ``rows`` merged into its measurements."""
    return replace(block, measurements=merged(block.measurements, rows))


def record_deploy(folder: str, device: str, dest: str, env: Dict[str, Any],
                  checked: Optional[Dict[str, Any]] = None) -> bool:
    """Deploy: note in ``folder``'s card that it was installed on ``device`` at ``dest`` and checked there
    (``env``: the device runner's environment; ``checked``: its check's answer, None when it could not run)."""
    there = MachineEnvironment.from_json(env)
    check = DeviceCheck.from_json(checked) if checked else None
    entry = Deployment(device=device, path=dest, cpu=there.cpu, machine=there.machine, emulated=there.emulated,
                       python=there.python, versions=there.versions or {},
                       checked="sha256, load, one batch" + (f", {check.parity_images} parity images agree"
                                                            if check.parity_images else "")
                       if check else "sha256 only (the device's Python lacks the runtime)",
                       installed_utc=_now())

    def key(d: Deployment) -> Tuple[str, Optional[str]]:
        return d.device, d.path

    return _safely(folder, lambda b: replace(b, deployments=merged(b.deployments, [entry], key)), "deploy")


def record_fit(folder: str, fit: Mapping[str, Any]) -> bool:
    """Fit: record how the model was chosen (a dict of plain values: budget, device, trials, why, report...)."""
    return _safely(folder, lambda b: replace(b, fit=dict(fit)), "fit")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
