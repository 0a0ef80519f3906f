"""A decode-once image store (FFCV's idea, for edgekd's streamed views): every training picture decoded once,
shrunk so its longer side is at most ``max_size``, and written as raw uint8 pixels into one memory-mapped file
with an index. Later epochs and later runs cut their random-resized crops from it with no JPEG decode.

Longer side, as FFCV's ``max_resolution``: it bounds the bytes of every picture (at most max_size^2 x C) whatever
its aspect ratio, so the store's size is known before it is written. The default size is twice the larger of the
student's and the teacher's input side: a random-resized crop of a quarter of the picture's area then still has
at least the teacher's input in stored pixels on a square picture (smaller crops, and the shorter side of a wide
picture, are upsampled a little, as they would be from a small original).

The crop geometry is unchanged: each box is drawn on the *original* picture's width and height (kept in the
index) with the same generator as from the files, then scaled to the stored pixels, so the student's and the
teacher's views are the same boxes as without a store, resampled from a smaller copy.

On disk, in a folder of its own under the given one (never inside the data folder):
``pixels.u8`` (every picture's H x W x C bytes, back to back), ``index.npy`` (offset, height, width, original
width, original height, label per picture), ``sources.json`` (each picture's file, size and mtime: the key)
and ``meta.json`` (the key, the stored size and the sha256 of the other files), written last. The folder's name
is a digest of the key: other files, another stored size or colour is another folder (built anew), never stale
pixels; a store whose files do not match their checksums is refused.
"""

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import EdgeKDError
from ..base.files import atomic_write, temp_prefix
from ..base.jsonrec import field_names, record_dict, record_from
from ..base.progress import bar
from .augment import stratified_subset
from .data import load_data, load_unlabeled, split_paths
from .losses import UNLABELED
from .stream import _Items, _targets, _worker_context

log = logging.getLogger(__name__)

FORMAT = 1


class IndexRow(NamedTuple):
    """One picture's row of index.npy: where its pixels start, their size, the original's size, its label."""

    offset: int
    height: int
    width: int
    orig_width: int      # 0: the file could not be read
    orig_height: int
    label: int


INDEX = list(zip(IndexRow._fields, (np.int64, np.int32, np.int32, np.int32, np.int32, np.int64)))


@dataclass(frozen=True)
class StoreMeta:
    """A store's meta.json: the key, the stored size and colour, what it holds and the sha256 of its files."""

    format: int
    key: str
    max_size: int
    color: str
    images: int
    bytes: int
    build_seconds: Optional[float]
    sha256: Dict[str, str]

    @classmethod
    def from_json(cls, d: Any) -> Optional["StoreMeta"]:
        """The description in a parsed meta.json, or None when it is not one."""
        if not isinstance(d, dict) or not field_names(cls) <= d.keys():
            return None
        return record_from(cls, d)

    def to_json(self) -> Dict[str, Any]:
        return record_dict(self)


def default_max_size(student_size: Sequence[int], teacher_size: Optional[Sequence[int]] = None) -> int:
    """Twice the largest input side of the student and the teacher (see the module's docstring)."""
    sides = list(student_size) + list(teacher_size or ())
    return 2 * max(int(s) for s in sides)


def _sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


class _Shrunk(torch.utils.data.Dataset):
    """Item i decoded and shrunk: (HWC uint8 array, original width, original height, ok)."""

    def __init__(self, items: Any, color: str, max_size: int) -> None:
        self.items, self.color, self.max_size = items, color, int(max_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tuple[Any, int, int, bool]:
        from PIL import Image

        try:
            img, lazy = self.items.open(i)
            try:
                width, height = img.size
                scale = min(1.0, self.max_size / max(width, height))
                new = (max(1, round(width * scale)), max(1, round(height * scale)))
                if lazy:
                    img.draft(self.color, new)  # JPEG: decode at 1/2, 1/4, 1/8 when that still covers the target
                img = img.convert(self.color)
                if img.size != new:
                    img = img.resize(new, Image.Resampling.BILINEAR)
                a = np.asarray(img, dtype=np.uint8)
            finally:
                if lazy:
                    img.close()
            return (a[..., None] if a.ndim == 2 else a).copy(), width, height, True
        except (OSError, SyntaxError, ValueError):  # unreadable: recorded, and left to the views to name or skip
            return np.zeros((1, 1, 1 if self.color == "L" else 3), np.uint8), 0, 0, False


class ImageStore:
    """An open store: picture ``i`` as a PIL image of its stored pixels, and its original size."""

    def __init__(self, path: str, meta: StoreMeta) -> None:
        self.path, self.meta = path, meta
        self.index = np.load(os.path.join(path, "index.npy"))
        self._pixels: Optional[np.memmap] = None

    @property
    def pixels(self) -> np.memmap:
        """The pixel file, memory-mapped on first use in each process (a worker maps it again, never a copy)."""
        if self._pixels is None:
            file = os.path.join(self.path, "pixels.u8")
            self._pixels = np.memmap(file, dtype=np.uint8, mode="r", shape=(max(os.path.getsize(file), 1),))
        return self._pixels

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_pixels": None}

    def __len__(self) -> int:
        return len(self.index)

    def row(self, i: int) -> IndexRow:
        """Picture ``i``'s row of the index."""
        return IndexRow(*(int(v) for v in self.index[int(i)].tolist()))

    def array(self, i: int) -> np.ndarray:
        row = self.row(i)
        c = 1 if self.meta.color == "L" else 3
        return np.asarray(self.pixels[row.offset:row.offset + row.height * row.width * c]).reshape(
            row.height, row.width, c)

    def image(self, i: int) -> Optional[Tuple[Any, Tuple[int, int]]]:
        """(PIL image of the stored pixels, (original width, original height)), or None for an unreadable file."""
        from PIL import Image

        row = self.row(i)
        if row.orig_width == 0:
            return None
        a = self.array(i)
        return Image.fromarray(a[..., 0] if a.shape[2] == 1 else a), (row.orig_width, row.orig_height)

    def describe(self) -> Dict[str, Any]:
        """The store's record for metrics.json."""
        return {"path": self.path, "max_size": self.meta.max_size, "images": len(self),
                "bytes": int(self.pixels.shape[0]), "build_seconds": self.meta.build_seconds, "key": self.meta.key}


def store_key(items: Any, color: str, max_size: int) -> Tuple[str, List[str]]:
    """What a store's pixels depend on: every picture's file (path, size, mtime) or member, its label, the colour
    and the stored size. Returns (digest, the per-picture source lines)."""
    sources = [items.fingerprint(i).replace("\0", " ") for i in range(len(items))]
    h = hashlib.sha256()
    for line in sources:
        h.update(line.encode() + b"\n")
    h.update(items.targets.numpy().tobytes())
    h.update(json.dumps([FORMAT, color, int(max_size)]).encode())
    return h.hexdigest(), sources


def _check_outside(folder: str, data_roots: Sequence[str]) -> None:
    here = os.path.realpath(folder)
    for root in data_roots:
        root = os.path.realpath(root)
        if here == root or here.startswith(root + os.sep):
            raise EdgeKDError(f"--image-store {folder!r} is inside the data folder {root!r}: choose a folder outside "
                              "it (edgekd never writes into the data)")


def open_store(folder: str, items: Any, color: str, max_size: int, data_roots: Sequence[str] = (), workers: int = 0,
               progress: bool = True, build: bool = True) -> ImageStore:
    """The store of ``items`` at ``max_size`` under ``folder``: opened and checked when it exists, else built
    (``build``) or refused. A store whose files do not match their checksums is refused in one line."""
    _check_outside(folder, data_roots)
    digest, sources = store_key(items, color, max_size)
    path = os.path.join(folder, f"store-{digest[:16]}")
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        if not build:
            raise EdgeKDError(f"no image store for these files at --max-size {max_size} in {folder!r}")
        _build(path, items, color, max_size, digest, sources, workers, progress)
    with open(meta_path) as f:
        meta = StoreMeta.from_json(json.load(f))
    if meta is None or meta.key != digest or meta.max_size != int(max_size) or meta.format != FORMAT:
        raise EdgeKDError(f"image store {path} was written for other files or another size; delete that folder "
                          "(edgekd wrote it) and run again")
    for name, want in meta.sha256.items():
        if _sha256(os.path.join(path, name)) != want:
            raise EdgeKDError(f"image store {path} is damaged ({name} does not match its checksum); delete that "
                              "folder (edgekd wrote it) and run again")
    store = ImageStore(path, meta)
    if len(store) != len(items):
        raise EdgeKDError(f"image store {path} holds {len(store)} pictures, the data {len(items)}; delete it")
    log.info("image store %s: %d pictures, longer side <= %d, %.0f MB", path, len(store), max_size,
             store.pixels.shape[0] / 1e6)
    return store


def _build(path: str, items: Any, color: str, max_size: int, digest: str, sources: List[str], workers: int,
           progress: bool) -> None:
    """Decode every picture once (in ``workers`` processes), appending its pixels as they come: memory holds a
    few batches, not the store. Written into a temporary folder renamed when whole."""
    start = time.perf_counter()
    tmp = os.path.join(os.path.dirname(path), "." + temp_prefix("store") + os.path.basename(path))
    os.makedirs(tmp, exist_ok=True)
    try:
        loader = torch.utils.data.DataLoader(
            _Shrunk(items, color, max_size), batch_size=32, num_workers=workers, collate_fn=list,
            multiprocessing_context=_worker_context() if workers else None)
        index, offset, h = np.zeros(len(items), dtype=INDEX), 0, hashlib.sha256()
        with open(os.path.join(tmp, "pixels.u8"), "wb") as f:
            k = 0
            for batch in bar(loader, desc="image store", unit="batch", disable=not progress):
                for a, ow, oh, ok in batch:
                    data = a.tobytes() if ok else b""
                    index[k] = (offset, a.shape[0] if ok else 0, a.shape[1] if ok else 0, ow, oh, items.targets[k])
                    f.write(data)
                    h.update(data)
                    offset, k = offset + len(data), k + 1
        np.save(os.path.join(tmp, "index.npy"), index)
        with open(os.path.join(tmp, "sources.json"), "w") as f:
            json.dump(sources, f)
        seconds = time.perf_counter() - start
        sums = {"pixels.u8": h.hexdigest(), "index.npy": _sha256(os.path.join(tmp, "index.npy")),
                "sources.json": _sha256(os.path.join(tmp, "sources.json"))}
        meta = StoreMeta(FORMAT, digest, int(max_size), color, len(items), offset, seconds, sums)
        atomic_write(os.path.join(tmp, "meta.json"), lambda t: Path(t).write_text(json.dumps(meta.to_json(), indent=2)))
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("image store: %d pictures in %.1f s (%.0f MB) -> %s", len(items), seconds, offset / 1e6, path)


def attach_store(views: Any, folder: Optional[str], max_size: Optional[int] = None, data_roots: Sequence[str] = (),
                 progress: bool = True) -> Optional[Dict[str, Any]]:
    """Serve streamed ``views`` from a store under ``folder`` (built on first use). Returns its record or None
    for views held in memory (decoded once already)."""
    if not folder:
        return None
    if not hasattr(views, "items"):
        log.info("--image-store: the training images are held in memory (decoded once already); no store needed")
        return None
    size = max_size or default_max_size((views.input.height, views.input.width), views.teacher_size)
    views.items.store = open_store(folder, views.items, views.input.color, size, data_roots,
                                   views.workers, progress)
    return views.items.store.describe()


def data_roots(spec: Optional[str], unlabeled: Optional[str] = None) -> List[str]:
    """The folders a store must stay out of: the data's (a folder spec) and the --unlabeled folder."""
    roots = [unlabeled] if unlabeled else []
    path = spec.split(":", 1)[1] if spec and spec.split(":", 1)[0] in ("imagefolder", "webdataset") else spec
    if path and os.path.isdir(path):
        roots.append(path)
    return roots


def attach_store_for(views: Any, cfg: Any, ctx: Any) -> Optional[Dict[str, Any]]:
    """``attach_store`` with a run's options (--image-store, --image-store-size, the data and --unlabeled);
    under torchrun rank 0 builds the store and the others open it after."""
    def attach(progress: bool) -> Optional[Dict[str, Any]]:
        return attach_store(views, cfg.image_store, cfg.image_store_size, data_roots(cfg.data, cfg.unlabeled),
                            progress)

    record = attach(cfg.progress) if ctx.is_main else None
    if cfg.image_store and ctx.enabled:
        ctx.barrier()
        if not ctx.is_main:
            record = attach(False)
    return record


def run_prepare(data_spec: str, out: str, max_size: Optional[int], data_root: Optional[str] = None,
                unlabeled: Optional[str] = None, train_subset: Optional[int] = None, workers: int = 0,
                progress: bool = True) -> Dict[str, Any]:
    """Build (or check) ahead of training the store of a data set's training pictures, the same items in the same
    order as a run with the same --unlabeled and --train-subset streams them (and with --image-store-size
    ``max_size``; None: twice the data's own input side, the default student's). Returns its record.
    ``edgekd prepare`` calls it."""
    opts = SimpleNamespace(data=data_spec, out=out, max_size=max_size, data_root=data_root, unlabeled=unlabeled,
                           train_subset=train_subset, workers=workers, progress=progress)
    _check_outside(opts.out, data_roots(opts.data, opts.unlabeled))
    data = load_data(opts.data, opts.data_root)
    subset = stratified_subset(_targets(data.train), opts.train_subset, seed=0) if opts.train_subset else None
    parts: List[Tuple[Any, Any, Optional[int]]] = [(data.train, subset, None)]
    if opts.unlabeled:  # as distill's --unlabeled: without the labelled pictures and the test split's
        folder = load_unlabeled(opts.unlabeled, split_paths(data.train, subset), split_paths(data.test))
        parts.append((folder, None, UNLABELED))
    items = _Items(parts)
    max_size = opts.max_size or default_max_size((data.input.height, data.input.width))
    store = open_store(opts.out, items, data.input.color, max_size, (), opts.workers,
                       opts.progress)
    return store.describe()
