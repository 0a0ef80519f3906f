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
from ..base.outdir import temp_prefix

from . import calibration
from .formats import FORMATS, check_request
from ..bundle.manifest import library_versions, sha256_file, write_manifest
from .validate import compare, gate, run_batched

log = logging.getLogger(__name__)


@dataclass
class ExportOptions:
    """Everything ``edgekd export`` accepts; ``None`` means "the format's or checkpoint's default"."""

    fmt: str
    precision: str = "fp32"
    out: str = None             # the bundle folder
    data: str = None            # validation data spec (default: the checkpoint's)
    data_root: str = None
    val_size: int = 1000        # test images for the parity gate
    atol: float = None          # fp32/fp16 logit tolerance (default: the format table's)
    opset: int = None
    quant: str = None           # int8: static (default) or dynamic (ONNX only)
    calib_data: str = None      # int8: data spec whose train split calibrates (default: the checkpoint's data)
    calib_size: int = 300       # int8: calibration images
    calib_method: str = None    # int8: minmax|entropy|percentile for ONNX, nncf for OpenVINO
    seed: int = 0               # calibration and tuning sample seed
    max_drop: float = 1.0       # int8: largest allowed top-1 loss vs FP32, in points
    max_fallback_layers: int = 10  # int8: most layers the fallback may keep in float (0: no fallback)
    tune_size: int = None       # int8: train images that steer the fallback (default: as many as val_size)
    int8_types: str = None      # ONNX int8: auto|u8s8|u8u8|s8s8 (auto: by CPU features)
    reduce_range: bool = False  # ONNX int8: 7-bit weights
    per_channel: bool = True    # ONNX int8: per-channel weight scales
    zip: bool = False           # also write OUT.zip
    speed_check: bool = True    # int8: time FP32 vs INT8 here and warn when INT8 is not faster
    progress: bool = True
    layer_report: bool = True   # int8: per-layer SQNR vs FP32 in the manifest and int8_layers.png (int8 hunk)
    qat_epochs: int = 1         # int8: last rung, quantization-aware distillation epochs (0: off)
    qat_teacher: str = None     # int8: its teacher (default: the student's own, else the FP32 student itself)
    qat_onnx: str = "ort"       # ONNX from a QAT model: ort (trained weights, ONNX Runtime's QDQ placement) or nncf
    target: str = None          # the device the bundle is for: cpu (this machine), arm64, x86-avx2, x86-vnni, ssh://...
    ssh_config: str = None      # --target ssh://: an ssh_config file
    timeout: int = 600          # --target ssh://: seconds to wait for the device at each step


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


def export_checkpoint(checkpoint, opts):
    """Export ``checkpoint`` as ``opts`` says into the folder ``out``; return the manifest."""
    return _Export(checkpoint, opts).run()


class _Export:
    def __init__(self, checkpoint, opts):
        self.checkpoint, self.o = checkpoint, opts
        self.meta = check_request(opts.fmt, opts.precision, opts.quant, opts.calib_method, opts.int8_types)
        self.int8 = opts.precision == "int8"
        self.static = self.int8 and self.meta["quant"] == "static"
        self.atol = opts.atol if opts.atol is not None else self.meta["atol"].get(opts.precision)
        if self.int8 and not opts.max_drop >= 0:  # NaN fails too
            raise EdgeKDError(f"--max-drop must be 0 or more points, got {opts.max_drop}")
        from .target import resolve

        self.target = resolve(opts.target, opts.ssh_config, opts.timeout)  # an ssh:// device is probed here, first
        self.static_batch = self.target.static_batch(opts.fmt)

    def run(self):
        import torch

        from ..core.checkpoint import load_model
        from ..core.data import InputSpec, load_data

        o = self.o
        self.model, self.ckpt = load_model(self.checkpoint)
        self.qat = "qat" in self.ckpt  # int8: a QAT checkpoint (edgekd quantize) exports as it was trained
        self.rung_qat = False  # int8: the ladder's last rung (quantization-aware distillation) made the bundle
        self.ladder = []
        if self.qat and o.precision != "int8":
            raise EdgeKDError(f"{self.checkpoint!r} is a QAT checkpoint (edgekd quantize): export it with --precision int8")
        self.spec = InputSpec.from_dict(self.ckpt["input"])
        self.dataset = load_data(o.data or self.ckpt.get("data") or "digits", o.data_root, input_spec=self.spec)
        if len(self.dataset.classes) != len(self.ckpt["classes"]):
            raise EdgeKDError(f"checkpoint has {len(self.ckpt['classes'])} classes but data {self.dataset.spec!r} "
                              f"has {len(self.dataset.classes)}")
        # a QAT checkpoint needs calibration only where the format re-quantizes its trained weights (ONNX, --qat-onnx ort)
        needs_calib = self.static and (not self.qat or FORMATS.meta(o.fmt)["qat_calibrates"](asdict(o)))
        calib, self.calib_record = self._calibration() if needs_calib else (None, None)
        idx = calibration.strided_indices(len(self.dataset.test), o.val_size)
        self.images, self.labels = calibration.load_images(self.dataset.test, idx, "validation images", o.progress)
        with torch.no_grad():
            self.reference = run_batched(lambda b: self.model(torch.from_numpy(b)).numpy(), self.images)
        return self._build(calib)

    def _calibration(self, spec=None):
        o = self.o
        spec = spec or o.calib_data or o.data or self.ckpt.get("data") or "digits"
        data = self.dataset if spec == self.dataset.spec else load_data_for(spec, o.data_root, self.spec)
        self.calib_data = data
        indices, record = calibration.select(data.train, o.calib_size, o.seed, data_spec=data.spec, split="train",
                                             class_names=data.classes)
        images, _ = calibration.load_images(data.train, indices, "calibration images", o.progress)
        log.info("calibration: %d images from the train split of %s (seed %d, sha256 %s)",
                 len(images), data.spec, o.seed, record["files_sha256"][:12])
        return images, record

    def _build(self, calib):
        o = self.o
        out = o.out
        parent = os.path.dirname(os.path.abspath(out))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(dir=parent, prefix="." + temp_prefix("bundle"))
        scratch = tempfile.mkdtemp(prefix=temp_prefix("export"))
        job = ExportJob(self.model, self.spec, staging, scratch, o.precision,
                        {**asdict(o), "quant": self.meta["quant"], "calib_method": self.meta["calib_method"],
                         "int8_types": o.int8_types or "auto", "classes": list(self.ckpt["classes"]),
                         "target_features": (self.target.arch, self.target.flags), "target": self.target.name},
                        calib, o.progress)
        job.state["ckpt"] = self.ckpt
        try:
            seconds = self._convert(job)
            info = job.info
            validation = self._validate(staging, info["model_file"])
            fallback = None
            if self.int8:
                validation, fallback, seconds = self._int8_gate(job, info, validation, seconds)
            else:
                self._fail_if(gate(validation, o.precision, atol=self.atol))
            speed = None
            if self.int8 and o.speed_check and not self.target.here:
                speed = {"status": f"skipped: the bundle is for {self.target.name}, not this machine"}
            elif self.int8 and o.speed_check:
                speed = speed_check(o.fmt, os.path.join(staging, info["model_file"]), info["fp32_reference"],
                                    (self.spec.channels, self.spec.height, self.spec.width))
            layers = self._layer_report(job, info, fallback) if self.int8 and o.layer_report else None
            parity = self._parity(staging) if o.target else None
            manifest = self._manifest(staging, info, validation, fallback, speed, seconds)
            if parity:
                manifest["parity"] = parity
            if self.int8:  # int8: per-layer report and the QAT record
                manifest["int8_layers"] = layers
                manifest["ladder"] = self.ladder
                if self.rung_qat:
                    manifest["fallback"]["used"] = False  # rung 2 failed; the QAT model keeps every layer INT8
                    if not FORMATS.meta(o.fmt)["qat_calibrates"](job.options):
                        manifest["calibration"]["note"] = ("post-training calibration of rungs 1-2; the bundle's "
                                                           "quantizer ranges were trained by the last rung")
                if self.qat:
                    from .qat import fp32_student_record

                    manifest["qat"] = fp32_student_record(self.ckpt, self.images, self.labels, validation["top1"])
                    manifest["validation"]["reference"] = "the QAT model in PyTorch (fake-quantized), like with like"
            write_manifest(staging, manifest)
            os.chmod(staging, 0o755)  # mkdtemp makes it private; a bundle is meant to be shared
            if o.zip:
                write_zip(staging, out)
            _publish(staging, out)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            if os.path.isdir(staging):
                shutil.rmtree(staging)
        size = sum(os.path.getsize(os.path.join(out, f)) for f in manifest["files"])
        log.info("exported %s %s in %.1f s, %.3f MB (%s)", o.fmt, o.precision, seconds, size / 1e6, out)
        return manifest

    def _convert(self, job):
        """Run the format's steps for this precision, in order; return the seconds they took."""
        start = time.perf_counter()
        # a QAT checkpoint (edgekd quantize) is converted as it was trained: no calibration, no fallback
        steps = FORMATS.meta(self.o.fmt)["qat_steps"] if self.qat else FORMATS.get(self.o.fmt)[job.precision]
        for step in steps:
            t0 = time.perf_counter()
            job.info.update(step(job) or {})
            log.debug("export step %s: %.1f s", step.__name__, time.perf_counter() - t0)
        return time.perf_counter() - start

    def _validate(self, folder, model_file):
        """The parity gate's comparison: on this machine, or with --target ssh:// on the device itself."""
        from ..base.progress import bar
        from ..bundle.runner import in_batches_of, open_model
        from .target import remote_logits, where

        if self.static_batch:
            set_static_batch(os.path.join(folder, model_file), self.static_batch, self.o.precision)
        if self.target.device is not None:
            log.info("parity gate on %s (%d images)", self.target.name, len(self.images))
            outputs = remote_logits(self.target, folder, model_file, self.o.fmt, self.images, self.static_batch)
        else:
            session, _ = open_model(os.path.join(folder, model_file), self.o.fmt)
            if self.static_batch:
                session = in_batches_of(session, self.static_batch)
            with bar(total=len(self.images), desc="validating", unit="img", disable=not self.o.progress) as progress:
                def run(batch):
                    progress.update(len(batch))
                    return session(batch)

                outputs = run_batched(run, self.images)
        self.outputs = outputs
        validation = compare(self.reference, outputs, self.labels)
        validation.update(data=self.dataset.spec, split="test", atol=self.atol, ran_on=where(self.target))
        return validation

    def _parity(self, staging, count=8):
        """--target: a few test images and the bundle's logits on them where the gate ran, which ``edgekd deploy``
        checks on the device before installing (``device_runner.py check``)."""
        np.save(os.path.join(staging, PARITY_FILE), np.ascontiguousarray(self.images[:count], dtype=np.float32))
        loose = self.o.precision != "fp32"  # fp16/int8 kernels differ between CPUs: a near-tie may flip
        return {"file": PARITY_FILE, "images": min(count, len(self.images)),
                "logits": np.asarray(self.outputs[:count], dtype=np.float64).round(6).tolist(),
                "atol": self.atol if self.o.precision in ("fp32", "fp16") else None,
                "min_agreement": 0.875 if loose else 1.0,
                "from": self.target.name if self.target.device is not None else "this machine"}

    def _int8_gate(self, job, info, validation, seconds):
        """The INT8 ladder against --max-drop: (1) post-training INT8; (2) when it loses too much, keep the most
        sensitive layers in float and retry; (3) when that fails too, quantization-aware distillation
        (``edgekd quantize``) for --qat-epochs epochs, every layer INT8. Each rung tried is in ``self.ladder``."""
        o = self.o
        validation["max_drop"] = o.max_drop
        failures = gate(validation, "int8", max_drop=o.max_drop)
        self.ladder = [{"rung": "qat" if self.qat else "ptq", "drop": validation["drop"], "passed": not failures}]
        fallback = {"needed": bool(failures), "drop_before": validation["drop"], "layers_in_float": []}
        if not failures:
            return validation, fallback, seconds
        if self.qat:
            self._fail_if(failures, suffix=" (a QAT model keeps every layer INT8: train longer or lower --lr)")
        if self.static and o.max_fallback_layers > 0:
            log.warning("INT8 top-1 drop %.2f points exceeds --max-drop %.2f; keeping sensitive layers in float",
                        validation["drop"], o.max_drop)
            start = time.perf_counter()
            tune = self._tuning_set()
            fallback.update(FORMATS.meta(o.fmt)["restore"](job, tune, o.max_drop, o.max_fallback_layers))
            seconds += time.perf_counter() - start
            validation = self._validate(job.folder, info["model_file"])
            validation["max_drop"] = o.max_drop
            fallback.update(drop_after=validation["drop"], max_layers=o.max_fallback_layers, tuning=self.tune_record)
            failures = gate(validation, "int8", max_drop=o.max_drop)
            self.ladder.append({"rung": "fallback", "drop": validation["drop"], "passed": not failures,
                                "layers_in_float": fallback["layers_in_float"]})
            if not failures:
                return validation, fallback, seconds
            why = (f" even with {len(fallback['layers_in_float'])} layer(s) kept in float (--max-fallback-layers "
                   f"{o.max_fallback_layers}; before the fallback: {fallback['drop_before']:.2f} points)")
        else:
            why = (" (dynamic INT8 has no fallback; static INT8 has)" if not self.static
                   else " (the fallback is off: --max-fallback-layers 0)")
        if not self.static:  # the last rung makes static INT8; a user who asked for dynamic gets what they asked
            self._fail_if(failures, suffix=why)
        if o.qat_epochs == 0:
            self._fail_if(failures, suffix=why + " and quantization-aware distillation is off (--qat-epochs 0)")
        start = time.perf_counter()
        validation = self._qat_rung(job, info, failures, why)
        seconds += time.perf_counter() - start
        return validation, fallback, seconds

    def _qat_rung(self, job, info, failures, why):
        """The last rung: ``edgekd quantize`` (fake quantizers calibrated on the student's train images, then
        distillation for --qat-epochs epochs) in the scratch folder, converted by the format's QAT steps. The
        bundle is gated against the FP32 student, like rungs 1 and 2."""
        from ..core.checkpoint import load_model
        from ..core.config import resolve
        from ..core.quantize import QAT_FILE, run_quantize

        o = self.o
        teacher = o.qat_teacher or self._rung_teacher()
        log.warning("INT8 failed --max-drop%s: %s; last rung: quantization-aware distillation for %d epoch(s) "
                    "against %s (edgekd quantize), every layer INT8", why, "; ".join(failures), o.qat_epochs, teacher)
        folder = os.path.join(job.scratch, "qat")
        given = {"student": os.path.abspath(self.checkpoint), "teacher": teacher, "epochs": o.qat_epochs,
                 "data": self.dataset.spec, "data_root": o.data_root, "seed": o.seed, "out": folder,
                 "progress": o.progress}
        run_quantize(resolve("quantize", {k: v for k, v in given.items() if v is not None}))
        qmodel, qckpt = load_model(os.path.join(folder, QAT_FILE))
        for name in os.listdir(job.folder):  # the post-training files make way for the QAT model's
            os.unlink(os.path.join(job.folder, name))
        # a conversion of its own: nothing of rungs 1-2 (their FP32 graph, calibration cache) is reused
        job.scratch = tempfile.mkdtemp(dir=job.scratch, prefix="qat-convert-")
        job.model, job.state["ckpt"] = qmodel, qckpt
        job.info.clear()  # the same dict as the caller's ``info``
        if FORMATS.meta(o.fmt)["qat_calibrates"](job.options):
            # calibrated on the student's own train images, like the QAT's quantizers: --calib-data is what failed
            job.calib, self.calib_record = self._calibration(spec=self.dataset.spec)
        for step in FORMATS.meta(o.fmt)["qat_steps"]:
            job.info.update(step(job) or {})
        self.rung_qat = True
        validation = self._validate(job.folder, info["model_file"])  # against the FP32 student's logits
        validation["max_drop"] = o.max_drop
        failures = gate(validation, "int8", max_drop=o.max_drop)
        self.ladder.append({"rung": "qat", "drop": validation["drop"], "passed": not failures, "epochs": o.qat_epochs,
                            "teacher": teacher, "layers_int8": len(info["int8_layers"]),
                            "qat_test_top1": qckpt.get("metrics", {}).get("test_top1")})
        self._fail_if(failures, suffix=f" after {o.qat_epochs} epoch(s) of quantization-aware distillation, the last "
                                       f"rung (more: edgekd quantize --epochs N, then export its student-qat.pt)")
        log.warning("quantization-aware distillation met --max-drop: drop %.2f points with all %d quantizable layers "
                    "INT8 (to reuse it for another format: edgekd quantize %s --epochs %d)", validation["drop"],
                    len(info["int8_layers"]), self.checkpoint, o.qat_epochs)
        return validation

    def _rung_teacher(self):
        """The teacher the student was distilled from (its config, or teacher.pt beside it); for a student
        trained without one, the FP32 student itself teaches its INT8 copy (self-distillation)."""
        spec = (self.ckpt.get("config") or {}).get("teacher")
        beside = os.path.join(os.path.dirname(os.path.abspath(self.checkpoint)), "teacher.pt")
        for candidate in (spec, beside):
            if candidate and os.path.isfile(candidate):
                return candidate
        return os.path.abspath(self.checkpoint)

    def _layer_report(self, job, info, fallback):
        """int8: SQNR per layer against FP32 on train images (64, another seed than calibration)."""
        from .layer_report import layer_report

        data = getattr(self, "calib_data", None) or self.dataset
        size = min(64, len(data.train))
        indices, _ = calibration.select(data.train, size, self.o.seed + 2, data_spec=data.spec, split="train",
                                        class_names=data.classes, purpose="layer report")
        images, _ = calibration.load_images(data.train, indices, "layer report images", self.o.progress)
        # what ONNX Runtime quantized (same node names), else the format's FP32 counterpart
        fp32 = info.get("quantized_from") or info.get("fp32_reference")
        if self.rung_qat:
            fallback = None  # the QAT model keeps every layer INT8
        if fp32 is None:
            return None
        return layer_report(self.o.fmt, fp32, os.path.join(job.folder, info["model_file"]), images, job.scratch,
                            folder=job.folder, in_float=(fallback or {}).get("layers_in_float", ()))

    def _tuning_set(self):
        """Labelled train-split images (another seed than calibration) that steer the fallback, so the
        test split stays held out for the final gate."""
        data = self.calib_data
        size = min(self.o.tune_size or self.o.val_size, len(data.train))
        indices, record = calibration.select(data.train, size, self.o.seed + 1, data_spec=data.spec, split="train",
                                             class_names=data.classes, purpose="fallback tuning")
        record.pop("files")
        self.tune_record = record
        return calibration.load_images(data.train, indices, "tuning images", self.o.progress)

    def _fail_if(self, failures, suffix=""):
        if failures:
            raise EdgeKDError("parity check failed: " + "; ".join(failures) + suffix + "; no bundle written")

    def _manifest(self, staging, info, validation, fallback, speed, seconds):
        o, spec, ckpt = self.o, self.spec, self.ckpt
        files = {name: sha256_file(os.path.join(staging, name)) for name in sorted(os.listdir(staging))}
        missing = [name for name in FORMATS.meta(o.fmt)["files"] if name not in files]
        if missing:  # the format table names the files its steps publish; a step that did not is our bug
            raise RuntimeError(f"the {o.fmt} export steps wrote no {', '.join(missing)}")
        manifest = {
            "format": o.fmt, "precision": o.precision, "model_file": info["model_file"], "files": files,
            "input": {"shape": [self.static_batch or -1, spec.channels, spec.height, spec.width], "layout": "NCHW",
                      "dtype": "float32",
                      "mean": spec.mean, "std": spec.std, "color": spec.color, "resize": [spec.height, spec.width],
                      "scale": 1 / 255, "resample": "bilinear"},
            "classes": list(ckpt["classes"]),
            "model": ckpt["model"], "params": ckpt.get("params"), "flops": ckpt.get("flops"), "data": self.dataset.spec,
            "source": {"checkpoint": os.path.abspath(self.checkpoint), "sha256": sha256_file(self.checkpoint)},
            "validation": validation, "export_seconds": round(seconds, 3),
            "size_bytes": sum(os.path.getsize(os.path.join(staging, n)) for n in files),
            "runtime": {"library": FORMATS.meta(o.fmt)["runtime"],
                        "inference_precision": FORMATS.meta(o.fmt)["inference_precision"]},
            "versions": library_versions(),
        }
        if o.target:
            quant = info.get("quantization") or {}
            types = ("".join(("u" if quant[k] == "uint8" else "s") + "8" for k in ("activation_type", "weight_type"))
                     if "activation_type" in quant else None)
            manifest["target"] = self.target.record(o.fmt, types)
            manifest["batch_sizes"] = [self.static_batch] if self.static_batch else "any"
        if self.int8:
            manifest["calibration"] = self.calib_record or {"images": 0, "note": "QAT: the quantizer ranges were trained "
                                                           "(edgekd quantize)" if self.qat else "dynamic INT8 uses no calibration"}
            manifest["quantization"] = info.get("quantization", {})
            manifest["quantization"]["layers"] = info.get("quantizable_layers")
            manifest["fallback"] = fallback
            manifest["speed_check"] = speed
            if speed and speed.get("int8_faster") is False:
                manifest.setdefault("warnings", []).append(
                    "INT8 was not faster than FP32 on the exporting machine: " + ", ".join(
                        f"batch {r['batch_size']} {r['speedup']:.2f}x" for r in speed["rows"]))
        return manifest


PARITY_FILE = "parity.npy"


def set_static_batch(path, batch, precision):
    """Give an OpenVINO IR a static batch in place (a no-op when it has it already)."""
    from .openvino import import_openvino

    ov = import_openvino()
    core = ov.Core()
    model = core.read_model(path)
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
