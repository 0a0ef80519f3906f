"""An edgekd checkpoint, and a model spec trained first (by the run that needs it, before the teacher is loaded)."""

import os
from dataclasses import dataclass
from typing import Any, Dict, List

from torch import nn

from ... import EdgeKDError
from ..checkpoint import file_sha256
from ..data import InputSpec
from ..loading import load_model
from ..models import check_spec
from .options import TeacherOptions
from .source import Env, Source, register_source
from .torchscript import is_torchscript
from .view import Loaded


@register_source("checkpoint")
class CheckpointSource(Source):
    hookable = True

    def matches(self, spec: str, options: TeacherOptions) -> bool:
        return os.path.isfile(spec) and not is_torchscript(spec) and not spec.lower().endswith(
            (".onnx", ".xml", ".pt2", ".zip"))

    def load(self, spec: str, options: TeacherOptions, env: Env) -> Loaded:
        model, ckpt = load_model(spec)
        metrics = dict(ckpt.metrics)
        metrics.update(source=os.path.abspath(spec), model=ckpt.model)
        return from_checkpoint(self.kind, model, ckpt.input, ckpt.classes, spec, metrics)


def from_checkpoint(kind: str, model: nn.Module, spec_in: InputSpec, classes: List[str], path: str,
                    metrics: Dict[str, Any]) -> Loaded:
    return Loaded(kind, None, module=model, hookable=True, channels=spec_in.channels,
                  size=(spec_in.height, spec_in.width), mean=list(spec_in.mean), std=list(spec_in.std),
                  names=[str(c) for c in classes], names_from="the checkpoint", file=os.path.abspath(path),
                  sha256=file_sha256(path), metrics=metrics, found={"input": "the checkpoint"})


@dataclass
class Trained:
    """A teacher that this run trained from a model spec (edgekd distill trains it before loading the teacher)."""

    model: nn.Module
    input: InputSpec          # its input spec and class names, as its checkpoint records them
    classes: List[str]
    path: str                 # the teacher.pt it was saved to
    metrics: Dict[str, Any]   # its metrics.json record


@register_source("model")
class TrainedSource(Source):
    """A model spec (seed-teacher, resnet20, torchvision:resnet18, ...), trained on the data first. A loader never
    trains: the run that needs the teacher trains it (edgekd.core.distill.train_teacher) and hands it in."""

    hookable = True

    def matches(self, spec: str, options: TeacherOptions) -> bool:
        return True  # the fallback: resolve() asks it last

    def check(self, spec: str, options: TeacherOptions) -> None:
        check_spec(spec)

    def load(self, spec: str, options: TeacherOptions, env: Env) -> Loaded:
        trained = env.trained
        if trained is None:
            raise EdgeKDError(f"teacher {spec!r} is a model spec, which must be trained first (edgekd distill does "
                              "that); give a trained teacher: a checkpoint, a bundle, an ONNX file, ...")
        return from_checkpoint(self.kind, trained.model, trained.input, trained.classes, trained.path,
                               trained.metrics)
