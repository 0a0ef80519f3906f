"""Image sets for quantization and validation that can be accounted for.

A calibration set is counted in images, class-stratified, drawn with a seed, and recorded by split,
count, per-class counts and a sha256 of its file list, so anyone can tell which images shaped the
INT8 scales (and that they did not come from the test split).
"""

import hashlib
import logging
import os

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import EdgeKDError
from ..base.progress import bar
from .records import Sample

log = logging.getLogger(__name__)


def targets_of(dataset: Any) -> np.ndarray:
    """Integer labels of every item without decoding any image (ImageFolder, CIFAR, digits all keep them)."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    return np.asarray(targets, dtype=np.int64)


def count(dataset: Any) -> int:
    """How many items a dataset holds (datasets of every kind have a length)."""
    return len(dataset)


def item_ids(dataset: Any, indices: Sequence[int]) -> List[str]:
    """Stable names for items: file paths relative to the data root for folders, else ``#index``."""
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        root = getattr(dataset, "root", "")
        return [os.path.relpath(samples[i][0], root) for i in indices]
    return [f"#{i}" for i in indices]


def stratified_indices(targets: np.ndarray, size: int, seed: int) -> List[int]:
    """``size`` indices drawn per class in proportion to the class counts (largest remainder), seeded."""
    classes, counts = np.unique(targets, return_counts=True)
    exact = size * counts / counts.sum()
    quota = np.floor(exact).astype(int)
    # Hand the leftover images to the classes with the largest fractional parts (ties: lower class index).
    order = np.lexsort((classes, -(exact - quota)))
    quota[order[: size - quota.sum()]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(targets == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked)).tolist()


def draw(dataset: Any, size: int, seed: int, *, data_spec: str, split: str, class_names: Sequence[str],
         purpose: str = "calibration") -> Tuple[List[int], Sample]:
    """Choose ``size`` images of ``dataset``; refuse an empty or too-small split. Returns (indices, Sample)."""
    targets = targets_of(dataset)
    available = len(targets)
    where = f"the {split} split of {data_spec!r}"
    if available == 0:
        raise EdgeKDError(f"{purpose} set is empty: {where} holds no images")
    if size > available:
        raise EdgeKDError(f"{purpose} set too small: {where} holds {available} images but {size} were asked for; "
                          f"lower the size or point --calib-data at more images")
    n_classes = len(np.unique(targets))
    if size < n_classes:
        raise EdgeKDError(f"{purpose} size {size} is too small: a class-stratified set needs at least one image "
                          f"per class ({n_classes} classes in {where})")
    indices = stratified_indices(targets, size, seed)
    ids = item_ids(dataset, indices)
    per_class: Dict[str, int] = {}
    for i in indices:
        name = class_names[targets[i]] if targets[i] < len(class_names) else str(targets[i])
        per_class[name] = per_class.get(name, 0) + 1
    return indices, Sample(data=data_spec, split=split, images=len(indices), available=available, seed=seed,
                           per_class=per_class, files_sha256=hashlib.sha256("\n".join(ids).encode()).hexdigest(),
                           files=ids)


def select(dataset: Any, size: int, seed: int, *, data_spec: str, split: str, class_names: Sequence[str],
           purpose: str = "calibration") -> Tuple[List[int], Dict[str, Any]]:
    """``draw``, with the sample as the manifest records it."""
    indices, sample = draw(dataset, size, seed, data_spec=data_spec, split=split, class_names=class_names,
                           purpose=purpose)
    return indices, sample.to_dict()


def strided_indices(n_items: int, limit: Optional[int]) -> List[int]:
    """The validation images: ``limit`` items spread evenly over the split (ImageFolder is class-sorted)."""
    n = n_items if limit is None else min(limit, n_items)
    step = max(1, n_items // n) if n else 1
    return list(range(0, step * n, step))[:n]


def load_images(dataset: Any, indices: Sequence[int], desc: str, progress: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Decode and preprocess the chosen items (the training transform) into float32 NCHW and int64 labels."""
    images, labels = [], []
    for i in bar(indices, desc=desc, unit="img", disable=not progress):
        x, y = dataset[i]
        images.append(np.asarray(x, dtype=np.float32))
        labels.append(int(y))
    if not images:
        raise EdgeKDError(f"{desc}: no images")
    return np.stack(images), np.asarray(labels, dtype=np.int64)
