"""``torchvision:NAME[:WEIGHTS]``: a torchvision model with pretrained weights (or --teacher-weights FILE)."""

import os
from typing import Tuple

import torch
from torch import nn

from ... import EdgeKDError
from ..checkpoint import file_sha256
from ..models import STEMS, TORCHVISION_PREFIX, check_spec
from .options import TeacherOptions
from .source import Env, Source, state_sha256, register_source
from .view import Loaded, as_logits
from .weights import head_classes, load_state_dict, load_weights


@register_source("torchvision")
class TorchvisionSource(Source):
    """``torchvision:NAME:WEIGHTS`` (pretrained through torchvision's weights API and download cache), or
    ``torchvision:NAME`` with --teacher-weights FILE. Without either it is a model spec trained first."""

    hookable = True

    def matches(self, spec: str, options: TeacherOptions) -> bool:
        if not spec.startswith("torchvision:"):
            return False
        _, _, weights = spec[len("torchvision:"):].partition(":")
        return weights not in STEMS or bool(options.weights)

    def load(self, spec: str, options: TeacherOptions, env: Env) -> Loaded:
        import torchvision

        name, _, weights_name = spec[len("torchvision:"):].partition(":")
        if name not in torchvision.models.list_models(module=torchvision.models):
            check_spec(TORCHVISION_PREFIX + name)  # raises the unknown-model error with a suggestion
        enum = torchvision.models.get_model_weights(name)
        try:
            weights = enum[weights_name] if weights_name else enum.DEFAULT
        except KeyError:
            raise EdgeKDError(f"torchvision {name} has no weights {weights_name!r}: choose from "
                              f"{', '.join(['DEFAULT'] + [w.name for w in enum])}") from None
        lo = Loaded(self.kind, None, hookable=True, channels=3, runtime={"library": "torch"})
        categories = weights.meta.get("categories")  # the class names the weights were trained on
        if options.weights:
            state = load_state_dict(options.weights)
            classes = head_classes(state) or len(categories or ())
            model = torchvision.models.get_model(name, weights=None, num_classes=classes)
            load_weights(model, options.weights, spec, state)
            lo.file, lo.sha256 = os.path.abspath(options.weights), file_sha256(options.weights)
        else:
            try:
                model = torchvision.models.get_model(name, weights=weights)  # torch.hub's cache, downloaded once
            except Exception as e:  # no internet, a proxy, a damaged cache file
                raise EdgeKDError(f"cannot get torchvision weights {weights} ({type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); on a machine "
                                  "without internet pass --teacher-weights FILE") from e
            lo.file, lo.sha256 = weights.url, state_sha256(model, f"{spec}:{weights.url}")
        transform = weights.transforms()
        lo.module, lo.mean, lo.std = model, list(transform.mean), list(transform.std)
        lo.size = (transform.crop_size[0], transform.crop_size[-1])
        lo.found = {"input": f"torchvision {weights} transforms"}
        if categories and _probe_count(model, lo.size) == len(categories):
            lo.names, lo.names_from = list(categories), f"torchvision {weights} meta"
        lo.metrics = {"model": spec, "source": lo.file, "params": sum(p.numel() for p in model.parameters())}
        return lo


def _probe_count(model: nn.Module, size: Tuple[int, int]) -> int:
    with torch.inference_mode():
        return as_logits(model.eval()(torch.zeros(1, 3, *size))).shape[1]
