"""``edgekd quantize``: quantization-aware distillation (QAT + KD), the third rung of the INT8 ladder.

Post-training quantization (rung 1) and keeping the worst layers in float (rung 2, which costs speed)
are in export/. This stage keeps every layer INT8 and gives the accuracy back by training: NNCF inserts
fake quantizers into the student where OpenVINO and ONNX Runtime will quantize it (weights per channel,
activations per tensor, symmetric; scales calibrated on train images), then the student is fine-tuned for
a few epochs at a small learning rate against the teacher with any edgekd distillation loss (the teacher
cache included), through the same training loop as ``edgekd distill``.

It writes ``DIR/student-qat.pt``: an ordinary edgekd checkpoint (weights_only-loadable) whose ``qat``
entry holds NNCF's quantizer configuration as plain JSON types; ``load_model`` rebuilds the fake-quantized
model from it, and ``edgekd export --precision int8`` converts it without new calibration.
"""

import json
import logging
import os
from dataclasses import replace
from typing import Any, Dict, Optional, Tuple

from torch import nn

from .. import EdgeKDError
from ..base.files import refuse_inside
from . import teachers
from .checkpoint import Checkpoint, QatState, read_checkpoint, save_checkpoint
from .config import saved
from .data import Data, InputSpec, data_folders, parse_size
from .distill import prepare_data, save_config, train_teacher, write_json
from .distributed import Context
from .fakequant import calibrate, fast_quantizers, import_nncf, plain_config, quantized_layer_names, quantizer_modules
from .loading import load_model
from .losses import LOSSES, LossInfo, make_loss
from .options import QuantizeOptions
from .teacher_cache import TeacherCache
from .teacher_speed import settle_teacher_dtype
from .train_loop import TrainRun, evaluate, fit, seed_everything

log = logging.getLogger(__name__)

QAT_FILE = "student-qat.pt"
QUANTIZER_FILE = "quantizers.json"  # written right after calibration, so --resume rebuilds the same quantizers
BEFORE_FILE = "qat.before.json"  # the fake-quantized top-1 right after calibration, for a resumed run's metrics


def _student(path: str) -> Tuple[nn.Module, Checkpoint]:
    if read_checkpoint(path).qat is not None:
        raise EdgeKDError(f"{path!r} is already a QAT checkpoint; give the FP32 student it came from")
    return load_model(path)


def _teacher_spec(cfg: QuantizeOptions, ckpt: Checkpoint, student: str) -> str:
    """--teacher, else the teacher the student was distilled from (its config, or teacher.pt beside it)."""
    if cfg.teacher:  # any teacher spec distill takes; edgekd.teachers checks it
        return cfg.teacher
    spec = ckpt.config.get("teacher")  # the config.yaml values the student was made with
    beside = os.path.join(os.path.dirname(os.path.abspath(student)), "teacher.pt")
    if not (spec and os.path.isfile(spec)) and os.path.isfile(beside):
        spec = beside
    if not spec or not os.path.isfile(spec):
        raise EdgeKDError(f"quantization-aware distillation needs a teacher: --teacher SPEC (a checkpoint, bundle, ...) "
                          f"(found none for {student!r} in its config or beside it)")
    return str(spec)


def _input_for(cfg: QuantizeOptions, student: InputSpec) -> InputSpec:
    """The student checkpoint's input, at --input-size / --crop-pct when given (fine-tuning at another size)."""
    spec = replace(student)
    size = parse_size(cfg.input_size)
    if size is not None and size != (spec.height, spec.width):
        log.info("quantize: the student was trained at %dx%d; fine-tuning at --input-size %dx%d", spec.height,
                 spec.width, *size)
        spec.height, spec.width = size
        if spec.crop_pct is None:  # a checkpoint from before crop_pct: the new size is cropped as evaluation is now
            spec.crop_pct = 1.0
    if cfg.crop_pct is not None:
        spec.crop_pct = cfg.crop_pct
    return spec


def _check_loss(cfg: QuantizeOptions) -> None:
    infos = [LossInfo.of(n) for n in LOSSES.names()]
    logit_losses = [i.name for i in infos if i.needs_teacher and not i.needs_features]
    if cfg.loss not in logit_losses:
        raise EdgeKDError(f"--loss {cfg.loss!r}: quantization-aware distillation takes a logit loss with a teacher: "
                          + ", ".join(logit_losses))


def run_quantize(cfg: QuantizeOptions) -> Dict[str, Any]:
    """``edgekd quantize``: calibrate fake quantizers into the student, distill for cfg.epochs epochs,
    write DIR/student-qat.pt, DIR/metrics.json, DIR/config.yaml. Resumable like ``distill``."""
    out, student_path = cfg.out, cfg.student
    if out is None or student_path is None:  # the options refuse a missing STUDENT or --out before this
        raise EdgeKDError("edgekd quantize needs STUDENT and --out")
    os.makedirs(out, exist_ok=True)
    _check_loss(cfg)
    student, ckpt = _student(student_path)
    seed_everything(cfg.seed)
    # the checkpoint records an image folder relative to its own folder
    data_cfg = replace(cfg, data=cfg.data or ckpt.data_spec(student_path) or "digits")
    data, train, test = prepare_data(data_cfg, input_spec=_input_for(cfg, ckpt.input), teacher=True)
    if len(data.classes) != len(ckpt.classes):
        raise EdgeKDError(f"student has {len(ckpt.classes)} classes but data {data.spec!r} has {len(data.classes)}")
    teacher_spec = _teacher_spec(cfg, ckpt, student_path)
    loss_fn, loss_params = make_loss(cfg.loss, label_smoothing=cfg.label_smoothing,
                                     temperature=cfg.temperature, alpha=cfg.alpha, beta=cfg.beta)
    save_config(out, {**saved(cfg), "data": data.spec, "teacher": teacher_spec, "loss_params": loss_params})
    fp32_top1 = evaluate(student, test)
    qmodel = _quantized_student(cfg, student, train, out)
    int8_before = _top1_before(cfg, out, qmodel, test, fp32_top1)
    teacher, teacher_dtype, cache = _teacher(cfg, teacher_spec, data, train, test, loss_params)
    seed_everything(cfg.seed)
    run = TrainRun(train, test, loss_fn, teacher=teacher, cache=cache)
    with fast_quantizers(qmodel) as fast:  # NNCF's arithmetic in fewer passes while training (fakequant.py)
        log.info("quantize: %d of %d quantizers train through edgekd's fake quantizer", fast,
                 len(quantizer_modules(qmodel)))
        history = fit(qmodel, run, cfg, desc="qat", state_path=os.path.join(out, "qat.state.pt"))
    qmodel.cpu().eval()
    layers = quantized_layer_names(qmodel)
    last = history[-1].test_top1 if history else None
    metrics = {"model": ckpt.model, "epochs": cfg.epochs, "test_top1": last,
               "history": [h.to_json() for h in history], "data": data.spec, "loss": cfg.loss, "loss_params": loss_params,
               "qat": {"fp32_top1": fp32_top1, "int8_top1_before": int8_before,
                       "drop_before": round((fp32_top1 - int8_before) * 100, 4),
                       "drop_after": None if last is None else round((fp32_top1 - last) * 100, 4),
                       "layers_int8": layers, "tool": "nncf.quantize (torch) + distillation fine-tuning"},
               "teacher": {**{k: teacher.metrics.get(k) for k in ("model", "source", "test_top1")},
                           "dtype": teacher_dtype}}
    # the FP32 student, relative to this run's folder (export finds it from the QAT checkpoint's folder)
    qat = QatState(quantizers=plain_config(qmodel), source=os.path.relpath(os.path.abspath(student_path),
                                                                           os.path.abspath(out)),
                   source_top1=fp32_top1, layers_int8=layers, calib_size=cfg.calib_size)
    save_checkpoint(os.path.join(out, QAT_FILE), qmodel, spec=ckpt.model, classes=ckpt.classes, input_spec=ckpt.input,
                    data_spec=data.spec, metrics=metrics, config={**saved(cfg), "data": data.spec,
                                                                  "teacher": teacher_spec},
                    qat=qat, params=ckpt.params, flops=ckpt.flops)
    write_json(os.path.join(out, "metrics.json"), metrics)
    return metrics


def _top1_before(cfg: QuantizeOptions, out: str, qmodel: nn.Module, test: Any, fp32_top1: float) -> float:
    """The fake-quantized top-1 right after calibration (a resumed run reads its record: the rebuilt quantizers
    get their calibrated scales only with the training state)."""
    before_path = os.path.join(out, BEFORE_FILE)
    if cfg.resume and os.path.isfile(before_path):
        with open(before_path) as f:
            int8_before = float(json.load(f)["int8_top1_before"])
    else:
        int8_before = evaluate(qmodel, test)
        with open(before_path, "w") as f:
            json.dump({"int8_top1_before": int8_before, "fp32_top1": fp32_top1}, f)
    log.info("fake-quantized student before training: top-1 %.4f (FP32 %.4f)", int8_before, fp32_top1)
    return int8_before


def _teacher(cfg: QuantizeOptions, teacher_spec: str, data: Data, train: Any, test: Any,
             loss_params: Dict[str, Any]) -> Tuple[teachers.Teacher, str, Optional[TeacherCache]]:
    """Any teacher source distill takes (a checkpoint, a bundle, ONNX, ...), with its own view and class order
    (quantize takes no --teacher-* options: the teacher describes itself); its dtype and cache."""
    t_cfg, t_options, ctx = replace(cfg, teacher=teacher_spec), teachers.TeacherOptions(), Context()
    trained = None
    if teachers.resolve(teacher_spec, t_options).kind == "model":  # a model spec: trained here first, like distill
        trained = train_teacher(t_cfg, teacher_spec, data, train, test, ctx, epochs=cfg.epochs)
    teacher = teachers.load_teacher(t_cfg, t_options, data, train, test, ctx, trained=trained)
    if hasattr(train, "set_teacher_size"):  # views from the files: the teacher sees each crop at its own size
        train.set_teacher_size(teacher.loaded.size)
    teacher_dtype = settle_teacher_dtype(teacher, cfg.teacher_dtype, cfg.device, train, cfg.channels_last)
    cache = None
    if cfg.teacher_cache:
        refuse_inside(cfg.teacher_cache, "--teacher-cache", data_folders(cfg))  # it would become a class of the data
        cache = TeacherCache(cfg.teacher_cache, teacher, train, dtype=cfg.teacher_cache_dtype or "float16",
                             topk=cfg.teacher_cache_topk, temperature=loss_params.get("temperature"))
        cache.build(teacher, cfg.epochs, device=cfg.device, progress=cfg.progress)
    return teacher, teacher_dtype, cache


def _quantized_student(cfg: QuantizeOptions, student: nn.Module, train: Any, out: str) -> nn.Module:
    """Calibrate once; a resumed run rebuilds the same quantizers from DIR/quantizers.json (the training
    state then restores their trained scales with the weights)."""
    nncf = import_nncf()
    path = os.path.join(out, QUANTIZER_FILE)
    if cfg.resume and os.path.isfile(path) and os.path.isfile(os.path.join(out, "qat.state.pt")):
        with open(path) as f:
            return nncf.torch.load_from_config(student, json.load(f))
    qmodel = calibrate(student, train, cfg.calib_size, cfg.seed, cfg.progress)
    with open(path, "w") as f:
        json.dump(plain_config(qmodel), f)
    return qmodel
