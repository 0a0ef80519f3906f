"""Intermediate features by layer name, for feature-based distillation (FitNets hints)."""

import difflib
from typing import Any, Optional, Tuple

import torch
from torch import nn

from .. import EdgeKDError
from .data import InputSpec
from .models import example_input

# The middle stage of the built-in models: where FitNets puts its hint (half-way through the network).
AUTO_LAYERS = {"CifarResNet": "layer2", "CompactStudent": "features.6", "ResNet": "layer2",
               "SeedTeacher": "conv2", "SeedStudent": "conv2"}


def resolve_layer(model: nn.Module, name: str) -> Tuple[str, nn.Module]:
    """The module called ``name`` in ``model`` ("auto": the model family's middle stage)."""
    if name == "auto":
        auto = AUTO_LAYERS.get(type(model).__name__)
        if auto is None:
            raise EdgeKDError(f"no default feature layer for {type(model).__name__}; name one with "
                              "--student-layer/--teacher-layer (see model.named_modules())")
        name = auto
    modules = dict(model.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, list(modules), n=3)
        raise EdgeKDError(f"no layer {name!r} in {type(model).__name__}" + (f"; close: {', '.join(close)}" if close else ""))
    return name, modules[name]


class FeatureTap:
    """Keeps the latest output of one named layer (a forward hook); ``remove()`` detaches it."""

    def __init__(self, model: nn.Module, name: str) -> None:
        self.name, module = resolve_layer(model, name)
        self.output: Optional[torch.Tensor] = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.output = output

    def remove(self) -> None:
        self._handle.remove()


def feature_shape(model: nn.Module, tap: FeatureTap, input_spec: InputSpec) -> Tuple[int, ...]:
    """The shape of the tapped layer's output for one image (runs one forward in eval mode)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(example_input(model, input_spec.channels, input_spec.height, input_spec.width))
    model.train(was_training)
    if not isinstance(tap.output, torch.Tensor) or tap.output.dim() != 4:
        raise EdgeKDError(f"layer {tap.name!r} does not give a (N, C, H, W) feature map")
    return tuple(tap.output.shape)


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)
