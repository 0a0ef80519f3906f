"""Pretrained starting weights for students: torchvision's weights API, timm's pretrained models, or a local
state dict (.pth/.pt or .safetensors) for machines without internet, fitted to the data's classes and channels;
and the normalisation and view those weights were trained at."""

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import EdgeKDError
from ..base.jsonrec import record_dict
from ..bundle.manifest import sha256_file
from .data import InputSpec
from .models import (TIMM_PREFIX, TORCHVISION_PREFIX, build_architecture, build_model, check_spec, import_timm,
                     parse_timm_spec, parse_torchvision_spec, timm_model, torchvision_weights)
from .safe_load import weights_file

# Building a model is one concern over two modules: these lines log as the model builder's (edgekd.core.models),
# where a user or a test filters them.
log = logging.getLogger(__name__.rsplit(".", 1)[0] + ".models")


@dataclass
class Fitted:
    """Where a student's pretrained weights came from and what was fitted to the data (metrics.json's
    ``pretrained``)."""

    source: str
    head: List[str] = field(default_factory=list)      # heads replaced: 'fc 1000 -> 10'
    adapted: List[str] = field(default_factory=list)   # input convolutions fitted to the data's channels
    sha256: Optional[str] = None                        # of a local weights file
    loaded_tensors: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        d = record_dict(self, omit_none=frozenset({"sha256", "loaded_tensors"}))
        return {**d, "head": list(self.head), "adapted": list(self.adapted)}

# What torchvision's classification weights were trained with (every one of them uses these).
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def pretrained_norm(spec: str, weights_path: Optional[str] = None) -> Optional[Tuple[List[float], List[float], str]]:
    """(mean, std, source) of the RGB inputs the pretrained weights of a student were trained on, or None
    when it starts from random weights (or a local file for an edgekd model, whose statistics are unknown).
    Found without downloading: torchvision's weights enum and timm's pretrained config carry them."""
    if spec.startswith(TORCHVISION_PREFIX):
        name, weights, _ = parse_torchvision_spec(spec)
        if weights:
            member = torchvision_weights(name, weights)
            t = member.transforms()
            return list(t.mean), list(t.std), f"torchvision {member}"
        if weights_path:  # every torchvision classification weight set was trained on these
            return list(IMAGENET_MEAN), list(IMAGENET_STD), f"ImageNet (torchvision {name}, weights file)"
    if spec.startswith(TIMM_PREFIX):
        name, pretrained, _ = parse_timm_spec(spec)
        if pretrained or weights_path:
            cfg = None
            if not name.startswith(("hf-hub:", "hf_hub:")):
                cfg = import_timm().models.get_pretrained_cfg(name)
            if cfg is None:
                return list(IMAGENET_MEAN), list(IMAGENET_STD), f"ImageNet (timm {name}: no pretrained config)"
            return list(cfg.mean), list(cfg.std), f"timm {name} pretrained config"
    return None


def pretrained_view(spec: str, weights_path: Optional[str] = None) -> Optional[Tuple[Tuple[int, ...], float, str]]:
    """((height, width), crop_pct, source) that a pretrained student's weights were evaluated at (torchvision's
    weights transforms, timm's pretrained config), or None; the default input for folders of mixed sizes."""
    try:
        if spec.startswith(TORCHVISION_PREFIX):
            name, weights, _ = parse_torchvision_spec(spec)
            if weights:
                member = torchvision_weights(name, weights)
                t = member.transforms()
                crop = int(t.crop_size[0])
                return (crop, crop), crop / int(t.resize_size[0]), f"torchvision {member}"
        if spec.startswith(TIMM_PREFIX):
            name, pretrained, _ = parse_timm_spec(spec)
            if (pretrained or weights_path) and not name.startswith(("hf-hub:", "hf_hub:")):
                cfg = import_timm().models.get_pretrained_cfg(name)
                if cfg is not None and cfg.input_size:
                    crop_pct = cfg.crop_pct if cfg.crop_pct and math.isfinite(cfg.crop_pct) else 0.875
                    return tuple(cfg.input_size[1:]), min(float(crop_pct), 1.0), f"timm {name} pretrained config"
    except EdgeKDError:
        return None  # the spec's own checks say what is wrong, later and better
    return None


def build_pretrained(spec: str, num_classes: int, input_spec: InputSpec,
                     weights_path: Optional[str] = None) -> Tuple[nn.Module, Optional[Dict[str, Any]]]:
    """(model, record): ``spec``'s architecture started from pretrained weights, or (build_model, None) when
    neither the spec names weights nor ``weights_path`` is given.

    Weights come from torchvision's weights API (``torchvision:NAME:WEIGHTS``, downloaded once into
    torch's cache, TORCH_HOME), from timm (``timm:NAME:pretrained``, timm's cache) or from a local state
    dict (``weights_path``: .pth/.pt or .safetensors) for machines without internet. The classifier
    head is replaced to fit ``num_classes`` (logged), grey inputs get the stem's RGB weights summed, and
    anything else that does not fit is a one-line error naming the first bad key.
    """
    source = _weights_source(spec, weights_path)
    if source is None:
        return build_model(spec, num_classes, input_spec), None
    record = Fitted(source)
    if weights_path:
        state = read_weights_file(weights_path)
        record.sha256 = sha256_file(weights_path)
        load = lambda model: load_state(model, state, num_classes, f"weights file {weights_path!r}", record)  # noqa: E731
    elif spec.startswith(TORCHVISION_PREFIX):
        name, weights, _ = parse_torchvision_spec(spec)
        state = _download_torchvision(torchvision_weights(name, weights or "DEFAULT"))  # named: _weights_source
        load = lambda model: load_state(model, state, num_classes, f"torchvision {source}", record)  # noqa: E731
    else:
        load = _timm_pretrained_loader(spec, num_classes, input_spec, record)
    model = build_architecture(spec, num_classes, input_spec, load)
    for line in record.head:
        log.info("%s: replaced head %s classes", source, line)
    for line in record.adapted:
        log.info("%s: %s", source, line)
    return model, record.to_dict()


def _weights_source(spec: str, weights_path: Optional[str]) -> Optional[str]:
    named = ((spec.startswith(TORCHVISION_PREFIX) and parse_torchvision_spec(spec)[1])
             or (spec.startswith(TIMM_PREFIX) and parse_timm_spec(spec)[1]))
    if named and weights_path:
        raise EdgeKDError(f"model {spec!r} names its pretrained weights and a weights file {weights_path!r} was given "
                          "too: use one of them")
    if weights_path:
        return f"file {os.path.basename(weights_path)}"  # its sha256 beside it; no path of this machine
    if not named:
        return None
    if spec.startswith(TORCHVISION_PREFIX):
        name, weights, _ = parse_torchvision_spec(spec)
        return str(torchvision_weights(name, weights or "DEFAULT"))  # named: weights is set
    return f"timm {parse_timm_spec(spec)[0]} (pretrained)"


def _no_download(what: str, e: Exception) -> EdgeKDError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return EdgeKDError(f"could not download {what} ({type(e).__name__}: {reason}); without internet, pass a local "
                       "copy of the weights with --student-weights PATH (edgekd train: --weights PATH)")


def _download_torchvision(member: Any) -> Dict[str, torch.Tensor]:
    """The state dict of torchvision weights, through torch's download cache (TORCH_HOME/hub/checkpoints)."""
    try:
        return member.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as e:  # no network, a proxy, a damaged file: say what to do instead
        raise _no_download(f"torchvision weights {member}", e) from e


def _timm_pretrained_loader(spec: str, num_classes: int, input_spec: InputSpec,
                            record: Fitted) -> Callable[[nn.Module], None]:
    """timm's own loader (create_model(pretrained=True)) fits the head and input channels; its weights are
    then copied into the architecture build_model makes, so a checkpoint rebuilds the same model."""
    name, _, _ = parse_timm_spec(spec)
    try:
        ref = timm_model(name, num_classes, input_spec.channels, pretrained=True)
    except EdgeKDError:
        raise
    except Exception as e:
        raise _no_download(f"timm weights for {name!r}", e) from e
    timm_config = getattr(ref, "pretrained_cfg", {}) or {}  # timm's dict of what the weights were trained with
    head, classes, size = (timm_config.get(k) for k in ("classifier", "num_classes", "input_size"))
    if head and classes and classes != num_classes:
        record.head.append(f"{head if isinstance(head, str) else '/'.join(head)} {classes} -> {num_classes}")
    if input_spec.channels != (size or (3,))[0]:
        record.adapted.append(f"stem convolution fitted to {input_spec.channels}-channel input by timm")

    def load(model: nn.Module) -> None:
        model.load_state_dict(ref.state_dict())

    return load


# Where training scripts keep the weights inside a checkpoint: the trained ones first, then an EMA copy
# (timm's state_dict_ema, DeiT's model_ema) when that is all the file holds.
WEIGHTS_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
# Prefixes that wrappers put before every key: DistributedDataParallel/DataParallel and EMA wrappers
# ("module."), torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_weights_file(path: str, flag: str = "weights file") -> Dict[str, torch.Tensor]:
    """A state dict (parameter name -> tensor) from a .pth/.pt file (read with weights_only=True: no pickled
    code runs) or a .safetensors file: the one reader of --weights, --student-weights and --teacher-weights.
    A training checkpoint holding one under a key of WEIGHTS_KEYS is unwrapped, and the prefixes of
    WRAPPER_PREFIXES (DDP's 'module.', torch.compile's '_orig_mod.') are dropped. ``flag`` names the file
    in errors."""
    if not os.path.isfile(path):
        raise EdgeKDError(f"{flag} {path!r} does not exist")
    state = weights_file(path, flag)  # edgekd's one loader of files that can carry a pickle
    for key in WEIGHTS_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EdgeKDError(f"{flag} {path!r} holds no state dict (a dict of parameter name -> tensor, as "
                          "torch.save(model.state_dict(), path) writes)")
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state, stripped = {k[len(prefix):]: v for k, v in state.items()}, True
    return state



def _head_module(model: nn.Module, num_classes: int) -> Optional[str]:
    """The classifier head: the last Linear (or 1x1 convolution, SqueezeNet) with ``num_classes`` outputs."""
    head = None
    for name, m in model.named_modules():
        if (isinstance(m, nn.Linear) and m.out_features == num_classes) or (
                isinstance(m, nn.Conv2d) and m.out_channels == num_classes and m.kernel_size == (1, 1)):
            head = name
    return head


def _first_conv_weight(model: nn.Module) -> Optional[str]:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return f"{name}.weight"
    return None


def adapt_input_conv(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """RGB stem weights (O, 3, k, k) for ``channels`` inputs: summed for grey (a grey image is R=G=B), else
    repeated and rescaled so the output keeps its size (timm's rule)."""
    if channels == 1:
        return weight.sum(1, keepdim=True)
    reps = -(-channels // weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :channels] * (weight.shape[1] / channels)


def load_state(model: nn.Module, state: Dict[str, torch.Tensor], num_classes: int, source: str,
               record: Fitted) -> None:
    """Copy a pretrained ``state`` into ``model`` (built for the data: its head and input channels).

    Head tensors whose class count differs stay new (recorded as 'fc 1000 -> 10'), the first convolution's
    RGB weights are fitted to the data's channels; a missing, unexpected or misshapen key otherwise is
    a one-line error naming the first one.
    """
    own = model.state_dict()
    head, first_conv = _head_module(model, num_classes), _first_conv_weight(model)
    fitted, replaced = {}, {}
    for key, target in own.items():
        module = key.rsplit(".", 1)[0]
        value = state.get(key)
        if value is None:
            if key.endswith("num_batches_tracked"):  # older files lack it; batch norm fills it in
                continue
            if module == head:  # a backbone-only file: the head is new anyway
                replaced[module] = f"{module} (not in the file) -> {num_classes}"
                continue
            raise EdgeKDError(f"{source} does not fit this model: it has no key {key!r}")
        if value.shape == target.shape:
            fitted[key] = value
        elif module == head and value.shape[1:] == target.shape[1:]:
            replaced[module] = f"{module} {value.shape[0]} -> {target.shape[0]}"
        elif key == first_conv and value.dim() == 4 and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]:
            fitted[key] = adapt_input_conv(value, target.shape[1])
            record.adapted.append(f"{key} fitted from {value.shape[1]} to {target.shape[1]} input channels")
        else:
            raise EdgeKDError(f"{source} does not fit this model: key {key!r} is {list(value.shape)} in the file "
                              f"but {list(target.shape)} in the model")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise EdgeKDError(f"{source} does not fit this model: unexpected key {unexpected[0]!r}{more}")
    model.load_state_dict(fitted, strict=False)
    record.head += sorted(set(replaced.values()))
    record.loaded_tensors = len(fitted)


def check_student(spec: str, weights_path: Optional[str] = None) -> None:
    """check_spec, plus the weights file: it exists, and the spec does not name other weights too."""
    check_spec(spec)
    if weights_path is not None and not os.path.isfile(weights_path):
        raise EdgeKDError(f"weights file {weights_path!r} does not exist (a state dict saved as .pth/.pt or .safetensors)")
    _weights_source(spec, weights_path)


def fetch_pretrained(spec: str) -> None:
    """Download the weights a spec names into the library's cache now, before any data is decoded, so that
    a machine without internet fails in seconds (build_pretrained then reads the cached file)."""
    if spec.startswith(TORCHVISION_PREFIX):
        name, weights, _ = parse_torchvision_spec(spec)
        if weights:
            _download_torchvision(torchvision_weights(name, weights))
    elif spec.startswith(TIMM_PREFIX):
        name, pretrained, _ = parse_timm_spec(spec)
        if pretrained:
            try:
                import_timm().create_model(name, pretrained=True)
            except Exception as e:
                raise _no_download(f"timm weights for {name!r}", e) from e
