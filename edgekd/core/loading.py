"""A checkpoint back in memory as a model: the file format is checkpoint.py, the architectures models.py, the
fake quantizers of a QAT checkpoint fakequant.py; this module puts them together."""

from typing import Tuple

from torch import nn

from .. import EdgeKDError
from .checkpoint import Checkpoint, read_checkpoint
from .fakequant import base_state, restore
from .models import build_model


def load_model(path: str) -> Tuple[nn.Module, Checkpoint]:
    """The model of a checkpoint, in eval mode, with its Checkpoint record."""
    ckpt = read_checkpoint(path)
    model = build_model(ckpt.model, len(ckpt.classes), ckpt.input)
    if ckpt.qat is not None:  # int8: a QAT checkpoint (edgekd quantize) rebuilds its fake-quantized model
        return restore(ckpt, model), ckpt
    try:
        model.load_state_dict(ckpt.state_dict)
    except (RuntimeError, TypeError, ValueError) as e:
        raise EdgeKDError(f"checkpoint {path!r} does not match model {ckpt.model!r}: {_first_line(e)}") from e
    return model.eval(), ckpt


def float_model(ckpt: Checkpoint) -> nn.Module:
    """The QAT checkpoint's fine-tuned weights without the quantizers: its FP32 counterpart, layer for layer."""
    model = build_model(ckpt.model, len(ckpt.classes), ckpt.input)
    model.load_state_dict(base_state(ckpt.state_dict))
    return model.eval()


def _first_line(error: Exception) -> str:
    """The first line naming a problem of a load_state_dict error (its first line is only a header)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
        return lines[1]
    return lines[0] if lines else type(error).__name__
