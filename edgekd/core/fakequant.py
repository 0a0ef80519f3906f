"""The fake-quantized model (NNCF) of quantization-aware training: inserting the quantizers, reading their
configuration as plain types for a checkpoint, and rebuilding the model from it. No training here: that is
``edgekd quantize`` (quantize.py)."""

import contextlib
import functools
import json
import os

from types import ModuleType
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, cast

import numpy as np
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


def _sum_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the dimensions where ``ref`` (a scale) has size 1, shaped like ``ref``."""
    if ref.numel() == 1:
        return t.sum().view_as(ref)
    dims = [d for d in range(ref.dim()) if ref.shape[d] == 1]
    return t.sum(dims, keepdim=True) if dims else t


def _dot_like(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(a * b) summed like _sum_like; per tensor as one dot product, with no product tensor in memory."""
    if ref.numel() == 1:
        return torch.dot(a.reshape(-1), b.reshape(-1)).view_as(ref)
    return _sum_like(a * b, ref)


def _scalar_bounds(scale: float, level_low: int, level_high: int, levels: int) -> Tuple[float, float, float, float]:
    """(low, high, levels-per-unit, zero point) of a per-tensor quantizer, computed in float32 in the order
    NNCF's QuantizeSymmetric and its CPU kernel compute them on one-element tensors."""
    f = np.float32
    low = f(scale) * f(level_low / level_high)
    span = f(scale) - low
    s = f(levels - 1) / span
    return float(low), float(low + span), float(s), float(np.round(-low * s))


class _SymmetricFakeQuantize(torch.autograd.Function):
    """NNCF's symmetric fake quantizer (QuantizeSymmetric with its CPU kernel) in fewer passes over the tensor.

    Same arithmetic in the same order, so the same outputs and input gradients, and the same scale gradient
    up to summation order. Why not NNCF's own: its CPU backward recomputes the forward and spends most of its
    time in masked_fill and boolean masks (several times slower than a float pass on this CPU); this keeps
    the quantization error and which side of the range each element fell on (-1, 0, +1) from the forward,
    and builds both gradients from float arithmetic."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, level_low: int, level_high: int,
                levels: int) -> torch.Tensor:
        bounds: Tuple[Any, ...]  # floats per tensor, tensors per channel: clamp and the in-place ops take both
        if scale.numel() == 1:  # per tensor: float32 scalars (numpy's arithmetic is IEEE single, like ATen's)
            span = scale - scale * (level_low / level_high)
            bounds = _scalar_bounds(float(scale), level_low, level_high, levels)
        else:
            low = scale * (level_low / level_high)
            span = scale - low
            high = low + span
            s = torch.full_like(span, levels - 1).div_(span)  # as ATen's Scalar / Tensor (Python's is 1/x * n)
            bounds = (low, high, s, (-low * s).round_())
        low_b, high_b, s_b, zero_b = cast(Tuple[Any, Any, Any, Any], bounds)
        out = torch.clamp(x, low_b, high_b)
        training = any(ctx.needs_input_grad[:2])  # evaluation (no_grad) needs neither the side nor the error
        side = torch.sub(x, out).sign_() if training else None  # +1 above the range, -1 below, 0 inside
        out.sub_(low_b).mul_(s_b).sub_(zero_b).round_().div_(s_b)
        if training:  # the error, not the output: the model may change its output in place (ReLU(inplace=True))
            ctx.save_for_backward(torch.sub(out, x), side, span)
        ctx.alpha = level_low / level_high
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        err, side, span = ctx.saved_tensors
        grad_in = side.abs().neg_().add_(1).mul_(grad)  # straight through inside the range, 0 outside
        # NNCF's scale gradient: (q(x) - x) / span inside, 1 above, level_low / level_high below; the last two
        # as (|side| + side) / 2 and (|side| - side) / 2, where |side| * grad = grad - grad_in
        alpha = ctx.alpha
        err_sum, side_sum = _dot_like(err, grad_in, span), _dot_like(grad, side, span)
        outside = (0.5 * (1 + alpha)) * (_sum_like(grad, span) - _sum_like(grad_in, span)) \
            + (0.5 * (1 - alpha)) * side_sum
        return grad_in, err_sum / span + outside, None, None, None


def _fast_forward(quantizer: "BaseQuantizer", levels: Tuple[int, int, int], original: Any, x: Any) -> Any:
    """A SymmetricQuantizer's forward in training: float32 CPU tensors through _SymmetricFakeQuantize, anything
    else (bf16 autocast, CUDA, NNCF's return types) through NNCF's own forward."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.device.type != "cpu":
        return original(x)
    with torch._C.DisableTorchFunction():  # as NNCF's own: its hook mode need not see the quantizer's arithmetic
        scale = quantizer.scale.abs() + quantizer.eps  # as nncf's symmetric_quantize
        return _SymmetricFakeQuantize.apply(x, scale, *levels)


@contextlib.contextmanager
def fast_quantizers(model: nn.Module) -> Iterator[int]:
    """Within the block, the model's enabled symmetric quantizers run _SymmetricFakeQuantize; yields how many.

    For training and evaluation only: NNCF's own forward comes back on leaving (export traces it). Levels and
    signedness are read once here: training moves the scales, never the levels."""
    from nncf.torch.quantization.layers import SymmetricQuantizer

    patched = []
    for q in quantizer_modules(model):
        if type(q) is SymmetricQuantizer and q.is_enabled_quantization() and not q._is_using_log_scale_storage:
            q.forward = functools.partial(_fast_forward, q, (q.level_low, q.level_high, q.levels), q.forward)
            patched.append(q)
    try:
        yield len(patched)
    finally:
        for q in patched:
            del q.forward
