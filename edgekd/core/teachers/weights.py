"""--teacher-weights: a local state dict loaded into a teacher built from code (torchvision, timm, a factory)."""

from typing import Dict, Optional

import torch
from torch import nn

from ... import EdgeKDError
from ..pretrained import read_weights_file


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The state dict of a --teacher-weights file: edgekd.core.pretrained.read_weights_file, the students' reader
    (DDP and torch.compile prefixes, EMA copies and safetensors handled there, once)."""
    return read_weights_file(path, "--teacher-weights")


def load_weights(model: nn.Module, path: str, spec: str, state: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Load ``path`` (or its ``state``, already read) into ``model``; a misfit names the teacher spec."""
    try:
        model.load_state_dict(load_state_dict(path) if state is None else state, strict=True)
    except RuntimeError as e:
        raise EdgeKDError(f"--teacher-weights {path!r} does not fit {spec!r}: "
                          f"{' '.join(str(e).split())[:300]}") from e


def head_classes(state: Dict[str, torch.Tensor]) -> Optional[int]:
    """The class count of a state dict: the rows of its last 2-D weight (the classifier)."""
    weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    return int(weights[-1].shape[0]) if weights else None
