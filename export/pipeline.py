"""``edgekd export``: checkpoint -> bundle folder (and optional zip), validated against PyTorch on real
held-out images before it is published. A failed check leaves nothing that looks like a bundle."""

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .. import EdgeKDError
from ..base.files import portable
from ..base.outdir import temp_prefix
from ..base.progress import bar
from ..bundle.card import add_card
from ..bundle.manifest import library_versions, sha256_file, write_manifest
from ..bundle.sessions import in_batches_of, open_model
from ..bundle.runtime import renamed
from ..core.config import COMMANDS
from ..core.data import Data, InputSpec, load_data
from ..core.loading import load_model
from . import calibration
from .formats import Format, check_request, get_format
from .job import Calibration, ExportJob, Reference, Request
from .ladder import Int8Ladder, TrainQat, fail_if
from .layer_report import layer_report
from .openvino import import_openvino
from .options import ExportOptions  # every option of edgekd export, declared once there
from .qat import fp32_student_record
from .quantize_onnx import cpu_features
from .records import (CalibrationRecord, Fallback, Int8Settings, LayerReport, Parity, QatSource, Rung, SpeedCheck,
                      SpeedRow, Validation)
from .speed import FASTER, SpeedJob
from .target import Target, remote_logits, resolve, where
from .validate import compare, gate, run_batched

log = logging.getLogger(__name__)
PARITY_FILE = "parity.npy"


def export_checkpoint(checkpoint: str, opts: ExportOptions, train_qat: Optional[TrainQat] = None) -> Dict[str, Any]:
    """Export ``checkpoint`` as ``opts`` says into the folder ``opts.out``; return the manifest written (its JSON).

    The steps: settle the request (format table), load the reference (the PyTorch model's logits on held-out
    test images), calibrate (static INT8), convert in a staging folder, validate against the reference (INT8:
    climb the ladder, export/ladder.py), write the manifest, publish. ``train_qat`` trains the INT8 ladder's last
    rung (``edgekd.cli.int8.train_qat``): export never trains, so without it the ladder stops at rung 2."""
    plan = _plan(opts)
    ref = load_reference(checkpoint, opts)
    # a QAT checkpoint needs calibration only where the format re-quantizes its trained weights (ONNX, --qat-onnx ort)
    needs_calib = plan.request.static and (not ref.qat or plan.format.qat_calibrates(opts))
    calib = calibration_set(ref, opts) if needs_calib else None
    return _build(ref, opts, plan, calib, train_qat)


@dataclass
class Plan:
    """What the format table settles for a request: the format, the request with its defaults, the fp tolerance,
    the device the bundle is for (--target), and the bundle's logits on the gate's images (the last validation)."""

    format: Format
    request: Request
    atol: Optional[float]
    target: Target
    out: str                     # the bundle folder
    outputs: Optional[np.ndarray] = None


def _plan(opts: ExportOptions) -> Plan:
    if opts.format is None or opts.out is None:  # the options refuse a missing --format or --out before this
        raise EdgeKDError("edgekd export needs --format and --out")
    request = check_request(opts.format, opts.precision, opts.quant, opts.calib_method, opts.int8_types)
    fmt = get_format(opts.format)
    if request.int8 and not opts.max_drop >= 0:  # NaN fails too
        raise EdgeKDError(f"--max-drop must be 0 or more points, got {opts.max_drop}")
    atol = opts.atol if opts.atol is not None else fmt.atol.get(opts.precision)
    # an ssh:// target is probed here, before anything is loaded
    return Plan(fmt, request, atol, resolve(opts.target, opts.ssh_config, opts.timeout), opts.out)


def load_reference(checkpoint: str, opts: ExportOptions) -> Reference:
    """The checkpoint's model, the validation data (``opts.data``, default: the checkpoint's) and the model's logits
    on ``opts.val_size`` of its test images, strided over the split."""
    import torch

    model, ckpt = load_model(checkpoint)
    if ckpt.qat is not None and opts.precision != "int8":
        raise EdgeKDError(f"{checkpoint!r} is a QAT checkpoint (edgekd quantize): export it with --precision int8")
    spec = ckpt.input
    dataset = load_data(opts.data or ckpt.data_spec(checkpoint) or "digits", opts.data_root, input_spec=spec)
    if len(dataset.classes) != len(ckpt.classes):
        raise EdgeKDError(f"checkpoint has {len(ckpt.classes)} classes but data {dataset.spec!r} "
                          f"has {len(dataset.classes)}")
    idx = calibration.strided_indices(len(dataset.test), opts.val_size)
    images, labels = calibration.load_images(dataset.test, idx, "validation images", bool(opts.progress))
    with torch.no_grad():
        logits = run_batched(lambda b: model(torch.from_numpy(b)).numpy(), images)
    return Reference(checkpoint, model, ckpt, spec, dataset, images, labels, logits)


def calibration_set(ref: Reference, opts: ExportOptions, spec: Optional[str] = None) -> Calibration:
    spec = spec or opts.calib_data or opts.data or ref.data_spec()
    data = ref.dataset if spec == ref.dataset.spec else load_data(spec, opts.data_root, input_spec=ref.spec)
    indices, record = calibration.draw(data.train, opts.calib_size, opts.seed, data_spec=data.spec, split="train",
                                       class_names=data.classes)
    images, _ = calibration.load_images(data.train, indices, "calibration images", bool(opts.progress))
    log.info("calibration: %d images from the train split of %s (seed %d, sha256 %s)",
             len(images), data.spec, opts.seed, record.files_sha256[:12])
    return Calibration(images, record, data)


@dataclass
class Outcome:
    """What the export found, the records manifest.json is written from."""

    validation: Validation
    seconds: float
    calibration: Optional[CalibrationRecord] = None     # INT8 only, like the rest
    fallback: Optional[Fallback] = None
    speed: Optional[SpeedCheck] = None
    layers: Optional[LayerReport] = None
    rungs: List[Rung] = field(default_factory=list)
    qat: Optional[QatSource] = None
    warnings: List[str] = field(default_factory=list)


def _build(ref: Reference, opts: ExportOptions, plan: Plan, calib: Optional[Calibration],
           train_qat: Optional[TrainQat]) -> Dict[str, Any]:
    """Convert in a staging folder beside ``opts.out``, gate, write the manifest, publish; nothing half-written."""
    out, fmt = plan.out, plan.request.format
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix="." + temp_prefix("bundle"))
    scratch = tempfile.mkdtemp(prefix=temp_prefix("export"))
    job = ExportJob(ref.model, ref.spec, staging, scratch, opts, plan.request, plan.target, ref.ckpt,
                    calib.images if calib else None)
    try:
        seconds = convert(job, plan.format, ref.qat)
        validation = validate(ref, staging, job.result.model_file, opts, plan)
        if plan.request.int8:
            outcome = _int8(ref, opts, plan, job, calib, validation, seconds, train_qat)
        else:
            fail_if(gate(validation, opts.precision, atol=plan.atol))
            outcome = Outcome(validation, seconds)
        # the machine's absolute paths (calibration data, sources) relative to the bundle folder
        manifest = portable(build_manifest(ref, opts, staging, job, outcome, plan), out)
        manifest = add_card(staging, manifest, ref.ckpt, opts, COMMANDS)  # MODEL_CARD.md, checksummed
        write_manifest(staging, manifest)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a bundle is meant to be shared
        if opts.zip:
            write_zip(staging, out)
        _publish(staging, out)
    except EdgeKDError as e:  # a message naming a file in the staging folder, removed below: name --out instead
        raise renamed(e, staging, out) from e
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in manifest["files"])
    log.info("exported %s %s in %.1f s, %.3f MB (%s)", fmt, opts.precision, outcome.seconds, size / 1e6, out)
    return manifest


def _int8(ref: Reference, opts: ExportOptions, plan: Plan, job: ExportJob, calib: Optional[Calibration],
          validation: Validation, seconds: float, train_qat: Optional[TrainQat]) -> Outcome:
    """INT8: the ladder, the speed check, the per-layer report, and their records."""
    ladder = Int8Ladder(ref, opts, plan.format, plan.request.static,
                        lambda folder, name: validate(ref, folder, name, opts, plan),
                        lambda spec: calibration_set(ref, opts, spec), calib, train_qat)
    validation, fallback = ladder.climb(job, validation)
    outcome = Outcome(validation, seconds + ladder.seconds, fallback=fallback, rungs=ladder.rungs)
    outcome.speed = _speed(opts, plan, job)
    data = ladder.calib.data if ladder.calib else ref.dataset
    # the QAT model keeps every layer INT8: no fallback layers to mark
    outcome.layers = _layer_report(opts, job, data, [] if ladder.qat_used else fallback.layers_in_float)
    calib = ladder.calib  # the last rung may have calibrated again
    outcome.calibration = CalibrationRecord(calib.record) if calib else CalibrationRecord(
        note="QAT: the quantizer ranges were trained (edgekd quantize)" if ref.qat
        else "dynamic INT8 uses no calibration")
    speed = outcome.speed
    if speed and speed.int8_faster is False:
        outcome.warnings.append("INT8 was not faster than FP32 on the exporting machine: " + ", ".join(
            f"batch {r.batch_size} {r.speedup:.2f}x" for r in speed.rows))
    ladder.finish(fallback, outcome.calibration)
    if ref.qat:
        outcome.qat = fp32_student_record(ref.ckpt, ref.images, ref.labels, validation.top1,
                                          os.path.dirname(os.path.abspath(ref.checkpoint)))
        validation.reference = "the QAT model in PyTorch (fake-quantized), like with like"
    return outcome


def _speed(opts: ExportOptions, plan: Plan, job: ExportJob) -> Optional[SpeedCheck]:
    if not opts.speed_check:
        return None
    if not plan.target.here:
        return SpeedCheck(status=f"skipped: the bundle is for {plan.target.name}, not this machine")
    if job.result.fp32_reference is None:
        raise RuntimeError("the conversion recorded no FP32 counterpart")  # the format's steps: our bug
    spec = job.input_spec
    return speed_check(plan.request.format, os.path.join(job.folder, job.result.model_file), job.result.fp32_reference,
                       (spec.channels, spec.height, spec.width))


def convert(job: ExportJob, fmt: Format, qat: bool) -> float:
    """Run the format's steps for this precision, in order; return the seconds they took."""
    start = time.perf_counter()
    # a QAT checkpoint (edgekd quantize) is converted as it was trained: no calibration, no fallback
    for step in fmt.qat_steps if qat else fmt.steps[job.precision]:
        t0 = time.perf_counter()
        step(job)
        log.debug("export step %s: %.1f s", step.__name__, time.perf_counter() - t0)
    return time.perf_counter() - start


def validate(ref: Reference, folder: str, model_file: str, opts: ExportOptions, plan: Plan) -> Validation:
    """The bundle's model file run by its runtime on the reference images, compared with the PyTorch logits: on
    this machine, or with --target ssh:// on the device itself."""
    fmt = plan.request.format
    static = plan.target.static_batch(fmt)
    if static:
        set_static_batch(os.path.join(folder, model_file), static, opts.precision)
    if plan.target.device is not None:
        log.info("parity gate on %s (%d images)", plan.target.name, len(ref.images))
        outputs = remote_logits(plan.target, folder, model_file, fmt, ref.images, static)
    else:
        session, _ = open_model(os.path.join(folder, model_file), fmt)
        if static:
            session = in_batches_of(session, static)
        with bar(total=len(ref.images), desc="validating", unit="img", disable=not opts.progress) as progress:
            def run(batch: np.ndarray) -> np.ndarray:
                progress.update(len(batch))
                return session(batch)

            outputs = run_batched(run, ref.images)
    plan.outputs = outputs
    validation = compare(ref.logits, outputs, ref.labels)
    validation.data, validation.split, validation.atol = ref.dataset.spec, "test", plan.atol
    validation.ran_on = where(plan.target)
    return validation


def write_parity(ref: Reference, opts: ExportOptions, plan: Plan, staging: str, count: int = 8) -> Parity:
    """--target: a few test images and the bundle's logits on them where the gate ran, which ``edgekd deploy``
    checks on the device before installing (``device_runner.py check``)."""
    np.save(os.path.join(staging, PARITY_FILE), np.ascontiguousarray(ref.images[:count], dtype=np.float32))
    loose = opts.precision != "fp32"  # fp16/int8 kernels differ between CPUs: a near-tie may flip
    outputs = plan.outputs if plan.outputs is not None else np.zeros((0, 0))
    return Parity(file=PARITY_FILE, images=min(count, len(ref.images)),
                  logits=np.asarray(outputs[:count], dtype=np.float64).round(6).tolist(),
                  atol=plan.atol if opts.precision in ("fp32", "fp16") else None,
                  min_agreement=0.875 if loose else 1.0,
                  source=plan.target.name if plan.target.device is not None else "this machine")


def set_static_batch(path: str, batch: int, precision: str) -> None:
    """Give an OpenVINO IR a static batch in place (a no-op when it has it already)."""
    ov = import_openvino()
    model = ov.Core().read_model(path)
    shape = model.input(0).get_partial_shape()
    if shape.is_static and shape[0].get_length() == batch:
        return
    dims = [batch] + [d.get_length() for d in list(shape)[1:]]
    model.reshape({model.input(0): ov.PartialShape(dims)})
    tmp = os.path.join(os.path.dirname(path), ".static-" + os.path.basename(path))
    ov.save_model(model, tmp, compress_to_fp16=precision == "fp16")
    del model
    os.replace(tmp, path)
    os.replace(tmp[:-4] + ".bin", path[:-4] + ".bin")


def _layer_report(opts: ExportOptions, job: ExportJob, data: Data, in_float: List[str]) -> Optional[LayerReport]:
    """int8: SQNR per layer against FP32 on train images of ``data`` (64, another seed than calibration)."""
    result = job.result
    # what ONNX Runtime quantized (same node names), else the format's FP32 counterpart
    fp32 = result.quantized_from or result.fp32_reference
    if fp32 is None:
        return None
    size = min(64, calibration.count(data.train))
    indices, _ = calibration.draw(data.train, size, opts.seed + 2, data_spec=data.spec, split="train",
                                  class_names=data.classes, purpose="layer report")
    images, _ = calibration.load_images(data.train, indices, "layer report images", bool(opts.progress))
    return layer_report(job.request.format, fp32, os.path.join(job.folder, result.model_file), images, job.scratch,
                        folder=job.folder, in_float=in_float)


def build_manifest(ref: Reference, opts: ExportOptions, staging: str, job: ExportJob, outcome: Outcome,
                   plan: Plan) -> Dict[str, Any]:
    """The bundle's manifest.json: its files and their sha256, the input contract, classes, provenance, parity,
    and for INT8 the ladder's records."""
    parity = write_parity(ref, opts, plan, staging) if opts.target else None
    files = {name: sha256_file(os.path.join(staging, name)) for name in sorted(os.listdir(staging))}
    missing = [name for name in plan.format.files if name not in files]
    fmt = plan.request.format
    if missing:  # the format table names the files its steps publish; a step that did not is our bug
        raise RuntimeError(f"the {fmt} export steps wrote no {', '.join(missing)}")
    ckpt, static = ref.ckpt, plan.target.static_batch(fmt)
    manifest: Dict[str, Any] = {
        "format": fmt, "precision": opts.precision, "model_file": job.result.model_file, "files": files,
        "input": _input_record(ref.spec, static), "classes": list(ckpt.classes),
        "model": ckpt.model, "params": ckpt.params, "flops": ckpt.flops, "data": ref.dataset.spec,
        "source": {"checkpoint": os.path.basename(ref.checkpoint), "sha256": sha256_file(ref.checkpoint)},
        "validation": outcome.validation.to_dict(), "export_seconds": round(outcome.seconds, 3),
        "size_bytes": sum(os.path.getsize(os.path.join(staging, n)) for n in files),
        "runtime": {"library": plan.format.runtime, "inference_precision": plan.format.inference_precision},
        "versions": library_versions(),
    }
    if parity:
        quant = job.result.quantization
        types = quant.types if isinstance(quant, Int8Settings) else None
        manifest.update(parity=parity.to_dict(), target=plan.target.record(fmt, types),
                        batch_sizes=[static] if static else "any")
    if plan.request.int8:
        manifest.update(_int8_records(job, outcome))
    return manifest


def _input_record(spec: InputSpec, static: Optional[int]) -> Dict[str, Any]:
    """The manifest's ``input``: the preprocessing contract the bundle's runner reproduces."""
    record: Dict[str, Any] = {
        "shape": [static or -1, spec.channels, spec.height, spec.width], "layout": "NCHW", "dtype": "float32",
        "mean": spec.mean, "std": spec.std, "color": spec.color, "resize": [spec.height, spec.width],
        "scale": 1 / 255, "resample": "bilinear"}
    if spec.crop_pct is not None:
        record.update(crop_pct=spec.crop_pct, resize_mode="shorter side, center crop")
    return record


def _int8_records(job: ExportJob, outcome: Outcome) -> Dict[str, Any]:
    quant = job.result.quantization
    records: Dict[str, Any] = {
        "calibration": outcome.calibration.to_dict() if outcome.calibration else None,
        "quantization": {**(quant.to_dict() if quant else {}), "layers": job.result.quantizable_layers},
        "fallback": outcome.fallback.to_dict() if outcome.fallback else None,
        "speed_check": outcome.speed.to_dict() if outcome.speed else None,
    }
    if outcome.warnings:
        records["warnings"] = list(outcome.warnings)
    records["int8_layers"] = outcome.layers.to_dict() if outcome.layers else None
    records["ladder"] = [r.to_dict() for r in outcome.rungs]
    if outcome.qat:
        records["qat"] = outcome.qat.to_dict()
    return records


def speed_check(fmt: str, int8_path: str, fp32_path: str, shape: Tuple[int, int, int]) -> SpeedCheck:
    """Time FP32 against INT8 (the same runtime) in a torch-free subprocess; warn when INT8 is not faster here."""
    path = os.path.join(os.path.dirname(fp32_path), "speed-job.json")
    SpeedJob(format=fmt, int8_path=int8_path, fp32_format=fmt, fp32_path=fp32_path, shape=list(shape)).write(path)
    env = dict(os.environ, OPENVINO_TELEMETRY_OPT_OUT="1")
    proc = subprocess.run([sys.executable, "-m", "edgekd.export.speed", path], capture_output=True, text=True,
                          env=env, timeout=300)
    if proc.returncode != 0:
        log.warning("the INT8 speed check failed: %s", (proc.stderr.strip().splitlines() or ["?"])[-1])
        return SpeedCheck(status="failed")
    rows = [SpeedRow.from_dict(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]
    slow = [r for r in rows if r.speedup < FASTER]
    for r in slow:
        log.warning("INT8 is not faster than FP32 on this machine at batch %d: %.3f ms vs %.3f ms (%.2fx)",
                    r.batch_size, r.int8_ms, r.fp32_ms, r.speedup)
    return SpeedCheck(rows=rows, int8_faster=not slow, threshold=FASTER, machine=_machine())


def _machine() -> Dict[str, Any]:
    arch, flags = cpu_features()
    return {"arch": arch, "cores": os.cpu_count(), "processor": platform.processor() or arch,
            "vnni": sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}), "avx2": "avx2" in flags}


def write_zip(folder: str, out: str) -> str:
    """``OUT.zip`` holding the bundle under one top folder named like OUT; written atomically."""
    name = os.path.basename(os.path.normpath(out))
    target = os.path.abspath(out).rstrip(os.sep) + ".zip"
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix="." + temp_prefix("zip"))
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for entry in sorted(os.listdir(folder)):
                z.write(os.path.join(folder, entry), f"{name}/{entry}")
        os.chmod(tmp, 0o644)  # mkstemp made it private; a bundle is meant to be shared
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return target


def _publish(staging: str, out: str) -> None:
    """Swap the finished bundle into place; an older bundle at ``out`` is removed only afterwards."""
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out)), prefix="." + temp_prefix("old"))
        os.rmdir(old)
        os.replace(out, old)
    os.replace(staging, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)
