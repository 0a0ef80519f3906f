"""Checkpoints: a dict of plain types and tensors, written atomically, loaded with weights_only=True."""

import os

import torch

from .. import EdgeKDError, __version__
from ..base.files import atomic_write  # noqa: F401  (re-exported: its old home)
from ..bundle.runner import sha256_file as file_sha256  # noqa: F401  (edgekd's one sha256; this name for the core)
from .models import count_flops, count_params

CHECKPOINT_FORMAT = "edgekd-checkpoint/1"
REQUIRED_KEYS = ("model", "state_dict", "classes", "input")


def save_checkpoint(path, model, *, spec, classes, input_spec, data_spec, metrics, config, extra=None):
    """Write a checkpoint that needs nothing but torch to read back."""
    from ..base.files import portable, spec_for_file

    folder = os.path.dirname(os.path.abspath(path))  # the checkpoint records paths relative to its own folder
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "edgekd_version": __version__,
        "model": spec,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "classes": list(classes),
        "input": input_spec.to_dict(),
        "data": spec_for_file(data_spec, folder),
        "params": count_params(model),
        "flops": count_flops(model, input_spec),
        "metrics": portable(metrics, folder),
        "config": config,
    }
    ckpt.update(extra or {})
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
    return ckpt


def load_checkpoint(path):
    """Read a checkpoint without running any pickled code; refuse anything that is not ours."""
    from .safe_load import Refused, torch_file

    if not os.path.isfile(path):
        raise EdgeKDError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch_file(path, "checkpoint")
    except Refused as e:
        raise EdgeKDError(f"{path!r} is not a usable edgekd checkpoint: {e.reason}") from e.__cause__
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        found = f"a {type(ckpt).__name__}" if not isinstance(ckpt, dict) else \
            "no " + ", ".join(k for k in REQUIRED_KEYS if k not in ckpt)
        raise EdgeKDError(f"{path!r} is not an edgekd checkpoint (expected a dict with {', '.join(REQUIRED_KEYS)}; "
                          f"found {found})")
    problem = checkpoint_problem(ckpt)
    if problem:
        raise EdgeKDError(f"{path!r} is a damaged edgekd checkpoint: {problem}")
    return ckpt


MAX_SIDE = 8192  # an input height or width beyond this is a damaged field, not a model


def _numbers(value, length):
    return (isinstance(value, (list, tuple)) and len(value) == length
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == v for v in value))


def checkpoint_problem(ckpt):
    """The first field of a checkpoint dict with the wrong type, as 'field X: what is wrong', else None."""
    if not isinstance(ckpt["model"], str) or not ckpt["model"]:
        return "field 'model' must be a model spec (a string)"
    state = ckpt["state_dict"]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        return "field 'state_dict' must map parameter names to tensors"
    classes = ckpt["classes"]
    if not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) for c in classes):
        return "field 'classes' must be a non-empty list of class names"
    spec = ckpt["input"]
    if not isinstance(spec, dict):
        return "field 'input' must be a dict with channels, height, width, mean and std"
    for key in ("channels", "height", "width"):
        value = spec.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_SIDE:
            return f"field 'input.{key}' must be a whole number from 1 to {MAX_SIDE}, got {value!r}"
    if spec["channels"] not in (1, 3):
        return f"field 'input.channels' must be 1 or 3, got {spec['channels']!r}"
    if not _numbers(spec.get("mean"), spec["channels"]):
        return f"field 'input.mean' must hold {spec['channels']} numbers"
    if not _numbers(spec.get("std"), spec["channels"]) or min(spec["std"]) <= 0:
        return f"field 'input.std' must hold {spec['channels']} positive numbers"
    return None
