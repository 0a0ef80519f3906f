"""An edgekd checkpoint, and a model spec trained first (by the run that needs it, before the teacher is loaded)."""

import os
from dataclasses import dataclass

from ... import EdgeKDError
from .source import Source, register_source
from .torchscript import is_torchscript
from .view import Loaded
from ..checkpoint import file_sha256

@register_source("checkpoint")
class CheckpointSource(Source):
    hookable = True

    def matches(self, spec, options):
        return os.path.isfile(spec) and not is_torchscript(spec) and not spec.lower().endswith(
            (".onnx", ".xml", ".pt2", ".zip"))

    def load(self, spec, options, env):
        from ..loading import load_model

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


@dataclass
class Trained:
    """A teacher that this run trained from a model spec (edgekd distill trains it before loading the teacher)."""

    model: object
    ckpt: dict      # its input spec and classes, as a checkpoint holds them
    path: str       # the teacher.pt it was saved to
    metrics: dict


@register_source("model")
class TrainedSource(Source):
    """A model spec (seed-teacher, resnet20, torchvision:resnet18, ...), trained on the data first. A loader never
    trains: the run that needs the teacher trains it (edgekd.core.distill.train_teacher) and hands it in."""

    hookable = True

    def matches(self, spec, options):
        return True  # the fallback: resolve() asks it last

    def check(self, spec, options):
        from ..models import check_spec

        check_spec(spec)

    def load(self, spec, options, env):
        trained = env.trained
        if trained is None:
            raise EdgeKDError(f"teacher {spec!r} is a model spec, which must be trained first (edgekd distill does "
                              "that); give a trained teacher: a checkpoint, a bundle, an ONNX file, ...")
        return from_checkpoint(self.kind, trained.model, trained.ckpt, trained.path, trained.metrics)
