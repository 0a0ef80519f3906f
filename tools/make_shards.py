#!/usr/bin/env python3
"""Write an image folder as WebDataset shards for ``edgekd ... --data webdataset:OUT``.

    python tools/make_shards.py FOLDER OUT [--shard-size N] [--seed S]

FOLDER is an image folder as edgekd reads it (train/ and test/ or val/, one sub-folder per class). OUT gets
train/shard-000000.tar, ... (and the same for the test split) and classes.txt. Samples are shuffled with
--seed before they are cut into shards of --shard-size samples, so every shard holds every class; image files
are copied byte for byte (JPEG, PNG, WebP; other formats become PNG). Under torchrun each process reads whole
shards: write at least as many training shards as processes (a multiple of their number keeps every process
on the same number of images). Exit 2 with one line on bad input.
"""

import argparse
import io
import os
import random
import shutil
import sys
import tarfile
from typing import Dict, List, Optional, Sequence, Tuple

from edgekd import EdgeKDError
from edgekd.base.files import atomic_write, open_regular, require_regular
from edgekd.core.shards import IMAGE_EXTS as SHARD_IMAGE_EXTS
from edgekd.core.shards import quoted as _quote


def write_shards(folder: str, out: str, shard_size: int = 1000, seed: int = 0) -> Dict[str, int]:
    """Write ``folder`` (an image folder: train/ and test/ or val/, one sub-folder per class) as WebDataset
    shards under ``out``: ``out/train/shard-000000.tar``, ..., the same for the test split, and
    ``out/classes.txt``. Samples are shuffled with ``seed`` before they are cut into shards of ``shard_size``
    (so a shard holds every class); image bytes are copied as they are (JPEG, PNG, WebP), other formats are
    written as PNG. Returns {split: number of shards}."""
    from edgekd.core.data import check_link_loops, check_reach

    if int(shard_size) < 1:
        raise EdgeKDError(f"--shard-size {shard_size}: give a number of samples per shard, at least 1")
    src, dst = os.path.realpath(folder), os.path.realpath(out)
    if not os.path.isdir(src):
        raise EdgeKDError(f"{_quote(folder)} is not a folder (expected train/ and test/ or val/, one folder per class)")
    if dst == src or dst.startswith(src + os.sep) or src.startswith(dst + os.sep):
        raise EdgeKDError(f"the shards {_quote(out)} must be written outside the image folder {_quote(folder)}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise EdgeKDError(f"{_quote(out)} already exists and is not an empty folder: shards never overwrite files")
    splits = [s for s in ("train", "test", "val") if os.path.isdir(os.path.join(src, s))]
    if "train" not in splits or len(splits) < 2:
        raise EdgeKDError(f"{_quote(folder)} needs train/ and test/ (or val/) sub-folders, one folder per class")
    check_reach(src, "image folder")
    listed = {}
    for split in splits:  # every file is listed and checked (regular files only) before anything is written
        check_link_loops(os.path.join(src, split))
        listed[split] = _folder_samples(os.path.join(src, split))
        if listed[split][0] != listed[splits[0]][0]:
            raise EdgeKDError(f"class folders differ between the splits of {_quote(folder)}")
    created = not os.path.exists(out)
    written = []
    try:
        counts = {split: _write_split(out, split, samples, shard_size, seed, written)
                  for split, (_, samples) in listed.items()}
        atomic_write(os.path.join(out, "classes.txt"), lambda tmp: _write_classes(tmp, listed[splits[0]][0]))
    except BaseException:  # a failed run leaves nothing behind: out as it was (absent, or the empty folder)
        for path in reversed(written):
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return counts


def _write_classes(tmp: str, classes: List[str]) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(f"{c}\n" for c in classes)


def _write_split(out: str, split: str, samples: List[Tuple[str, int]], shard_size: int, seed: int,
                 written: List[str]) -> int:
    """One split's shards (``written`` lists each path made, for the undo); returns how many."""
    random.Random(int(seed)).shuffle(samples)
    folder = os.path.join(out, split)
    if not os.path.isdir(folder):
        os.makedirs(folder)
        written.append(folder)
    starts = range(0, len(samples), int(shard_size))
    for n, start in enumerate(starts):
        path = os.path.join(folder, f"shard-{n:06d}.tar")
        _write_shard(path, samples[start:start + int(shard_size)], start)
        written.append(path)
    return len(starts)


def _folder_samples(split: str) -> Tuple[List[str], List[Tuple[str, int]]]:
    """(classes, [(path, class index)]) of one split as torchvision's ImageFolder lists them (class folders
    sorted, files sorted, links followed), without importing torchvision (most of a gigabyte of memory)."""
    from edgekd.core.data import IMAGE_EXTENSIONS

    classes = sorted(e.name for e in os.scandir(split) if e.is_dir())
    if not classes:
        raise EdgeKDError(f"{_quote(split)} holds no class folders")
    samples = []
    for index, name in enumerate(classes):
        mine = [os.path.join(root, f) for root, _, files in sorted(os.walk(os.path.join(split, name), followlinks=True))
                for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not mine:
            raise EdgeKDError(f"class folder {_quote(os.path.join(split, name))} holds no images")
        for path in mine:  # a FIFO named like an image would hang the copy: stat, never open
            require_regular(path, "image")
        samples += [(path, index) for path in mine]
    return classes, samples


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: str, samples: Sequence[Tuple[str, int]], first: int) -> None:
    """One shard, written under a temporary name and renamed: a shard is whole or absent. Its temporary name
    ends in .partial, not .tar (atomic_write's would), so a killed run's leftover is never read as a shard."""
    tmp = path + ".partial"
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for k, (image, label) in enumerate(samples):
                key = f"{first + k:08d}"
                ext, data = _image_bytes(image)
                _member(tar, f"{key}.{ext}", data)
                _member(tar, f"{key}.cls", str(int(label)).encode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _image_bytes(path: str) -> Tuple[str, bytes]:
    """(extension, bytes) of an image file for a shard: JPEG, PNG and WebP as they are, others as PNG."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext in SHARD_IMAGE_EXTS:
        with open_regular(path, "image") as f:
            return ext, f.read()
    from edgekd.bundle.preprocessing import to_8bit
    from edgekd.core.data import open_image

    buf = io.BytesIO()
    with open_image(path) as img:
        img = to_8bit(img)  # grey stays grey
        if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
            img = img.convert("RGB")
        img.save(buf, format="PNG")
    return "png", buf.getvalue()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="image folder: train/ and test/ (or val/), one sub-folder per class")
    parser.add_argument("out", help="where to write the shards (a new or empty folder)")
    parser.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="the shuffle of samples before sharding (default 0)")
    args = parser.parse_args(argv)

    try:
        counts = write_shards(args.folder, args.out, args.shard_size, args.seed)
    except (EdgeKDError, OSError) as e:  # bad input, or a disk that refuses the output
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    print(", ".join(f"{split}: {n} shards" for split, n in counts.items()) + f" -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
