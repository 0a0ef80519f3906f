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

import torch

from .. import EdgeKDError

log = logging.getLogger(__name__)

QAT_FILE = "student-qat.pt"
QUANTIZER_FILE = "quantizers.json"  # written right after calibration, so --resume rebuilds the same quantizers
BEFORE_FILE = "qat.before.json"  # the fake-quantized top-1 right after calibration, for a resumed run's metrics
NNCF_HOOKS = "__nncf_hooks."


def import_nncf():
    """nncf with telemetry off; its torch extension builds on first use (about a minute on 2 cores,
    cached in ~/.cache/torch_extensions), longer than NNCF's default 60 s wait on a busy machine."""
    os.environ.setdefault("OPENVINO_TELEMETRY_OPT_OUT", "1")
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")
    import nncf
    import nncf.torch  # noqa: F401  (get_config / load_from_config)

    return nncf


def plain_config(model):
    """NNCF's quantizer config as JSON types (it holds enums, which torch.load(weights_only=True) refuses)."""
    nncf = import_nncf()
    return json.loads(json.dumps(nncf.torch.get_config(model)))


def base_state(state_dict):
    """The float model's own entries of a fake-quantized model's state dict (NNCF keeps its quantizers apart)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(NNCF_HOOKS)}


def restore(ckpt, model):
    """The fake-quantized model of a QAT checkpoint, from a freshly built float ``model``; in eval mode."""
    nncf = import_nncf()
    try:
        qmodel = nncf.torch.load_from_config(model, ckpt["qat"]["quantizers"])
        qmodel.load_state_dict(ckpt["state_dict"])
    except Exception as e:
        raise EdgeKDError(f"QAT checkpoint does not match model {ckpt['model']!r}: {str(e).splitlines()[0]}") from None
    return qmodel.eval()


def float_model(ckpt):
    """The QAT checkpoint's fine-tuned weights without the quantizers: its FP32 counterpart, layer for layer."""
    from .data import InputSpec
    from .models import build_model

    model = build_model(ckpt["model"], len(ckpt["classes"]), InputSpec.from_dict(ckpt["input"]))
    model.load_state_dict(base_state(ckpt["state_dict"]))
    return model.eval()


def quantizer_modules(model):
    from nncf.torch.quantization.layers import BaseQuantizer

    return [m for m in model.modules() if isinstance(m, BaseQuantizer)]


def quantized_layer_names(model):
    """The student's modules that receive a weight quantizer: the layers that run in INT8."""
    config = plain_config(model)["compression_state"]
    names = []
    for command in config:
        for hook in command["hook_names_in_model"]:
            # "pre_hooks.features/0/conv2d/0__1.0": port 1 is the weight of features.0's conv2d
            if hook.startswith("pre_hooks.") and "__1." in hook:
                names.append(hook.split(".", 1)[1].rsplit("/", 2)[0].replace("/", "."))
    return sorted(set(names))


def calibrate(model, views, size, seed, progress=True):
    """Insert NNCF's fake quantizers and set their ranges on ``size`` un-augmented train images."""
    nncf = import_nncf()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(views), generator=g)[:size]
    images, _ = views.batch(idx)  # no epoch: the plain view, as calibration must see deployment inputs
    dataset = nncf.Dataset([images[i:i + 1] for i in range(len(images))])
    from ..base.progress import nncf_quiet

    try:
        with nncf_quiet(progress):  # NNCF's extension-build INFO lines and bars follow --no-progress too
            return nncf.quantize(model.eval(), dataset, subset_size=len(images))
    except Exception as e:
        raise EdgeKDError(f"nncf.quantize (fake quantizers for QAT) failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0]}") from None


def _student(cfg):
    from .checkpoint import load_checkpoint, load_model

    ckpt = load_checkpoint(cfg["student"])
    if "qat" in ckpt:
        raise EdgeKDError(f"{cfg['student']!r} is already a QAT checkpoint; give the FP32 student it came from")
    model, ckpt = load_model(cfg["student"])
    return model, ckpt


def _teacher_spec(cfg, ckpt):
    """--teacher, else the teacher the student was distilled from (its config, or teacher.pt beside it)."""
    if cfg.get("teacher"):  # any teacher spec distill takes; edgekd.teachers checks it
        return cfg["teacher"]
    spec = (ckpt.get("config") or {}).get("teacher")
    beside = os.path.join(os.path.dirname(os.path.abspath(cfg["student"])), "teacher.pt")
    if not (spec and os.path.isfile(spec)) and os.path.isfile(beside):
        spec = beside
    if not spec or not os.path.isfile(spec):
        raise EdgeKDError(f"quantization-aware distillation needs a teacher: --teacher SPEC (a checkpoint, bundle, ...) "
                          f"(found none for {cfg['student']!r} in its config or beside it)")
    return spec


def run_quantize(cfg):
    """``edgekd quantize``: calibrate fake quantizers into the student, distill for cfg['epochs'] epochs,
    write DIR/student-qat.pt, DIR/metrics.json, DIR/config.yaml. Resumable like ``distill``."""
    from .data import InputSpec
    from . import teachers
    from .distill import _save_config, _write_json, prepare_data
    from .distributed import Context
    from .checkpoint import save_checkpoint
    from .losses import LOSSES, make_loss
    from .train_loop import TrainRun, evaluate, fit, seed_everything

    out = cfg["out"]
    os.makedirs(out, exist_ok=True)
    if not LOSSES.meta(cfg["loss"])["needs_teacher"] or LOSSES.meta(cfg["loss"]).get("needs_features"):
        raise EdgeKDError(f"--loss {cfg['loss']!r}: quantization-aware distillation takes a logit loss with a teacher: "
                          + ", ".join(n for n in LOSSES.names() if LOSSES.meta(n)["needs_teacher"]
                                      and not LOSSES.meta(n).get("needs_features")))
    student, ckpt = _student(cfg)
    seed_everything(cfg["seed"])
    data_cfg = {**cfg, "data": cfg.get("data") or ckpt.get("data") or "digits"}
    data, train, test = prepare_data(data_cfg, input_spec=InputSpec.from_dict(ckpt["input"]))
    if len(data.classes) != len(ckpt["classes"]):
        raise EdgeKDError(f"student has {len(ckpt['classes'])} classes but data {data.spec!r} has {len(data.classes)}")
    teacher_spec = _teacher_spec(cfg, ckpt)
    loss_fn, loss_params = make_loss(cfg["loss"], label_smoothing=cfg.get("label_smoothing"),
                                     temperature=cfg.get("temperature"), alpha=cfg.get("alpha"), beta=cfg.get("beta"))
    _save_config(out, {**cfg, "data": data.spec, "teacher": teacher_spec, "loss_params": loss_params})
    before_path = os.path.join(out, BEFORE_FILE)
    resumed = cfg.get("resume") and os.path.isfile(before_path)
    fp32_top1 = evaluate(student, test)
    qmodel = _quantized_student(cfg, student, train, out)
    if resumed:  # the rebuilt quantizers get their calibrated scales only with the training state: use the record
        with open(before_path) as f:
            int8_before = json.load(f)["int8_top1_before"]
    else:
        int8_before = evaluate(qmodel, test)
        with open(before_path, "w") as f:
            json.dump({"int8_top1_before": int8_before, "fp32_top1": fp32_top1}, f)
    log.info("fake-quantized student before training: top-1 %.4f (FP32 %.4f)", int8_before, fp32_top1)
    # any teacher source distill takes (a checkpoint, a bundle, ONNX, ...), with its own view and class order
    teacher = teachers.load_teacher({**cfg, "teacher": teacher_spec}, teachers.TeacherOptions.from_cfg(cfg), data,
                                    train, test, Context())
    t_metrics = teacher.metrics
    cache = None
    if cfg.get("teacher_cache"):
        from .teacher_cache import TeacherCache

        cache = TeacherCache(cfg["teacher_cache"], teacher, train)
        cache.build(teacher, cfg["epochs"], device=cfg["device"], progress=cfg.get("progress", True))
    seed_everything(cfg["seed"])
    run = TrainRun(train, test, loss_fn, teacher=teacher, cache=cache)
    history = fit(qmodel, run, cfg, desc="qat", state_path=os.path.join(out, "qat.state.pt"))
    qmodel.cpu().eval()
    layers = quantized_layer_names(qmodel)
    metrics = {"model": ckpt["model"], "epochs": cfg["epochs"], "test_top1": history[-1]["test_top1"] if history else None,
               "history": history, "data": data.spec, "loss": cfg["loss"], "loss_params": loss_params,
               "qat": {"fp32_top1": fp32_top1, "int8_top1_before": int8_before,
                       "drop_before": round((fp32_top1 - int8_before) * 100, 4),
                       "drop_after": None if not history else round((fp32_top1 - history[-1]["test_top1"]) * 100, 4),
                       "layers_int8": layers, "tool": "nncf.quantize (torch) + distillation fine-tuning"},
               "teacher": {k: t_metrics.get(k) for k in ("model", "source", "test_top1")}}
    qat = {"quantizers": plain_config(qmodel), "source": os.path.abspath(cfg["student"]),
           "source_top1": fp32_top1, "layers_int8": layers, "calib_size": cfg["calib_size"]}
    ckpt_cfg = {**cfg, "data": data.spec, "teacher": teacher_spec}
    save_checkpoint(os.path.join(out, QAT_FILE), qmodel, spec=ckpt["model"], classes=ckpt["classes"],
                    input_spec=InputSpec.from_dict(ckpt["input"]), data_spec=data.spec, metrics=metrics,
                    config=ckpt_cfg, extra={"qat": qat, "params": ckpt.get("params"), "flops": ckpt.get("flops")})
    _write_json(os.path.join(out, "metrics.json"), metrics)
    return metrics


def _quantized_student(cfg, student, train, out):
    """Calibrate once; a resumed run rebuilds the same quantizers from DIR/quantizers.json (the training
    state then restores their trained scales with the weights)."""
    nncf = import_nncf()
    path = os.path.join(out, QUANTIZER_FILE)
    if cfg.get("resume") and os.path.isfile(path) and os.path.isfile(os.path.join(out, "qat.state.pt")):
        with open(path) as f:
            return nncf.torch.load_from_config(student, json.load(f))
    qmodel = calibrate(student, train, cfg["calib_size"], cfg["seed"], cfg.get("progress", True))
    with open(path, "w") as f:
        json.dump(plain_config(qmodel), f)
    return qmodel
