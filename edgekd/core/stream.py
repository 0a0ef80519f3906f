"""Training views decoded per batch from the image files (``--pipeline stream``), for data that does not fit
in memory or that is larger than the student's input.

Each batch is decoded in DataLoader worker processes; memory holds a few batches in flight and the list of
files, not the images. The augmentation of image ``i`` in epoch ``e`` is drawn from a generator seeded by
(augmentation seed, view, i) alone, so any process that asks for that view gets the same pixels and a
teacher cache stays exact. The random-resized crop (torchvision's ``RandomResizedCrop`` with a horizontal
flip) picks its box on the *original* picture: the student's view is that box resized to the student's
input, the teacher's view the same box resized to the teacher's own input (consistent teaching, each at its
own resolution), never the student's pixels upsampled. JPEGs are decoded at a reduced scale (libjpeg's DCT
scaling through Pillow's ``draft``) when the box still covers the larger output at that scale.
"""

import hashlib
import json
import logging
import math
import os
import random
from dataclasses import replace
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import torch

from .. import EdgeKDError
from ..bundle.manifest import ModelInput
from ..bundle.preprocessing import preprocess_pixels
from .augment import BAD_IMAGE, AugmentPlan, _pil_item, apply_views, bad_reason, distributed_order
from .data import InputSpec, open_image
from .mixing import mix_loaded, with_partners
from .shards import check_shard_count, deal_shards

log = logging.getLogger(__name__)

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision's RandomResizedCrop aspect range


def rrc_box(rng: random.Random, width: int, height: int, scale: Tuple[float, float],
            ratio: Tuple[float, float] = RATIO) -> Tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` with a ``random.Random``: (left, top, w, h)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height  # fall back to a center crop of the allowed aspect
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def view_rng(seed: int, view: int, index: int) -> random.Random:
    """The generator of image ``index``'s view ``view``: the same in every process (a str seed hashes stably)."""
    return random.Random(f"edgekd-view/{int(seed)}/{int(view)}/{int(index)}")


class _Items:
    """(dataset, index, label) triples kept as small parallel lists: the images themselves stay in the files."""

    store: Any = None  # an edgekd.core.image_store.ImageStore: pictures decoded once (--image-store)

    def __init__(self, parts: List[Tuple[Any, Any, Optional[int]]]) -> None:
        self._groups: Optional[List[List[int]]] = None  # shard groups, found once (shard_groups)
        self.sources: List[Any] = []
        src: List[int] = []
        local: List[int] = []
        labels: List[int] = []
        for dataset, indices, label in parts:
            k = len(self.sources)
            self.sources.append(dataset)
            idx = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
            targets = _targets(dataset)
            src += [k] * len(idx)
            local += idx
            labels += [targets[i] if label is None else label for i in idx]
        self.src, self.local = torch.tensor(src, dtype=torch.int16), torch.tensor(local, dtype=torch.int64)
        self.targets = torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.targets)

    def path(self, i: int) -> Optional[str]:
        dataset = self.sources[int(self.src[i])]
        samples = getattr(dataset, "samples", None)
        return samples[int(self.local[i])][0] if samples is not None else None

    def name(self, i: int) -> str:
        """What an error calls item i: its file, its shard member (shard.tar:KEY.ext), or its number."""
        dataset = self.sources[int(self.src[i])]
        if hasattr(dataset, "item_name"):
            return dataset.item_name(int(self.local[i]))
        return self.path(i) or f"item {int(i)}"

    def reason(self, i: int) -> str:
        return bad_reason(self.sources[int(self.src[i])], int(self.local[i]))

    def fingerprint(self, i: int) -> str:
        """What item i's pixels depend on: its file (path, size, mtime), its shard member, or its place."""
        dataset = self.sources[int(self.src[i])]
        if hasattr(dataset, "item_fingerprint"):
            return dataset.item_fingerprint(int(self.local[i]))
        path = self.path(i)
        if path is not None:
            st = os.stat(path)
            return f"{path}\0{st.st_size}\0{st.st_mtime_ns}"
        return f"{int(self.src[i])}:{int(self.local[i])}"

    def shard_groups(self) -> Optional[List[List[int]]]:
        """Each shard's item indices (in member order) when every item comes from WebDataset shards, else None."""
        if self._groups is None:
            import numpy as np

            if not self.sources or not all(hasattr(s, "shard_of") for s in self.sources):
                self._groups = []
            else:
                src, local = self.src.numpy().astype(np.int64), self.local.numpy()
                shard = np.zeros(len(local), dtype=np.int64)
                for k, source in enumerate(self.sources):
                    mine = src == k
                    shard[mine] = source.shard_of[local[mine]]
                key = (src << 32) + shard
                order = np.argsort(key, kind="stable")
                cuts = np.flatnonzero(np.diff(key[order])) + 1
                self._groups = [g.tolist() for g in np.split(order, cuts)] if len(order) else []
        return self._groups or None

    def open(self, i: int) -> Tuple[Any, bool]:
        """A PIL image, lazily decoded when it comes from a file (its header read, its pixels not yet)."""

        if self.store is not None:  # the stored pixels; the crop's box is drawn on the original size
            stored = self.store.image(i)
            if stored is None:
                raise OSError(f"item {int(i)} was unreadable when the image store was built")
            return stored[0], False
        dataset = self.sources[int(self.src[i])]
        if hasattr(dataset, "open_item"):  # a shard's member, read by seek + read (edgekd.core.shards)
            return dataset.open_item(int(self.local[i]))
        path = self.path(i)
        if path is not None and path.lower().endswith((".jpg", ".jpeg")):
            return open_image(path), True
        img, _ = _pil_item(self.sources[int(self.src[i])], int(self.local[i]))
        return img, False


def _targets(dataset: Any) -> List[int]:
    if hasattr(dataset, "targets"):
        return [int(t) for t in dataset.targets]
    return [int(label) for _, label in dataset.samples]


class _Decoder(torch.utils.data.Dataset):
    """Item i of one epoch's view: (student uint8 CHW, teacher uint8 CHW or an empty tensor, label, i, ok).
    A worker process gets a copy; the epoch and the pad-crop parameters are set before the workers start."""

    def __init__(self, items: "_Items", spec: Dict[str, Any], plan: Optional[AugmentPlan],
                 teacher_size: Optional[Tuple[int, int]], scale: Tuple[float, float], draft: bool = True) -> None:
        # ``spec``: the bundle runner's preprocessing spec (InputSpec.manifest), what its preprocessing reads
        self.items, self.spec, self.plan, self.teacher_size = items, spec, plan, teacher_size
        self.input = InputSpec.from_manifest(spec)
        self.scale, self.draft = scale, draft
        self.epoch: Optional[int] = None
        self.pad_params: Any = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, int, int, bool]:
        c, h, w = self._shape()
        try:
            student, teacher = self._views(i)
            return student, teacher, int(self.items.targets[i]), i, True
        except (OSError, SyntaxError, ValueError):  # PIL's errors for truncated or non-image files
            student = torch.zeros(c, h, w, dtype=torch.uint8)
            return student, _empty(None, student), BAD_IMAGE, i, False

    def _shape(self) -> Tuple[int, int, int]:
        return self.input.channels, self.input.height, self.input.width

    def _views(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        plan = self.plan
        if self.items.store is not None and plan is not None and self.epoch is not None \
                and plan.kind == "random-resized-crop":
            return self._stored_crops(i)
        img, lazy = self.items.open(i)
        try:
            return self._decode(img, lazy, i)
        finally:
            if lazy:  # a file this call opened (never an in-memory image of the dataset itself)
                img.close()

    def _decode(self, img: Any, lazy: bool, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        plan, epoch = self.plan, self.epoch
        if plan is None or epoch is None or plan.kind != "random-resized-crop":
            student = _pixels(_eval_geometry(img, self.spec, lazy=lazy))
            teacher = None
            if self.teacher_size:
                height, width = self.teacher_size
                teacher = _pixels(_eval_geometry(img, replace(self.input, height=height, width=width).manifest(),
                                                 lazy=lazy))
            if plan is not None and epoch is not None and plan.kind == "standard":
                dy, dx, flip = (p[i:i + 1] for p in self.pad_params)
                student = apply_views(student[None], dy, dx, flip, plan.pad)[0]
                teacher = None  # pad-crop is for images of the student's size: the teacher resizes that view
            return student, _empty(teacher, student)
        width, height = img.size
        (left, top, bw, bh), flip, outs = self._crop_plan(i, width, height)
        if lazy and self.draft:  # decode at 1/2, 1/4, 1/8 while the box still covers the largest output
            need_w = max(o[1] for o in outs) * width / bw
            need_h = max(o[0] for o in outs) * height / bh
            img.draft(self.input.color, (math.ceil(need_w), math.ceil(need_h)))
        sx, sy = img.size[0] / width, img.size[1] / height
        box = (left * sx, top * sy, (left + bw) * sx, (top + bh) * sy)
        img = img.convert(self.input.color)
        views = []
        for oh, ow in outs:
            view = img.resize((ow, oh), Image.Resampling.BILINEAR, box=box)
            if flip:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            views.append(_pixels(view))
        return views[0], _empty(views[1] if len(views) > 1 else None, views[0])

    def _crop_plan(self, i: int, width: int, height: int) -> Tuple[Tuple[int, int, int, int], bool,
                                                                     List[Tuple[int, int]]]:
        """Picture ``i``'s random-resized crop in this epoch, drawn on its original (width, height): the box
        (left, top, w, h), the flip, and the (height, width) of each view to cut (the student's, the teacher's)."""
        assert self.plan is not None and self.epoch is not None
        rng = view_rng(self.plan.seed, self.plan.view_of(self.epoch), i)
        box = rrc_box(rng, width, height, self.scale)
        flip = rng.random() < 0.5
        outs = [self.input.size] + ([self.teacher_size] if self.teacher_size else [])
        return box, flip, outs

    def _stored_crops(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The random-resized crops of picture ``i`` cut from the image store's pixels with torch's uint8
        resampler (bilinear, antialiased, no PIL image made): the same box and flip as from the file, drawn on the
        original's size, its edges rounded to whole stored pixels."""
        import torch.nn.functional as F

        row = self.items.store.row(i)
        if row.orig_width == 0:
            raise OSError(f"item {int(i)} was unreadable when the image store was built")
        (left, top, bw, bh), flip, outs = self._crop_plan(i, row.orig_width, row.orig_height)
        sx, sy = row.width / row.orig_width, row.height / row.orig_height
        x0, y0 = min(int(round(left * sx)), row.width - 1), min(int(round(top * sy)), row.height - 1)
        x1, y1 = max(int(round((left + bw) * sx)), x0 + 1), max(int(round((top + bh) * sy)), y0 + 1)
        pixels = self.items.store.array(i)[y0:y1, x0:x1].copy()
        crop = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # N C H W with channels-last strides
        views = []
        for oh, ow in outs:
            view = F.interpolate(crop, size=(oh, ow), mode="bilinear", antialias=True, align_corners=False)[0]
            views.append((view.flip(-1) if flip else view).contiguous())
        return views[0], _empty(views[1] if len(views) > 1 else None, views[0])


def _empty(teacher: Optional[torch.Tensor], student: torch.Tensor) -> torch.Tensor:
    return teacher if teacher is not None else student.new_zeros((0,))


def _eval_geometry(img: Any, spec: Dict[str, Any], lazy: bool = False) -> Any:
    if lazy:
        img.load()
    return preprocess_pixels(img, ModelInput.from_json(spec))


def _pixels(img: Any) -> torch.Tensor:
    import numpy as np

    a = np.array(img, dtype=np.uint8)  # writable: torch shares it
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(a))


_Batch = Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]


def _collate(batch: List[Tuple[Any, ...]]) -> _Batch:
    student = torch.stack([b[0] for b in batch])
    shaped = next((b[1] for b in batch if b[1].numel()), None)  # an unreadable item has no teacher view
    teacher = None if shaped is None else torch.stack([b[1] if b[1].numel() else torch.zeros_like(shaped)
                                                       for b in batch])
    labels = torch.tensor([b[2] for b in batch], dtype=torch.long)
    idx = torch.tensor([b[3] for b in batch], dtype=torch.long)
    ok = torch.tensor([b[4] for b in batch], dtype=torch.bool)
    return student, teacher, labels, idx, ok


class StreamViews:
    """A split served from its files, batch by batch: the same interface as edgekd.augment.Views."""

    def __init__(self, items: _Items, spec: InputSpec, plan: Optional[AugmentPlan] = None, workers: int = 0,
                 skip_bad: bool = False, scale: float = 0.08, desc: str = "train") -> None:
        self.items, self.input, self.plan, self.workers = items, spec, plan, int(workers)
        self.targets = items.targets
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        self.skip_bad, self.scale, self.desc = skip_bad, float(scale), desc
        self.teacher_size: Optional[Tuple[int, int]] = None
        self.skipped: Set[str] = set()  # unreadable files met so far (left out with --skip-bad-images)

    @classmethod
    def of(cls, parts: List[Tuple[Any, Any, Optional[int]]], spec: InputSpec, plan: Optional[AugmentPlan] = None,
           **kw: Any) -> "StreamViews":
        """Views over ``parts``: (dataset, indices or None, label or None for the dataset's own) triples."""
        return cls(_Items(parts), spec, plan, **kw)

    def __len__(self) -> int:
        return len(self.targets)

    def set_teacher_size(self, size: Optional[Tuple[int, int]]) -> None:
        """Also decode each view at the teacher's (height, width) from the same box of the original picture."""
        size = None if size is None else (int(size[0]), int(size[1]))
        self.teacher_size = None if size == (self.input.height, self.input.width) else size

    def labelled(self) -> "StreamViews":
        keep = (self.targets >= 0).nonzero().flatten()
        if len(keep) == len(self):
            return self
        items = _Items([])
        items.sources, items.src, items.local = self.items.sources, self.items.src[keep], self.items.local[keep]
        items.targets = self.targets[keep]
        plan = None if self.plan is None else AugmentPlan(self.plan.kind, len(keep), self.plan.seed, self.plan.pad,
                                                         scale=self.plan.scale)
        return StreamViews(items, self.input, plan, self.workers, self.skip_bad, self.scale, self.desc)

    def fingerprint(self) -> str:
        """What the teacher cache is valid for: the files (path, size, mtime) or items, labels, geometry."""
        h = hashlib.sha256()
        for i in range(len(self)):
            h.update(f"{self.items.fingerprint(i)}\n".encode())
        h.update(self.targets.numpy().tobytes())
        h.update(json.dumps([self.input.manifest(), self.scale, self.teacher_size]).encode())
        if self.items.store is not None:  # pixels resampled from the stored copy are not the files' own
            h.update(json.dumps({"image_store": self.items.store.meta.key}).encode())
        return h.hexdigest()

    def _decoder(self, epoch: Optional[int], teacher_view: bool) -> _Decoder:
        decoder = _Decoder(self.items, self.input.manifest(), self.plan, self.teacher_size if teacher_view else None,
                           (self.scale, 1.0))
        decoder.epoch = epoch
        if epoch is not None and self.plan is not None and self.plan.kind == "standard":
            decoder.pad_params = self.plan.params(epoch)
        return decoder

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255.0).sub_(self.mean).div_(self.std)  # in place: one new tensor, the same bits

    def _finish(self, batch: "_Batch", teacher_view: bool) -> Tuple[Any, ...]:
        student, teacher, labels, idx, ok = batch
        if not ok.all():
            bad = [self.items.name(int(i)) for i in idx[~ok]]
            if not self.skip_bad:
                raise EdgeKDError(f"{self.items.reason(int(idx[~ok][0]))} ({self.desc}); remove it, or pass "
                                  "--skip-bad-images to leave unreadable images out")
            new = [p for p in bad if p not in self.skipped]
            if new:
                log.warning("%s: skipped unreadable images %s", self.desc, ", ".join(new[:3]))
            self.skipped.update(bad)
            student, labels, idx = student[ok], labels[ok], idx[ok]
            teacher = None if teacher is None else teacher[ok]
        x = self._normalise(student)
        if teacher_view:
            return x, None if teacher is None else self._normalise(teacher), labels, idx
        return x, labels, idx

    def batch(self, idx: Any, epoch: Optional[int] = None, teacher_view: bool = False) -> Tuple[Any, ...]:
        """Images ``idx`` as seen in ``epoch``, decoded here (no workers): (x, y), or (x, x_teacher, y)."""
        decoder = self._decoder(epoch, teacher_view)
        out = self._finish(_collate([decoder[int(i)] for i in torch.as_tensor(idx).flatten()]), teacher_view)
        return out[:-1]

    def _run(self, index_batches: List[List[int]], epoch: Optional[int],
             teacher_view: bool) -> Iterator[Tuple[Any, ...]]:
        mixing = None if self.plan is None else self.plan.mix_view(epoch)
        wanted_batches = index_batches
        if mixing is not None:  # each batch also loads its pictures' partners (edgekd.core.mixing)
            mix, view = mixing
            index_batches = [with_partners(mix, view, b).tolist() for b in index_batches]
        decoder = self._decoder(epoch, teacher_view)
        workers = self.workers if len(index_batches) > 1 else 0
        loader = torch.utils.data.DataLoader(decoder, batch_sampler=index_batches, num_workers=workers,
                                             collate_fn=_collate, prefetch_factor=4 if workers else None,
                                             persistent_workers=False,
                                             multiprocessing_context=_worker_context() if workers else None)
        if mixing is None:
            for out in loader:
                yield self._finish(out, teacher_view)
            return
        mix, view = mixing
        for wanted, out in zip(wanted_batches, loader):  # the loader keeps the batches' order
            x, xt, y, idx = self._finish(out, True)
            x, xt, y, idx = mix_loaded(mix, view, wanted, x, xt, y, idx)
            yield (x, xt, y, idx) if teacher_view else (x, y, idx)

    def batches(self, batch_size: int, epoch: Optional[int] = None, shuffle_seed: Optional[int] = None,
                shard: Optional[Tuple[int, int]] = None, teacher_view: bool = False) -> Iterator[Tuple[Any, ...]]:
        """Yield (x, y, idx), or (x, x_teacher or None, y, idx) with ``teacher_view``; as Views.batches."""
        n = len(self)
        order = torch.arange(n) if shuffle_seed is None else torch.randperm(
            n, generator=torch.Generator().manual_seed(int(shuffle_seed)))
        if shard is not None:
            order = order[shard[0]::shard[1]]
        yield from self._run([order[s:s + batch_size].tolist() for s in range(0, len(order), batch_size)], epoch,
                             teacher_view)

    def distributed_batches(self, batch_size: int, epoch: int, seed: int, rank: int, world: int,
                            teacher_view: bool = False) -> Iterator[Tuple[Any, ...]]:
        """This rank's batches of one epoch under torchrun. Views of WebDataset shards: whole shards dealt to
        ranks (edgekd.core.shards.deal_shards); otherwise a DistributedSampler's share. Either way every rank
        takes ceil(N / world) items, so all take the same number of steps."""
        groups = self.items.shard_groups()
        if groups is not None:
            order = deal_shards(groups, world, epoch, seed)[rank]
        else:
            order = distributed_order(len(self), world, rank, seed, epoch)
        yield from self._run([order[s:s + batch_size] for s in range(0, len(order), batch_size)], epoch, teacher_view)

    def steps_per_epoch(self, batch_size: int, world: int = 1) -> int:
        groups = self.items.shard_groups() if world > 1 else None
        if groups is not None:  # refused before the first step, on every rank alike
            check_shard_count(len(groups), world)
        per_rank = -(-len(self) // world)
        return -(-per_rank // (batch_size // world))


def _worker_context() -> Any:
    """Decoding workers start from a fork server, not as forks of this process: thread pools that live here
    (ONNX Runtime or OpenVINO teachers, OpenMP) do not survive a fork, and a forked worker can crash or hang.
    The server imports this module once, so each worker still starts in a fraction of a second."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx
