"""``edgekd export``: checkpoint -> bundle folder (and optional zip), validated against PyTorch on real
held-out images before it is published. A failed check leaves nothing that looks like a bundle."""

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import EdgeKDError
from .options import ExportOptions  # noqa: F401  (every option of edgekd export, declared once there)
from ..base.files import portable
from ..base.outdir import temp_prefix

from . import calibration
from .formats import FORMATS, check_request
from ..bundle.manifest import library_versions, sha256_file, write_manifest
from ..bundle.card import add_card
from ..core.config import COMMANDS
from .ladder import Int8Ladder, fail_if
from .validate import compare, gate, run_batched

log = logging.getLogger(__name__)


@dataclass
class ExportJob:
    """What a format's exporter receives."""

    model: object
    input_spec: object
    folder: str        # the staging bundle folder: write only the bundle's files here
    scratch: str       # intermediate files (FP32 ONNX, calibration cache), deleted afterwards
    precision: str
    options: dict
    calib: np.ndarray = None
    progress: bool = True
    info: dict = field(default_factory=dict)   # what the steps found: model_file, fp32_reference, quantization...
    state: dict = field(default_factory=dict)  # in-memory objects a format's steps pass on (an OpenVINO model)


def export_checkpoint(checkpoint, opts, train_qat=None):
    """Export ``checkpoint`` as ``opts`` says into the folder ``opts.out``; return the manifest.

    The steps: settle the request (format table), load the reference (the PyTorch model's logits on held-out
    test images), calibrate (static INT8), convert in a staging folder, validate against the reference (INT8:
    climb the ladder, export/ladder.py), write the manifest, publish. ``train_qat`` trains the INT8 ladder's last
    rung (``edgekd.cli.int8.train_qat``): export never trains, so without it the ladder stops at rung 2."""
    plan = _plan(opts)
    ref = load_reference(checkpoint, opts)
    # a QAT checkpoint needs calibration only where the format re-quantizes its trained weights (ONNX, --qat-onnx ort)
    needs_calib = plan.static and (not ref.qat or FORMATS.meta(opts.format)["qat_calibrates"](asdict(opts)))
    calib = calibration_set(ref, opts) if needs_calib else None
    return _build(ref, opts, plan, calib, train_qat)


@dataclass
class Plan:
    """What the format table settles for a request: its metadata, whether it is (static) INT8, the fp tolerance."""

    meta: dict
    int8: bool
    static: bool
    atol: float
    target: object = None        # export/target.py's Target: the device the bundle is for (--target)
    outputs: object = None       # the bundle's logits on the gate's images, from the last validation


def _plan(opts):
    from .target import resolve

    meta = check_request(opts.format, opts.precision, opts.quant, opts.calib_method, opts.int8_types)
    int8 = opts.precision == "int8"
    if int8 and not opts.max_drop >= 0:  # NaN fails too
        raise EdgeKDError(f"--max-drop must be 0 or more points, got {opts.max_drop}")
    atol = opts.atol if opts.atol is not None else meta["atol"].get(opts.precision)
    # an ssh:// target is probed here, before anything is loaded
    target = resolve(getattr(opts, "target", None), getattr(opts, "ssh_config", None), getattr(opts, "timeout", 600))
    return Plan(meta, int8, int8 and meta["quant"] == "static", atol, target)


@dataclass
class Reference:
    """The checkpoint and what each bundle of it is checked against: its PyTorch model's logits on test images."""

    checkpoint: str
    model: object
    ckpt: dict
    spec: object                 # the checkpoint's InputSpec
    dataset: object              # the validation data (and, by default, the calibration data)
    images: np.ndarray           # the held-out test images of the gate, and their labels
    labels: np.ndarray
    logits: np.ndarray           # the PyTorch model's logits on them

    @property
    def qat(self):
        """A QAT checkpoint (edgekd quantize): exported as it was trained, INT8 only."""
        return "qat" in self.ckpt


def load_reference(checkpoint, opts):
    """The checkpoint's model, the validation data (``opts.data``, default: the checkpoint's) and the model's logits
    on ``opts.val_size`` of its test images, strided over the split."""
    import torch

    from ..core.data import InputSpec
    from ..core.loading import load_model

    model, ckpt = load_model(checkpoint)
    if "qat" in ckpt and opts.precision != "int8":
        raise EdgeKDError(f"{checkpoint!r} is a QAT checkpoint (edgekd quantize): export it with --precision int8")
    spec = InputSpec.from_dict(ckpt["input"])
    dataset = load_data_for(opts.data or checkpoint_data(ckpt, checkpoint) or "digits", opts.data_root, spec)
    if len(dataset.classes) != len(ckpt["classes"]):
        raise EdgeKDError(f"checkpoint has {len(ckpt['classes'])} classes but data {dataset.spec!r} "
                          f"has {len(dataset.classes)}")
    idx = calibration.strided_indices(len(dataset.test), opts.val_size)
    images, labels = calibration.load_images(dataset.test, idx, "validation images", opts.progress)
    with torch.no_grad():
        logits = run_batched(lambda b: model(torch.from_numpy(b)).numpy(), images)
    return Reference(checkpoint, model, ckpt, spec, dataset, images, labels, logits)


def checkpoint_data(ckpt, checkpoint):
    """The checkpoint's data spec (an image folder is recorded relative to the checkpoint's folder)."""
    from ..base.files import spec_from_file

    return spec_from_file(ckpt.get("data"), os.path.dirname(os.path.abspath(checkpoint)))


@dataclass
class Calibration:
    """Class-stratified train images that set INT8 ranges, the data they came from, and their record."""

    images: np.ndarray
    record: dict
    data: object


def calibration_set(ref, opts, spec=None):
    spec = spec or opts.calib_data or opts.data or checkpoint_data(ref.ckpt, ref.checkpoint) or "digits"
    data = ref.dataset if spec == ref.dataset.spec else load_data_for(spec, opts.data_root, ref.spec)
    indices, record = calibration.select(data.train, opts.calib_size, opts.seed, data_spec=data.spec, split="train",
                                         class_names=data.classes)
    images, _ = calibration.load_images(data.train, indices, "calibration images", opts.progress)
    log.info("calibration: %d images from the train split of %s (seed %d, sha256 %s)",
             len(images), data.spec, opts.seed, record["files_sha256"][:12])
    return Calibration(images, record, data)


def _build(ref, opts, plan, calib, train_qat):
    """Convert in a staging folder beside ``opts.out``, gate, write the manifest, publish; nothing half-written."""
    out = opts.out
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix="." + temp_prefix("bundle"))
    scratch = tempfile.mkdtemp(prefix=temp_prefix("export"))
    job = ExportJob(ref.model, ref.spec, staging, scratch, opts.precision,
                    {**asdict(opts), "quant": plan.meta["quant"], "calib_method": plan.meta["calib_method"],
                     "int8_types": opts.int8_types or "auto", "classes": list(ref.ckpt["classes"]),
                     "target_features": (plan.target.arch, plan.target.flags), "target": plan.target.name},
                    calib.images if calib else None, opts.progress)
    job.state["ckpt"] = ref.ckpt
    try:
        seconds = convert(job, opts.format, ref.qat)
        validation = validate(ref, staging, job.info["model_file"], opts, plan.atol, plan)
        if plan.int8:
            manifest = _int8(ref, opts, plan, job, calib, validation, seconds, train_qat)
        else:
            fail_if(gate(validation, opts.precision, atol=plan.atol))
            manifest = build_manifest(ref, opts, staging, job.info, validation, seconds, plan)
        # the machine's absolute paths (calibration data, sources) relative to the bundle folder
        manifest = portable(manifest, out)
        manifest = add_card(staging, manifest, ref.ckpt, opts, COMMANDS)  # MODEL_CARD.md, checksummed
        write_manifest(staging, manifest)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a bundle is meant to be shared
        if opts.zip:
            write_zip(staging, out)
        _publish(staging, out)
    except EdgeKDError as e:  # a message naming a file in the staging folder, removed below: name --out instead
        from ..bundle.runtime import renamed

        raise renamed(e, staging, out) from e
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in manifest["files"])
    log.info("exported %s %s in %.1f s, %.3f MB (%s)", opts.format, opts.precision, manifest["export_seconds"],
             size / 1e6, out)
    return manifest


def _int8(ref, opts, plan, job, calib, validation, seconds, train_qat):
    """INT8: the ladder, the speed check, the per-layer report, and their parts of the manifest."""
    ladder = Int8Ladder(ref, opts, plan.static, lambda folder, name: validate(ref, folder, name, opts, plan.atol, plan),
                        lambda spec: calibration_set(ref, opts, spec), calib, train_qat)
    validation, fallback = ladder.climb(job, validation)
    seconds += ladder.seconds
    info, staging = job.info, job.folder
    speed = None
    if opts.speed_check and not plan.target.here:
        speed = {"status": f"skipped: the bundle is for {plan.target.name}, not this machine"}
    elif opts.speed_check:
        speed = speed_check(opts.format, os.path.join(staging, info["model_file"]), info["fp32_reference"],
                            (ref.spec.channels, ref.spec.height, ref.spec.width))
    data = ladder.calib.data if ladder.calib else ref.dataset
    # the QAT model keeps every layer INT8: no fallback layers to mark
    layers = _layer_report(opts, job, data, None if ladder.qat_used else fallback)
    calib = ladder.calib  # the last rung may have calibrated again
    manifest = build_manifest(ref, opts, staging, info, validation, seconds, plan)
    manifest["calibration"] = calib.record if calib else {
        "images": 0, "note": "QAT: the quantizer ranges were trained (edgekd quantize)" if ref.qat
        else "dynamic INT8 uses no calibration"}
    manifest["quantization"] = info.get("quantization", {})
    manifest["quantization"]["layers"] = info.get("quantizable_layers")
    manifest["fallback"] = fallback
    manifest["speed_check"] = speed
    if speed and speed.get("int8_faster") is False:
        manifest.setdefault("warnings", []).append(
            "INT8 was not faster than FP32 on the exporting machine: " + ", ".join(
                f"batch {r['batch_size']} {r['speedup']:.2f}x" for r in speed["rows"]))
    manifest["int8_layers"] = layers
    ladder.record(manifest, job)
    if ref.qat:
        from .qat import fp32_student_record

        manifest["qat"] = fp32_student_record(ref.ckpt, ref.images, ref.labels, validation["top1"],
                                              os.path.dirname(os.path.abspath(ref.checkpoint)))
        manifest["validation"]["reference"] = "the QAT model in PyTorch (fake-quantized), like with like"
    return manifest


def convert(job, fmt, qat):
    """Run the format's steps for this precision, in order; return the seconds they took."""
    start = time.perf_counter()
    # a QAT checkpoint (edgekd quantize) is converted as it was trained: no calibration, no fallback
    steps = FORMATS.meta(fmt)["qat_steps"] if qat else FORMATS.get(fmt)[job.precision]
    for step in steps:
        t0 = time.perf_counter()
        job.info.update(step(job) or {})
        log.debug("export step %s: %.1f s", step.__name__, time.perf_counter() - t0)
    return time.perf_counter() - start


def validate(ref, folder, model_file, opts, atol, plan):
    """The bundle's model file run by its runtime on the reference images, compared with the PyTorch logits: on
    this machine, or with --target ssh:// on the device itself."""
    from ..base.progress import bar
    from ..bundle.runner import in_batches_of, open_model
    from .target import remote_logits, where

    static = plan.target.static_batch(opts.format)
    if static:
        set_static_batch(os.path.join(folder, model_file), static, opts.precision)
    if plan.target.device is not None:
        log.info("parity gate on %s (%d images)", plan.target.name, len(ref.images))
        outputs = remote_logits(plan.target, folder, model_file, opts.format, ref.images, static)
    else:
        session, _ = open_model(os.path.join(folder, model_file), opts.format)
        if static:
            session = in_batches_of(session, static)
        with bar(total=len(ref.images), desc="validating", unit="img", disable=not opts.progress) as progress:
            def run(batch):
                progress.update(len(batch))
                return session(batch)

            outputs = run_batched(run, ref.images)
    plan.outputs = outputs
    validation = compare(ref.logits, outputs, ref.labels)
    validation.update(data=ref.dataset.spec, split="test", atol=atol, ran_on=where(plan.target))
    return validation


PARITY_FILE = "parity.npy"


def write_parity(ref, opts, plan, staging, count=8):
    """--target: a few test images and the bundle's logits on them where the gate ran, which ``edgekd deploy``
    checks on the device before installing (``device_runner.py check``)."""
    np.save(os.path.join(staging, PARITY_FILE), np.ascontiguousarray(ref.images[:count], dtype=np.float32))
    loose = opts.precision != "fp32"  # fp16/int8 kernels differ between CPUs: a near-tie may flip
    return {"file": PARITY_FILE, "images": min(count, len(ref.images)),
            "logits": np.asarray(plan.outputs[:count], dtype=np.float64).round(6).tolist(),
            "atol": plan.atol if opts.precision in ("fp32", "fp16") else None,
            "min_agreement": 0.875 if loose else 1.0,
            "from": plan.target.name if plan.target.device is not None else "this machine"}


def set_static_batch(path, batch, precision):
    """Give an OpenVINO IR a static batch in place (a no-op when it has it already)."""
    from .openvino import import_openvino

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


def _layer_report(opts, job, data, fallback):
    """int8: SQNR per layer against FP32 on train images of ``data`` (64, another seed than calibration)."""
    from .layer_report import layer_report

    info = job.info
    # what ONNX Runtime quantized (same node names), else the format's FP32 counterpart
    fp32 = info.get("quantized_from") or info.get("fp32_reference")
    if fp32 is None:
        return None
    size = min(64, len(data.train))
    indices, _ = calibration.select(data.train, size, opts.seed + 2, data_spec=data.spec, split="train",
                                    class_names=data.classes, purpose="layer report")
    images, _ = calibration.load_images(data.train, indices, "layer report images", opts.progress)
    return layer_report(opts.format, fp32, os.path.join(job.folder, info["model_file"]), images, job.scratch,
                        folder=job.folder, in_float=(fallback or {}).get("layers_in_float", ()))


def build_manifest(ref, opts, staging, info, validation, seconds, plan):
    """The bundle's manifest.json: its files and their sha256, the input contract, classes, provenance, parity."""
    spec, ckpt = ref.spec, ref.ckpt
    parity = write_parity(ref, opts, plan, staging) if getattr(opts, "target", None) else None
    static = plan.target.static_batch(opts.format)
    files = {name: sha256_file(os.path.join(staging, name)) for name in sorted(os.listdir(staging))}
    missing = [name for name in FORMATS.meta(opts.format)["files"] if name not in files]
    if missing:  # the format table names the files its steps publish; a step that did not is our bug
        raise RuntimeError(f"the {opts.format} export steps wrote no {', '.join(missing)}")
    manifest = {
        "format": opts.format, "precision": opts.precision, "model_file": info["model_file"], "files": files,
        "input": {"shape": [static or -1, spec.channels, spec.height, spec.width], "layout": "NCHW", "dtype": "float32",
                  "mean": spec.mean, "std": spec.std, "color": spec.color, "resize": [spec.height, spec.width],
                  "scale": 1 / 255, "resample": "bilinear",
                  **({"crop_pct": spec.crop_pct, "resize_mode": "shorter side, center crop"}
                     if spec.crop_pct is not None else {})},
        "classes": list(ckpt["classes"]),
        "model": ckpt["model"], "params": ckpt.get("params"), "flops": ckpt.get("flops"), "data": ref.dataset.spec,
        "source": {"checkpoint": os.path.basename(ref.checkpoint), "sha256": sha256_file(ref.checkpoint)},
        "validation": validation, "export_seconds": round(seconds, 3),
        "size_bytes": sum(os.path.getsize(os.path.join(staging, n)) for n in files),
        "runtime": {"library": FORMATS.meta(opts.format)["runtime"],
                    "inference_precision": FORMATS.meta(opts.format)["inference_precision"]},
        "versions": library_versions(),
    }
    if parity:
        quant = info.get("quantization") or {}
        types = ("".join(("u" if quant[k] == "uint8" else "s") + "8" for k in ("activation_type", "weight_type"))
                 if "activation_type" in quant else None)
        manifest.update(parity=parity, target=plan.target.record(opts.format, types),
                        batch_sizes=[static] if static else "any")
    return manifest


def speed_check(fmt, int8_path, fp32_path, shape):
    """Time FP32 against INT8 (the same runtime) in a torch-free subprocess; warn when INT8 is not faster here."""
    job = {"format": fmt, "int8_path": int8_path, "fp32_format": fmt, "fp32_path": fp32_path, "shape": list(shape)}
    path = os.path.join(os.path.dirname(fp32_path), "speed-job.json")
    with open(path, "w") as f:
        json.dump(job, f)
    env = dict(os.environ, OPENVINO_TELEMETRY_OPT_OUT="1")
    proc = subprocess.run([sys.executable, "-m", "edgekd.export.speed", path], capture_output=True, text=True,
                          env=env, timeout=300)
    if proc.returncode != 0:
        log.warning("the INT8 speed check failed: %s", (proc.stderr.strip().splitlines() or ["?"])[-1])
        return {"status": "failed"}
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    from .speed import FASTER

    slow = [r for r in rows if r["speedup"] < FASTER]
    for r in slow:
        log.warning("INT8 is not faster than FP32 on this machine at batch %d: %.3f ms vs %.3f ms (%.2fx)",
                    r["batch_size"], r["int8_ms"], r["fp32_ms"], r["speedup"])
    return {"rows": rows, "int8_faster": not slow, "threshold": FASTER, "machine": _machine()}


def load_data_for(spec, data_root, input_spec):
    from ..core.data import load_data

    return load_data(spec, data_root, input_spec=input_spec)


def _machine():
    import platform

    from .quantize_onnx import cpu_features

    arch, flags = cpu_features()
    return {"arch": arch, "cores": os.cpu_count(), "processor": platform.processor() or arch,
            "vnni": sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}), "avx2": "avx2" in flags}


def write_zip(folder, out):
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


def _publish(staging, out):
    """Swap the finished bundle into place; an older bundle at ``out`` is removed only afterwards."""
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out)), prefix="." + temp_prefix("old"))
        os.rmdir(old)
        os.replace(out, old)
    os.replace(staging, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)
