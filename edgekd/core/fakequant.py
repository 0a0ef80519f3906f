"""The fake-quantized model (NNCF) of quantization-aware training: inserting the quantizers, reading their
configuration as plain types for a checkpoint, and rebuilding the model from it. No training here: that is
``edgekd quantize`` (quantize.py)."""

import json
import os

from types import ModuleType
from typing import TYPE_CHECKING, Any, Dict, List

import torch
from torch import nn

from .. import EdgeKDError
from ..base.progress import nncf_quiet
from .checkpoint import Checkpoint

if TYPE_CHECKING:  # heavy: only for the type checker
    from nncf.torch.quantization.layers import BaseQuantizer

NNCF_HOOKS = "__nncf_hooks."


def import_nncf() -> ModuleType:
    """nncf (its telemetry is off in edgekd's processes: base/telemetry.py); its torch extension builds on first
    use (about a minute on 2 cores, cached in ~/.cache/torch_extensions), longer than NNCF's default 60 s wait on
    a busy machine."""
    os.environ.setdefault("OPENVINO_TELEMETRY_OPT_OUT", "1")
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")
    import nncf
    import nncf.torch  # noqa: F401  (get_config / load_from_config)

    return nncf


def plain_config(model: nn.Module) -> Dict[str, Any]:
    """NNCF's quantizer config as JSON types (it holds enums, which torch.load(weights_only=True) refuses)."""
    nncf = import_nncf()
    return json.loads(json.dumps(nncf.torch.get_config(model)))


def base_state(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The float model's own entries of a fake-quantized model's state dict (NNCF keeps its quantizers apart)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(NNCF_HOOKS)}


def restore(ckpt: Checkpoint, model: nn.Module) -> nn.Module:
    """The fake-quantized model of a QAT checkpoint, from a freshly built float ``model``; in eval mode."""
    if ckpt.qat is None:
        raise ValueError("restore() takes a QAT checkpoint")
    nncf = import_nncf()
    try:
        qmodel = nncf.torch.load_from_config(model, ckpt.qat.quantizers)
        qmodel.load_state_dict(ckpt.state_dict)
    except Exception as e:
        raise EdgeKDError(f"QAT checkpoint does not match model {ckpt.model!r}: {str(e).splitlines()[0]}") from e
    return qmodel.eval()


def quantizer_modules(model: nn.Module) -> List["BaseQuantizer"]:
    from nncf.torch.quantization.layers import BaseQuantizer

    return [m for m in model.modules() if isinstance(m, BaseQuantizer)]


def quantized_layer_names(model: nn.Module) -> List[str]:
    """The student's modules that receive a weight quantizer: the layers that run in INT8."""
    # NNCF's JSON, read here only: its commands, each naming the hooks it puts into the model
    hooks = [hook for command in plain_config(model)["compression_state"] for hook in command["hook_names_in_model"]]
    # "pre_hooks.features/0/conv2d/0__1.0": port 1 is the weight of features.0's conv2d
    return sorted({hook.split(".", 1)[1].rsplit("/", 2)[0].replace("/", ".") for hook in hooks
                   if hook.startswith("pre_hooks.") and "__1." in hook})


def calibrate(model: nn.Module, views: Any, size: int, seed: int, progress: bool = True) -> nn.Module:
    """Insert NNCF's fake quantizers and set their ranges on ``size`` un-augmented train images."""
    nncf = import_nncf()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(views), generator=g)[:size]
    images, _ = views.batch(idx)  # no epoch: the plain view, as calibration must see deployment inputs
    dataset = nncf.Dataset([images[i:i + 1] for i in range(len(images))])
    try:
        with nncf_quiet(progress):  # NNCF's extension-build INFO lines and bars follow --no-progress too
            return nncf.quantize(model.eval(), dataset, subset_size=len(images))
    except Exception as e:
        raise EdgeKDError(f"nncf.quantize (fake quantizers for QAT) failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0]}") from e
