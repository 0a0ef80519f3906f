"""The parity gate: a bundle's outputs against the PyTorch model's, on real held-out images."""

import math
from typing import Callable, List, Optional

import numpy as np

from .. import EdgeKDError
from .records import Validation


def _rows_not_finite(logits: np.ndarray) -> int:
    """How many images (rows) of a logits array hold NaN or infinity."""
    return int((~np.isfinite(logits.reshape(len(logits), -1))).any(axis=1).sum()) if len(logits) else 0


def check_reference(reference_logits: np.ndarray) -> None:
    """A PyTorch model whose output holds NaN or infinity is broken; no tolerance can judge a bundle against it."""
    ref = np.asarray(reference_logits)
    bad = _rows_not_finite(ref)
    if bad:
        raise EdgeKDError(f"the model's output holds NaN or infinity on {bad} of {len(ref)} validation images: "
                          "the checkpoint is broken (its weights hold NaN or overflow); no bundle written")


def compare(reference_logits: np.ndarray, bundle_logits: np.ndarray, labels: np.ndarray) -> Validation:
    """Shapes must match (fatal otherwise); then differences, top-1 agreement, both accuracies and the drop.

    A reference with NaN is a broken checkpoint (fatal); a bundle with NaN where PyTorch has none is
    counted in ``not_finite`` and fails the gate (NaN compares false to every threshold, so it must be
    caught before any comparison).
    """
    ref, out = np.asarray(reference_logits), np.asarray(bundle_logits)
    check_reference(ref)
    if ref.shape != out.shape:
        raise EdgeKDError(f"parity check failed: bundle output shape {list(out.shape)} != PyTorch {list(ref.shape)}; "
                          "no bundle written")
    diff = np.abs(ref.astype(np.float64) - out.astype(np.float64))
    labels = np.asarray(labels)
    ref_pred, out_pred = ref.argmax(1), out.argmax(1)
    top1, reference_top1 = float((out_pred == labels).mean()), float((ref_pred == labels).mean())
    return Validation(
        images=int(len(labels)), not_finite=_rows_not_finite(out), output_shape=[-1, *out.shape[1:]],
        max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
        top1_agreement=float((ref_pred == out_pred).mean()), top1=top1, reference_top1=reference_top1,
        drop=round((reference_top1 - top1) * 100, 4))  # top-1 points lost against PyTorch FP32


def gate(validation: Validation, precision: str, atol: Optional[float] = None,
         max_drop: Optional[float] = None) -> List[str]:
    """The checks that fail an export, each naming what failed and by how much; empty when all pass.

    FP32 and FP16 are held to a logit tolerance; INT8 (whose logits legitimately move) to a top-1 drop.
    """
    v, n = validation, validation.images
    flag, limit = ("--atol", atol) if precision in ("fp32", "fp16") else ("--max-drop", max_drop)
    if not (isinstance(limit, (int, float)) and math.isfinite(limit) and limit >= 0):
        raise EdgeKDError(f"{flag} must be a finite number of 0 or more, got {limit!r}")
    failures = []
    if v.not_finite:
        failures.append(f"the bundle's output holds NaN or infinity on {v.not_finite} of {n} test images "
                        "where PyTorch's does not")
    # Written as "not (value <= limit)" so that a NaN difference or drop fails instead of passing.
    if precision in ("fp32", "fp16") and not v.max_abs_diff <= limit:
        failures.append(f"max |logit difference| {v.max_abs_diff:.3g} exceeds --atol {limit:g} on {n} test images")
    if precision == "int8" and not v.drop <= limit:
        failures.append(f"INT8 top-1 {v.top1:.4f} is {v.drop:.2f} points below FP32 {v.reference_top1:.4f} on {n} "
                        f"test images, over --max-drop {limit:g}")
    return failures


def run_batched(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([np.asarray(fn(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])
