"""Checkpoints: a dict of plain types and tensors, written atomically, loaded with weights_only=True."""

import os
import tempfile

import torch

from . import EdgeKDError, __version__

CHECKPOINT_FORMAT = "edgekd-checkpoint/1"
REQUIRED_KEYS = ("model", "state_dict", "classes", "input")


def atomic_write(path, write):
    """Call ``write(tmp_path)`` then move the finished file into place, so no reader sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_folder(folder):
    """Make the rename itself durable (a crash right after os.replace keeps the new file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path, model, *, spec, classes, input_spec, data_spec, metrics, config, extra=None):
    """Write a checkpoint that needs nothing but torch to read back."""
    from .models import count_flops, count_params

    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "edgekd_version": __version__,
        "model": spec,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "classes": list(classes),
        "input": input_spec.to_dict(),
        "data": data_spec,
        "params": count_params(model),
        "flops": count_flops(model, input_spec),
        "metrics": metrics,
        "config": config,
    }
    ckpt.update(extra or {})
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
    return ckpt


def load_checkpoint(path):
    """Read a checkpoint without running any pickled code; refuse anything that is not ours."""
    if not os.path.isfile(path):
        raise EdgeKDError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            reason = "it contains pickled Python objects, which edgekd never loads"
        else:
            reason = "not a file written by torch.save, or a damaged one"
        raise EdgeKDError(f"{path!r} is not a usable edgekd checkpoint: {reason}") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise EdgeKDError(f"{path!r} is not an edgekd checkpoint (expected a dict with {', '.join(REQUIRED_KEYS)})")
    return ckpt


def load_model(path):
    """The model of a checkpoint, in eval mode, with the checkpoint dict."""
    from .data import InputSpec
    from .models import build_model

    ckpt = load_checkpoint(path)
    model = build_model(ckpt["model"], len(ckpt["classes"]), InputSpec.from_dict(ckpt["input"]))
    if "qat" in ckpt:  # int8 (quantize): a QAT checkpoint rebuilds its fake-quantized model (edgekd quantize)
        from .quantize import restore

        return restore(ckpt, model), ckpt
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise EdgeKDError(f"checkpoint {path!r} does not match model {ckpt['model']!r}: {str(e).splitlines()[0]}") from None
    return model.eval(), ckpt
