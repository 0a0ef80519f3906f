"""Model specs -> nn.Module.

Specs: ``seed-teacher`` and ``seed-student`` (the two CNNs of the seed article),
``compact-student`` (ours: at most a quarter of seed-teacher's parameters and compute),
the CIFAR ResNets of the distillation literature (``resnet8``, ``resnet14``, ``resnet20``, ``resnet32``,
``resnet44``, ``resnet56``, ``resnet110``, ``resnet8x4``, ``resnet32x4``),
``torchvision:NAME[:WEIGHTS][:STEM]`` (any torchvision classification model; WEIGHTS is a name of its
weights enum in upper case, ``DEFAULT`` or e.g. ``IMAGENET1K_V1``; at inputs of 64 px or less its stem
is swapped for a small-input one, STEM ``small-stem`` / ``imagenet-stem`` forces either),
``timm:NAME[:pretrained][:STEM]`` (a timm model: random weights, or timm's pretrained ones),
or a checkpoint path.

``build_model`` builds the architecture only and never downloads: a checkpoint of a pretrained
student rebuilds from its spec and loads its own state dict. ``build_pretrained`` (pretrained.py) adds
the pretrained weights; architectures.py holds the models edgekd defines itself.
"""

import difflib
import logging
import os
import re
from types import ModuleType
from typing import Any, Callable, List, Optional, Tuple, Union, cast

import torch
from torch import nn

from .. import EdgeKDError
from .architectures import MODELS
from .data import InputSpec

log = logging.getLogger(__name__)

TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"
TIMM_PRETRAINED = "pretrained"  # timm:NAME:pretrained loads timm's default pretrained weights
# torchvision weights names are enum members: upper case, digits and underscores (DEFAULT, IMAGENET1K_V1).
WEIGHTS_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
# At or below this size an ImageNet stem (stride-2 conv + max-pool: /4) throws away most of the
# image before the first block; the small-input stem keeps full resolution, as CIFAR models do.
SMALL_INPUT_MAX = 64
STEMS = ("", "small-stem", "imagenet-stem")


def model_names() -> List[str]:
    return MODELS.names() + [TORCHVISION_PREFIX + "NAME[:WEIGHTS][:STEM]", TIMM_PREFIX + "NAME[:pretrained][:STEM]",
                             "a checkpoint path"]


def _unknown_spec(spec: str) -> EdgeKDError:
    return EdgeKDError(MODELS.unknown_message(spec) + f" (or {TORCHVISION_PREFIX}NAME, {TIMM_PREFIX}NAME, or a checkpoint path)")


def check_spec(spec: str) -> None:
    """Refuse an unknown model name or a malformed spec before any data is loaded (nothing is downloaded)."""
    if spec.startswith(TORCHVISION_PREFIX):
        name, weights, _ = parse_torchvision_spec(spec)
        _torchvision_name(name)
        if weights:
            torchvision_weights(name, weights)
        return
    if spec.startswith(TIMM_PREFIX):
        _timm_name(parse_timm_spec(spec)[0])
        return
    if spec in MODELS or os.path.isfile(spec):
        return
    if spec.endswith(".pt"):
        raise EdgeKDError(f"checkpoint {spec!r} does not exist")
    raise _unknown_spec(spec)


def parse_torchvision_spec(spec: str) -> Tuple[str, Optional[str], str]:
    """``torchvision:NAME[:WEIGHTS][:STEM]`` -> (name, weights or None, stem or '').

    Unambiguous because the two parts look different: stems are the lower-case words of STEMS,
    weights names are torchvision enum members in upper case (DEFAULT, IMAGENET1K_V1).
    """
    name, *rest = spec[len(TORCHVISION_PREFIX):].split(":")
    weights = stem = None
    form = f"use {TORCHVISION_PREFIX}NAME[:WEIGHTS][:STEM], e.g. {TORCHVISION_PREFIX}resnet18:DEFAULT:small-stem"
    for part in rest:
        if part in STEMS and part and stem is None:
            stem = part
        elif WEIGHTS_NAME.match(part) and weights is None and stem is None:
            weights = part
        else:
            raise EdgeKDError(f"unknown stem or misplaced weights name {part!r} in model spec {spec!r}: {form} "
                              f"(weights in upper case, stem {' or '.join(STEMS[1:])})")
    if not name:
        raise EdgeKDError(f"model spec {spec!r} names no model: {form}")
    return name, weights, stem or ""


def parse_timm_spec(spec: str) -> Tuple[str, bool, str]:
    """``timm:NAME[:pretrained][:STEM]`` -> (name, pretrained, stem). Plain ``timm:NAME`` is random init,
    like ``torchvision:NAME``: a spec alone never downloads unless it asks to."""
    parts = spec[len(TIMM_PREFIX):].split(":")
    stem = parts.pop() if len(parts) > 1 and parts[-1] in STEMS else ""
    pretrained = len(parts) > 1 and parts[-1] == TIMM_PRETRAINED
    if pretrained:
        parts.pop()
    name = ":".join(parts)  # timm's own names may hold a colon (hf-hub:org/model)
    if not name or name.endswith(":"):
        raise EdgeKDError(f"cannot read model spec {spec!r}: use {TIMM_PREFIX}NAME[:{TIMM_PRETRAINED}][:small-stem|imagenet-stem]")
    return name, pretrained, stem


def import_timm() -> ModuleType:
    try:
        import timm
    except ImportError:
        raise EdgeKDError("timm: models need the timm package: pip install 'edgekd[timm]' (or timm safetensors)") from None
    return timm


def _timm_name(name: str) -> None:
    timm = import_timm()
    if name.startswith("hf-hub:") or name.startswith("hf_hub:") or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=1)
    hint = f"; did you mean '{TIMM_PREFIX}{close[0]}'?" if close else ""
    raise EdgeKDError(f"unknown timm model {name!r}{hint} (see timm.list_models())")


def build_model(spec: str, num_classes: int, input_spec: InputSpec) -> nn.Module:
    """Build a model for ``num_classes`` classes and the data's input channels and size, with fresh
    random weights (a pretrained spec gives the same architecture; see build_pretrained)."""
    return build_architecture(spec, num_classes, input_spec, None)


def build_architecture(spec: str, num_classes: int, input_spec: InputSpec,
                       load: Optional[Callable[[nn.Module], None]]) -> nn.Module:
    """The architecture of ``spec``; ``load(model)`` (when given) fills in pretrained weights after the head
    and input channels are fitted to the data and before the stem is adapted to small inputs."""
    c, h, w = input_spec.channels, input_spec.height, input_spec.width
    if spec.startswith(TORCHVISION_PREFIX) or spec.startswith(TIMM_PREFIX):
        if spec.startswith(TORCHVISION_PREFIX):
            name, _, stem = parse_torchvision_spec(spec)
            model = _torchvision_model(name, num_classes, c)
        else:
            name, _, stem = parse_timm_spec(spec)
            model = timm_model(name, num_classes, c)
        if load is not None:
            load(model)
        if stem == "small-stem" or (stem == "" and max(h, w) <= SMALL_INPUT_MAX):
            small_input_stem(model)
            if load is not None:  # a ResNet's 7x7 conv1 becomes a new 3x3 one: its pretrained weights go
                log.info("small-input stem for %dx%d inputs (the first convolution runs at stride 1; a ResNet's "
                         "conv1 is a new 3x3 one and its max-pool goes)", h, w)
    else:
        if spec.endswith(".pt"):
            raise EdgeKDError(f"checkpoint {spec!r} does not exist")
        if spec not in MODELS:
            raise _unknown_spec(spec)
        if spec.startswith("seed-") and (h % 4 or w % 4):
            raise EdgeKDError(f"{spec} needs an input size divisible by 4, got {h}x{w}")
        model = MODELS.get(spec)(num_classes, c, h, w)
        if load is not None:
            load(model)
    _check_forward(model, spec, c, h, w)
    return model


def timm_model(name: str, num_classes: int, in_channels: int, pretrained: bool = False) -> nn.Module:
    timm = import_timm()
    _timm_name(name)
    # timm fits the head and, for grey inputs, sums the stem's RGB weights itself (in_chans).
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels)


def _torchvision_name(name: str) -> None:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=1)
        hint = f"; did you mean '{TORCHVISION_PREFIX}{close[0]}'?" if close else ""
        raise EdgeKDError(f"unknown torchvision classification model {name!r}{hint} (see torchvision.models.list_models())")


def _torchvision_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    _torchvision_name(name)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def small_input_stem(model: nn.Module) -> nn.Module:
    """Adapt a torchvision model to small (e.g. 32x32) images: a 3x3 stride-1 first convolution, no max-pool.

    ResNet-style models (``conv1`` + ``maxpool``) get a new 3x3 stride-1 ``conv1`` and lose the
    max-pool; other families (MobileNet, EfficientNet, RegNet, ...) keep their first convolution's
    weights shape but run it at stride 1. Returns the model.
    """
    old = getattr(model, "conv1", None)
    if isinstance(old, nn.Conv2d):
        model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=old.bias is not None)
        if isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
            model.maxpool = nn.Identity()
        return model
    for module in model.modules():
        if isinstance(module, nn.Conv2d):  # the first convolution is the stem
            module.stride = (1, 1)
            return model
    raise EdgeKDError("cannot find a stem convolution to adapt to small inputs")


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the stem convolution for one with the data's channel count (e.g. 1 for grey digits)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                pair = Tuple[int, int]  # a Conv2d's kernel, stride, padding and dilation are pairs
                new = nn.Conv2d(in_channels, child.out_channels, cast(pair, child.kernel_size), cast(pair, child.stride),
                                cast(Union[str, pair], child.padding), cast(pair, child.dilation), 1,
                                child.bias is not None, child.padding_mode)
                setattr(parent, child_name, new)
                return
    raise EdgeKDError("cannot find the first convolution to adapt to the input channels")


def example_input(model: nn.Module, c: int, h: int, w: int) -> torch.Tensor:
    """One zero image on the device (and floating dtype) of ``model``'s weights: a CPU tensor fed to a
    model on the GPU fails, and counting FLOPs after a CUDA run did."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    device, dtype = (tensors[0].device, tensors[0].dtype) if tensors else (torch.device("cpu"), torch.float32)
    return torch.zeros(1, c, h, w, device=device, dtype=dtype)


def _check_forward(model: nn.Module, spec: str, c: int, h: int, w: int) -> None:
    """Fail early, with the input size, when a model cannot run on the data's images."""
    model.eval()
    try:
        with torch.no_grad():
            model(example_input(model, c, h, w))
    except RuntimeError as e:
        raise EdgeKDError(f"model {spec!r} cannot run on {c}x{h}x{w} inputs: {str(e).splitlines()[0]}") from e


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_spec: InputSpec) -> int:
    """FLOPs of one image's forward pass (multiply-add = 2 FLOPs), from torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = example_input(model, input_spec.channels, input_spec.height, input_spec.width)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())


def torchvision_weights(name: str, weights_name: str) -> Any:
    """The torchvision weights enum member ``weights_name`` of model ``name`` (no download)."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    try:
        return enum[weights_name]
    except KeyError:
        raise EdgeKDError(f"torchvision model {name!r} has no weights {weights_name!r}: choose from "
                          f"{', '.join(enum.__members__)}") from None
