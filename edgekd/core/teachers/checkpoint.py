"""An edgekd checkpoint, and a model spec trained first (by edgekd distill, before the teacher is loaded)."""

import logging
import os

from .source import Source, register_source
from .torchscript import is_torchscript
from .view import Loaded
from ..checkpoint import file_sha256

log = logging.getLogger(__name__)


@register_source("checkpoint")
class CheckpointSource(Source):
    hookable = True

    def matches(self, spec, options):
        return os.path.isfile(spec) and not is_torchscript(spec) and not spec.lower().endswith(
            (".onnx", ".xml", ".pt2", ".zip"))

    def load(self, spec, options, env):
        from ..checkpoint import load_model

        model, ckpt = load_model(spec)
        metrics = dict(ckpt.get("metrics") or {})
        metrics.update(source=os.path.abspath(spec), model=ckpt["model"])
        return from_checkpoint(self.kind, model, ckpt, spec, metrics)


def from_checkpoint(kind, model, ckpt, path, metrics):
    spec_in = ckpt["input"]
    return Loaded(kind, None, module=model, hookable=True, channels=spec_in["channels"],
                  size=(spec_in["height"], spec_in["width"]), mean=list(spec_in["mean"]), std=list(spec_in["std"]),
                  names=[str(c) for c in ckpt["classes"]], names_from="the checkpoint", file=os.path.abspath(path),
                  sha256=file_sha256(path), metrics=metrics, found={"input": "the checkpoint"})


@register_source("model")
class TrainedSource(Source):
    """A model spec (seed-teacher, resnet20, torchvision:resnet18, ...) trained here on the data first."""

    hookable = True

    def matches(self, spec, options):
        return True  # the fallback: resolve() asks it last

    def check(self, spec, options):
        from ..models import check_spec

        check_spec(spec)

    def load(self, spec, options, env):
        from ..checkpoint import load_model
        from ..distill import _finish, _save, _summary
        from ..losses import make_loss
        from ..models import build_model
        from ..train_loop import TrainRun, fit

        cfg, data, ctx = env.cfg, env.data, env.ctx
        path = os.path.join(cfg["out"], "teacher.pt")
        if cfg.get("resume") and ctx.broadcast_object(os.path.isfile(path)):  # trained before the interruption
            model, ckpt = load_model(path)
            log.info("resuming: teacher already trained (%s)", path)
            return from_checkpoint(self.kind, model, ckpt, path, dict(ckpt["metrics"]))
        model = build_model(spec, len(data.classes), data.input)
        loss_fn, _ = make_loss("ce", label_smoothing=cfg.get("label_smoothing"))
        epochs = cfg["teacher_epochs"] or cfg["epochs"]
        t_cfg = {**cfg, "epochs": epochs}
        run = TrainRun(env.train, env.test, loss_fn, dist=ctx)
        history = fit(model, run, t_cfg, desc=f"teacher {spec}", state_path=os.path.join(cfg["out"], "teacher.state.pt"))
        metrics = _finish(model, run, t_cfg, _summary(spec, epochs, history, model, data))
        metrics["source"] = "trained"
        if ctx.is_main:
            _save(path, model, spec, data, metrics, t_cfg)
        ctx.barrier()  # the others hash teacher.pt for the teacher cache: wait until it is written
        ckpt = {"input": data.input.to_dict(), "classes": data.classes}
        return from_checkpoint(self.kind, model.eval().cpu(), ckpt, path, metrics)
