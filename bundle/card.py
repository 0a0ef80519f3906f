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
from datetime import datetime, timezone

from ..base.files import portable, spec_for_file
from .card_text import CARD_SCHEMA, render
from .manifest import read_manifest, sha256_file, write_manifest

log = logging.getLogger(__name__)

CARD_FILE = "MODEL_CARD.md"
MAX_CARD_BYTES = 4 * 1024 ** 2     # a card is a few kilobytes; far beyond is damage, refused before parsing
MAX_ROWS = 500                     # measurements and deployments kept (the newest), so a card stays readable
SKIP_IN_COMMAND = ("out", "resume", "force", "config", "progress")  # where a run wrote, not how it was made
TEACHER_KEYS = ("spec", "model", "kind", "source", "file", "sha256", "test_top1", "params", "epochs", "black_box")
DATA_KEYS = ("spec", "train_images", "labelled_images", "unlabeled_images", "unlabeled", "train_subset",
             "skipped_bad_images", "test_images", "augment", "input_size", "crop_pct", "norm", "seed")
RECIPE_CONFIG_KEYS = ("batch_size", "optimizer", "lr", "schedule", "warmup_epochs", "weight_decay", "momentum",
                      "label_smoothing", "seed", "teacher_cache")


# ---------------------------------------------------------------------------------------------- records

def command_line(command, values, table, positional=None, skip=SKIP_IN_COMMAND, folder=None):
    """``edgekd COMMAND`` with the options of ``values`` that differ from their defaults in ``table`` (core.config's
    option list for the command: objects with name, flag, default, kind, negate, positional, yaml). With ``folder``,
    absolute paths (a teacher file, ``imagefolder:/data/x``) are written relative to it, as every edgekd record is."""
    if not values or table is None:
        return None
    get = values.get if isinstance(values, dict) else (lambda name: getattr(values, name, None))  # options object
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


def _pick(record, keys):
    record = record if isinstance(record, dict) else {}
    return {k: record[k] for k in keys if record.get(k) is not None}


def _plain(record):
    """JSON's plain types only (a value of another type, say a tensor in an old checkpoint's metrics, as text)."""
    return json.loads(json.dumps(record, default=str))


def training_record(ckpt, tables=None, folder=None):
    """What the card says of how the model was made, from a checkpoint's plain fields (its metrics and config):
    the command, the teacher, the data and the recipe. ``tables``: core.config's COMMANDS (for the command line);
    ``folder``: the bundle folder, which paths are made relative to."""
    metrics, config = _plain(ckpt.get("metrics") or {}), _plain(ckpt.get("config") or {})
    command = "quantize" if "qat" in ckpt else ("distill" if "student" in config else "train")
    data = _pick(metrics.get("train_data"), DATA_KEYS)
    recipe = {"loss": metrics.get("loss") or config.get("loss"), "loss_params": metrics.get("loss_params"),
              "epochs": metrics.get("epochs", config.get("epochs")), "input_size": data.get("input_size"),
              "augment": data.get("augment") or config.get("augment"), "pretrained": metrics.get("pretrained"),
              **_pick(config, RECIPE_CONFIG_KEYS)}
    return {"command": command,
            "command_line": command_line(command, config, (tables or {}).get(command), folder=folder),
            "edgekd": ckpt.get("edgekd_version"), "model": ckpt.get("model"), "params": ckpt.get("params"),
            "flops": ckpt.get("flops"), "data_spec": ckpt.get("data"),
            "test_top1": metrics.get("test_top1"), "best_top1": metrics.get("best_top1"),
            "teacher": _pick(metrics.get("teacher"), TEACHER_KEYS) or None,
            "data": data or None, "recipe": {k: v for k, v in recipe.items() if v is not None}}


def bench_measurements(result, path):
    """The card's measurement records of one bundle folder from a bench result (results.json's dict)."""
    env, device_envs = result.get("environment") or {}, result.get("device_environments") or {}
    out = []
    for row in result.get("rows") or []:
        if os.path.abspath(str(row.get("path"))) != os.path.abspath(path):
            continue
        where = device_envs.get(row["device"]) or env
        latency = row.get("latency_ms") or {}
        out.append({
            "device": row["device"], "cpu": where.get("cpu"), "emulated": row.get("emulated"),
            "runtime": row["backend"], "runtime_version": (where.get("versions") or {}).get(row["backend"]),
            "precision": row["precision"], "runtime_precision": row.get("runtime_precision"),
            "threads": row.get("threads") or (result.get("settings") or {}).get("threads"),
            "batch_size": row["batch_size"], "p50_ms": latency.get("p50"), "p90_ms": latency.get("p90"),
            "peak_rss_mb": row.get("peak_rss_mb"), "top1": row.get("top1"), "images": row.get("images"),
            "data": portable({"data": result.get("data")}, path)["data"], "status": row.get("status"),
            "measured_utc": env.get("started_utc"), "command": env.get("command"), "edgekd": env.get("edgekd"),
            "git_commit": env.get("git_commit")})
    return out


def _key(m):
    return (m.get("device"), m.get("cpu"), m.get("runtime"), m.get("precision"), m.get("threads"), m.get("batch_size"))


def merged(old, new, key=_key):
    """``old`` records with ``new`` ones replacing those of the same key (the newest measurement wins)."""
    keys = {key(n) for n in new}
    return ([o for o in old if key(o) not in keys] + list(new))[-MAX_ROWS:]


# ---------------------------------------------------------------------------------------------- reading

def read_block(path):
    """The ``edgekd`` record of a card's front matter (what the card was rendered from)."""
    import yaml

    if os.path.getsize(path) > MAX_CARD_BYTES:
        raise ValueError(f"{path!r} is larger than {MAX_CARD_BYTES // 1024 ** 2} MB")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.startswith("---\n") or "\n---\n" not in text[3:]:
        raise ValueError(f"{path!r} has no YAML front matter")
    meta = yaml.safe_load(text[4:text.index("\n---\n", 3)]) or {}
    block = meta.get("edgekd") if isinstance(meta, dict) else None
    if not isinstance(block, dict) or block.get("card") != CARD_SCHEMA:
        raise ValueError(f"{path!r} is not an edgekd model card (schema {CARD_SCHEMA})")
    return block


# ---------------------------------------------------------------------------------------------- writing

def add_card(folder, manifest, ckpt, export_options=None, tables=None):
    """Export: write MODEL_CARD.md into the staging ``folder`` and return ``manifest`` (a dict, not yet written)
    with the card among its checksummed files. ``ckpt``: the checkpoint (its dict, or a Mapping of it);
    ``export_options``: the export's options (ExportOptions, or a dict of them); ``tables``: core.config's COMMANDS."""
    opts = {n: getattr(export_options, n) for n in export_options.__dataclass_fields__} if hasattr(
        export_options, "__dataclass_fields__") else dict(export_options or {})
    bundle = opts.get("out") or folder  # where the bundle will be: its paths are relative to it
    training = portable(training_record(ckpt, tables, bundle), bundle)
    if opts.get("out"):
        opts["out"] = os.path.basename(os.path.normpath(opts["out"]))
    source = (manifest.get("source") or {}).get("checkpoint")
    block = {"card": CARD_SCHEMA, "training": training, "measurements": [], "deployments": [],
             "export_command": command_line("export", opts, (tables or {}).get("export"), positional=source,
                                           skip=[s for s in SKIP_IN_COMMAND if s != "out"], folder=bundle)}
    return _write(folder, manifest, render(manifest, block))


def _write(folder, manifest, text):
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
    files = {**manifest["files"], CARD_FILE: sha256_file(path)}
    out = {**manifest, "files": dict(sorted(files.items()))}
    if "size_bytes" in out:  # the bundle's size is that of every listed file, the card included
        out["size_bytes"] = sum(os.path.getsize(os.path.join(folder, n)) for n in files)
    return out


@contextlib.contextmanager
def _locked(folder):
    """One updater at a time per bundle (two benches finishing together): a lock on the folder itself, so no
    lock file appears among the bundle's files."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def update_card(folder, change, why="update"):
    """Re-render ``folder``'s card with ``change(block)`` applied and rewrite the manifest's checksum of it.
    Returns False (logged) when the bundle has no card (made before cards) or its card is not the one its
    manifest lists (edited: never re-blessed)."""
    path = os.path.join(folder, CARD_FILE)
    if not os.path.isfile(path):
        log.info("bundle %s has no %s (exported before cards): not updated; export it again for a card",
                 folder, CARD_FILE)
        return False
    with _locked(folder):
        manifest = read_manifest(folder).to_dict()
        if manifest["files"].get(CARD_FILE) != sha256_file(path):
            log.warning("%s in %s does not match its sha256 in manifest.json (edited?): not updated (%s)",
                        CARD_FILE, folder, why)
            return False
        block = change(read_block(path))
        write_manifest(folder, _write(folder, manifest, render(manifest, block)))
    log.info("updated %s in %s (%s)", CARD_FILE, folder, why)
    return True


def _safely(folder, change, why):
    """An update that never fails the command it follows (a read-only bundle, a damaged card): logged instead."""
    try:
        return update_card(folder, change, why)
    except (OSError, ValueError) as e:
        log.warning("could not update %s in %s (%s): %s", CARD_FILE, folder, why, e)
    except Exception as e:  # EdgeKDError from the manifest's schema check, yaml's errors: the measurement stands
        log.warning("could not update %s in %s (%s): %s: %s", CARD_FILE, folder, why, type(e).__name__, e)
    return False


def record_bench(result):
    """Bench: add the rows of every bundle folder it measured to that bundle's card; returns the folders updated."""
    done = []
    for path in sorted({r.get("path") for r in result.get("rows") or [] if r.get("path")}):
        if not os.path.isdir(path):
            continue  # a checkpoint (the teacher) has no card
        rows = bench_measurements(result, path)
        if rows and _safely(path, lambda b, rows=rows: {**b, "measurements": merged(b.get("measurements") or [], rows)},
                            "bench"):
            done.append(path)
    return done


def record_deploy(folder, device, dest, env, checked=None):
    """Deploy: note in ``folder``'s card that it was installed on ``device`` at ``dest`` and checked there."""
    checked = checked or {}
    entry = {"device": device, "path": dest, "cpu": env.get("cpu"), "machine": env.get("machine"),
             "emulated": env.get("emulated"), "python": env.get("python"), "versions": env.get("versions") or {},
             "checked": "sha256, load, one batch" + (f", {checked['parity_images']} parity images agree"
                                                     if checked.get("parity_images") else "")
             if checked else "sha256 only (the device's Python lacks the runtime)",
             "installed_utc": _now()}
    key = lambda d: (d.get("device"), d.get("path"))  # noqa: E731
    return _safely(folder, lambda b: {**b, "deployments": merged(b.get("deployments") or [], [entry], key)}, "deploy")


def record_fit(folder, fit):
    """Fit: record how the model was chosen (a dict of plain values: budget, device, trials, why, report...)."""
    return _safely(folder, lambda b: {**b, "fit": dict(fit)}, "fit")


def _now():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

