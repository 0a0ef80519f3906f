"""``edgekd export``: checkpoint -> bundle folder, validated against PyTorch before it is published."""

import logging
import os
import shutil
import tempfile
import time

from .. import EdgeKDError

from .formats import FORMATS, check_request
from .manifest import library_versions, sha256_file, write_manifest
from .runtime import open_session
from .validate import compare, run_batched

log = logging.getLogger(__name__)


def export_checkpoint(checkpoint, fmt, precision="fp32", out=None, data=None, data_root=None, val_size=1000,
                      atol=None, opset=None):
    """Export, validate on ``val_size`` test images, write the manifest; publish ``out`` only if all passed."""
    import torch

    from ..checkpoint import load_model
    from ..data import InputSpec, load_data, take_images

    meta = check_request(fmt, precision)
    atol = atol if atol is not None else meta["atol"][precision]
    model, ckpt = load_model(checkpoint)
    input_spec = InputSpec.from_dict(ckpt["input"])
    dataset = load_data(data or ckpt.get("data") or "digits", data_root, input_spec=input_spec)
    if len(dataset.classes) != len(ckpt["classes"]):
        raise EdgeKDError(f"checkpoint has {len(ckpt['classes'])} classes but data {dataset.spec!r} has {len(dataset.classes)}")
    images, labels = take_images(dataset.test, val_size)

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.tmp-")
    try:
        start = time.perf_counter()
        model_file = FORMATS.get(fmt)(model, input_spec, staging, opset=opset)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            reference = run_batched(lambda b: model(torch.from_numpy(b)).numpy(), images.numpy())
        session = open_session(fmt, os.path.join(staging, model_file))
        validation = compare(reference, run_batched(session, images.numpy()), labels.numpy())
        validation.update(atol=atol, data=dataset.spec, split="test")
        if validation["max_abs_diff"] > atol:
            raise EdgeKDError(f"parity check failed: max |logit difference| {validation['max_abs_diff']:.3g} "
                              f"exceeds --atol {atol:g} on {validation['images']} test images; no bundle written")
        files = {name: sha256_file(os.path.join(staging, name)) for name in sorted(os.listdir(staging))}
        manifest = {
            "format": fmt, "precision": precision, "model_file": model_file, "files": files,
            "input": {"shape": [-1, input_spec.channels, input_spec.height, input_spec.width], "layout": "NCHW",
                      "dtype": "float32", "mean": input_spec.mean, "std": input_spec.std, "color": input_spec.color,
                      "resize": [input_spec.height, input_spec.width], "scale": 1 / 255,
                      "resample": "bilinear"},
            "classes": list(ckpt["classes"]),
            "model": ckpt["model"], "params": ckpt.get("params"), "flops": ckpt.get("flops"), "data": dataset.spec,
            "source": {"checkpoint": os.path.abspath(checkpoint), "sha256": sha256_file(checkpoint)},
            "validation": validation, "export_seconds": round(seconds, 3), "versions": library_versions(),
        }
        write_manifest(staging, manifest)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a bundle is meant to be shared
        _publish(staging, out)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    log.info("exported %s %s in %.1f s, %.2f MB", fmt, precision, seconds, size / 1e6)
    return manifest


def _publish(staging, out):
    """Swap the finished bundle into place; an older bundle at ``out`` is removed only afterwards."""
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out)), prefix=f".{os.path.basename(out)}.old-")
        os.rmdir(old)
        os.replace(out, old)
    os.replace(staging, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)
