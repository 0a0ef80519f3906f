"""The INT8 ladder against --max-drop: (1) post-training INT8; (2) when it loses too much, keep the most sensitive
layers in float and retry; (3) when that fails too, quantization-aware distillation (``edgekd quantize``) for
--qat-epochs epochs, every layer INT8. Export converts and checks: the training of rung 3 is done by a trainer the
caller hands in (``edgekd.cli.int8.train_qat``), since export sits below training's orchestration."""

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from .. import EdgeKDError
from ..base.jsonrec import read_json
from ..core.loading import load_model
from .options import ExportOptions
from . import calibration
from .formats import Format
from .job import Calibration, ExportJob, Reference
from .records import CalibrationRecord, Conversion, Fallback, Rung, Sample, Tuning, Validation
from .validate import gate

log = logging.getLogger(__name__)


@dataclass
class QatRequest:
    """What the last rung asks its trainer for: quantization-aware distillation of ``student`` for ``epochs``
    epochs against ``teacher``, written into ``folder``; the trainer returns the QAT checkpoint's path."""

    student: str
    teacher: str
    epochs: int
    data: str
    data_root: Optional[str]
    seed: int
    folder: str
    progress: bool


Validate = Callable[[str, str], Validation]                 # (bundle folder, model file) -> its parity
Calibrate = Callable[[str], Calibration]                  # data spec -> a calibration set
TrainQat = Callable[[QatRequest], str]                      # -> the QAT checkpoint's path


def fail_if(failures: List[str], suffix: str = "") -> None:
    if failures:
        raise EdgeKDError("parity check failed: " + "; ".join(failures) + suffix + "; no bundle written")


@dataclass(frozen=True)
class Recipe:
    """What the ladder reads of a checkpoint's config (the options it was made with): the teacher it learnt from."""

    teacher: Optional[str] = None


class Int8Ladder:
    """Climbs the ladder for one export; ``rungs`` records each rung tried, ``qat_used`` whether the last rung made
    the bundle. ``validate(folder, model_file)`` checks a bundle's files against the reference; ``calibrate(spec)``
    gives a calibration set; ``train_qat(QatRequest)`` trains the last rung (None: the ladder stops at rung 2)."""

    def __init__(self, ref: Reference, opts: ExportOptions, fmt: Format, static: bool, validate: Validate,
                 calibrate: Calibrate, calib: Optional[Calibration] = None, train_qat: Optional[TrainQat] = None) -> None:
        self.ref, self.o, self.format, self.static = ref, opts, fmt, static
        self.validate, self.calibrate, self.train_qat = validate, calibrate, train_qat
        self.calib = calib           # the Calibration of rungs 1-2 (None: a QAT checkpoint or dynamic INT8)
        self.rungs: List[Rung] = []
        self.qat_used = False
        self.tune_record: Optional[Sample] = None
        self.seconds = 0.0           # time spent on rungs 2 and 3

    def _gate(self, validation: Validation) -> List[str]:
        validation.max_drop = self.o.max_drop
        return gate(validation, "int8", max_drop=self.o.max_drop)

    def climb(self, job: ExportJob, validation: Validation) -> Tuple[Validation, Fallback]:
        """(validation, fallback) of the first rung that passes; raises EdgeKDError when none does."""
        o = self.o
        failures = self._gate(validation)
        self.rungs = [Rung("qat" if self.ref.qat else "ptq", validation.drop, not failures)]
        fallback = Fallback(needed=bool(failures), drop_before=validation.drop)
        if not failures:
            return validation, fallback
        if self.ref.qat:
            fail_if(failures, suffix=" (a QAT model keeps every layer INT8: train longer or lower --lr)")
        if self.static and o.max_fallback_layers > 0:
            validation, failures, why = self._fallback(job, validation, fallback)
            if not failures:
                return validation, fallback
        else:
            why = (" (dynamic INT8 has no fallback; static INT8 has)" if not self.static
                   else " (the fallback is off: --max-fallback-layers 0)")
        if not self.static:  # the last rung makes static INT8; a user who asked for dynamic gets what they asked
            fail_if(failures, suffix=why)
        if o.qat_epochs == 0:
            fail_if(failures, suffix=why + " and quantization-aware distillation is off (--qat-epochs 0)")
        if self.train_qat is None:
            fail_if(failures, suffix=why + " and no trainer was given for quantization-aware distillation "
                                           "(edgekd export has one; from Python pass train_qat=edgekd.cli.int8.train_qat)")
        start = time.perf_counter()
        validation = self._qat(job, failures, why)
        self.seconds += time.perf_counter() - start
        return validation, fallback

    def _fallback(self, job: ExportJob, validation: Validation,
                  fallback: Fallback) -> Tuple[Validation, List[str], str]:
        """Rung 2: the format keeps the most sensitive layers in float, steered by train images; re-validated."""
        o = self.o
        log.warning("INT8 top-1 drop %.2f points exceeds --max-drop %.2f; keeping sensitive layers in float",
                    validation.drop, o.max_drop)
        start = time.perf_counter()
        tune = self._tuning_set()
        restored = self.format.restore(job, tune, o.max_drop, o.max_fallback_layers)
        fallback.restored, fallback.layers_in_float = restored, restored.layers_in_float
        self.seconds += time.perf_counter() - start
        validation = self.validate(job.folder, job.result.model_file)
        failures = self._gate(validation)
        fallback.drop_after, fallback.max_layers, fallback.tuning = validation.drop, o.max_fallback_layers, self.tune_record
        self.rungs.append(Rung("fallback", validation.drop, not failures, layers_in_float=fallback.layers_in_float))
        why = (f" even with {len(fallback.layers_in_float)} layer(s) kept in float (--max-fallback-layers "
               f"{o.max_fallback_layers}; before the fallback: {fallback.drop_before:.2f} points)")
        return validation, failures, why

    def _tuning_set(self) -> Tuning:
        """Labelled train-split images (another seed than calibration) that steer the fallback, so the
        test split stays held out for the final gate."""
        if self.calib is None:
            raise RuntimeError("the fallback runs on static INT8, which was calibrated")  # our bug
        data, o = self.calib.data, self.o
        size = min(o.tune_size or o.val_size, calibration.count(data.train))
        indices, sample = calibration.draw(data.train, size, o.seed + 1, data_spec=data.spec, split="train",
                                           class_names=data.classes, purpose="fallback tuning")
        sample.files = None
        self.tune_record = sample
        return calibration.load_images(data.train, indices, "tuning images", o.progress)

    def _qat(self, job: ExportJob, failures: List[str], why: str) -> Validation:
        """Rung 3: quantization-aware distillation (fake quantizers calibrated on the student's train images, then
        distillation for --qat-epochs epochs) in the scratch folder by the trainer, converted by the format's QAT
        steps. The bundle is gated against the FP32 student, like rungs 1 and 2."""
        o, ref = self.o, self.ref
        assert self.train_qat is not None  # climb() stops before this rung without a trainer
        teacher = o.qat_teacher or self._teacher()
        log.warning("INT8 failed --max-drop%s: %s; last rung: quantization-aware distillation for %d epoch(s) "
                    "against %s (edgekd quantize), every layer INT8", why, "; ".join(failures), o.qat_epochs, teacher)
        request = QatRequest(student=os.path.abspath(ref.checkpoint), teacher=teacher, epochs=o.qat_epochs,
                             data=ref.dataset.spec, data_root=o.data_root, seed=o.seed,
                             folder=os.path.join(job.scratch, "qat"), progress=bool(o.progress))
        qmodel, qckpt = load_model(self.train_qat(request))
        for name in os.listdir(job.folder):  # the post-training files make way for the QAT model's
            os.unlink(os.path.join(job.folder, name))
        # a conversion of its own: nothing of rungs 1-2 (their FP32 graph, calibration cache) is reused
        job.scratch = tempfile.mkdtemp(dir=job.scratch, prefix="qat-convert-")
        job.model, job.checkpoint, job.result = qmodel, qckpt, Conversion()
        if self.format.qat_calibrates(o):
            # calibrated on the student's own train images, like the QAT's quantizers: --calib-data is what failed
            self.calib = self.calibrate(ref.dataset.spec)
            job.calib = self.calib.images
        for step in self.format.qat_steps:
            step(job)
        self.qat_used = True
        validation = self.validate(job.folder, job.result.model_file)  # against the FP32 student's logits
        failures = self._gate(validation)
        layers_int8 = len(job.result.int8_layers or [])
        self.rungs.append(Rung("qat", validation.drop, not failures, epochs=o.qat_epochs, teacher=teacher,
                               layers_int8=layers_int8, qat_test_top1=qckpt.metrics.get("test_top1")))
        fail_if(failures, suffix=f" after {o.qat_epochs} epoch(s) of quantization-aware distillation, the last "
                                 f"rung (more: edgekd quantize --epochs N, then export its student-qat.pt)")
        log.warning("quantization-aware distillation met --max-drop: drop %.2f points with all %d quantizable layers "
                    "INT8 (to reuse it for another format: edgekd quantize %s --epochs %d)", validation.drop,
                    layers_int8, ref.checkpoint, o.qat_epochs)
        return validation

    def _teacher(self) -> str:
        """The teacher the student was distilled from (its config, or teacher.pt beside it); for a student
        trained without one, the FP32 student itself teaches its INT8 copy (self-distillation)."""
        recipe = read_json(Recipe, self.ref.ckpt.config) or Recipe()  # the config.yaml it was made with
        spec = recipe.teacher
        beside = os.path.join(os.path.dirname(os.path.abspath(self.ref.checkpoint)), "teacher.pt")
        for candidate in (spec, beside):
            if isinstance(candidate, str) and candidate and os.path.isfile(candidate):
                return candidate
        return os.path.abspath(self.ref.checkpoint)

    def finish(self, fallback: Fallback, calibration: CalibrationRecord) -> None:
        """What the last rung changed in the records the manifest is written from."""
        if self.qat_used:
            fallback.used = False  # rung 2 failed; the QAT model keeps every layer INT8
            if not self.format.qat_calibrates(self.o):
                calibration.note = ("post-training calibration of rungs 1-2; the bundle's quantizer ranges were "
                                    "trained by the last rung")
