"""--teacher-weights: a local state dict loaded into a teacher built from code (torchvision, timm, a factory)."""

import torch

from ... import EdgeKDError


def load_state_dict(path):
    """A state dict from a .safetensors file or a torch file (a bare state dict, or one under 'state_dict'/'model')."""
    if path.lower().endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise EdgeKDError("reading .safetensors needs the safetensors package: pip install 'edgekd[timm]'") from None
        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EdgeKDError(f"--teacher-weights {path!r} is not a state dict torch can read: "
                          f"{str(e).strip().splitlines()[0][:200]}") from e
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EdgeKDError(f"--teacher-weights {path!r} does not hold a state dict (names -> tensors)")
    return obj


def load_weights(model, path, spec):
    try:
        model.load_state_dict(load_state_dict(path), strict=True)
    except RuntimeError as e:
        raise EdgeKDError(f"--teacher-weights {path!r} does not fit {spec!r}: "
                          f"{' '.join(str(e).split())[:300]}") from e


def head_classes(state):
    """The class count of a state dict: the rows of its last 2-D weight (the classifier)."""
    weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    return int(weights[-1].shape[0]) if weights else None
