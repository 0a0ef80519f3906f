"""The parity check: a bundle's outputs against the PyTorch model's, on real held-out images."""

import numpy as np

from .. import EdgeKDError


def compare(reference_logits, bundle_logits, labels):
    """Shapes must match (fatal otherwise); then differences, top-1 agreement and both accuracies."""
    ref, out = np.asarray(reference_logits), np.asarray(bundle_logits)
    if ref.shape != out.shape:
        raise EdgeKDError(f"parity check failed: bundle output shape {list(out.shape)} != PyTorch {list(ref.shape)}")
    diff = np.abs(ref.astype(np.float64) - out.astype(np.float64))
    labels = np.asarray(labels)
    ref_pred, out_pred = ref.argmax(1), out.argmax(1)
    return {
        "images": int(len(labels)),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float((ref_pred == out_pred).mean()),
        "top1": float((out_pred == labels).mean()),
        "reference_top1": float((ref_pred == labels).mean()),
    }


def run_batched(fn, images, batch_size=256):
    return np.concatenate([np.asarray(fn(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])
