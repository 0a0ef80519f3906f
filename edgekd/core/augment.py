"""Training views: decoded images in memory, and augmentation whose parameters are replayable.

The standard small-image augmentation (random crop with zero padding, horizontal flip) is drawn
here not per call but per ``(image index, epoch)`` from a generator seeded with the augmentation
seed and the epoch. Any loop that asks for image ``i`` in epoch ``e`` gets the same pixels, so a
teacher's logits computed once for that view (edgekd.teacher_cache) are exactly what a live
teacher would say about the student's batch.
"""

import logging
from typing import Any, Dict, Iterator, List, Optional, Tuple, cast

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset, DistributedSampler

from .. import EdgeKDError
from ..base.progress import bar
from .data import EvalPixels, ImageTooLarge, open_image
from .mixing import mix_loaded, with_partners

log = logging.getLogger(__name__)

# standard: pad-crop + flip (the small-image recipe); random-resized-crop: edgekd.stream decodes it from the files
AUGMENTS = ("none", "standard", "random-resized-crop")
# CIFAR practice (He et al. 2016): pad 4 pixels of zeros, crop back to 32, flip half the images.
DEFAULT_PAD = 4
# The random-resized crop's default smallest area (--crop-scale not given) follows the schedule and the input.
# The full ImageNet range (0.08) pays over long schedules; a short run on small inputs has no time to learn from
# views that hard (a small crop of a small picture is mostly upsampled blur). Measured at 64 px and 3 epochs on a
# photo folder (docs/records/distillation.md, "Augmentation strength"): area 0.5-1 scored 35.3%, 0.08-1 33.5%,
# pad-crop 33.3%. So the area range starts mild and widens with the epochs:
#   t = 0 at <= SHORT_EPOCHS epochs, 1 at >= LONG_EPOCHS, linear in log(epochs) between;
#   start = MILD_SMALL at <= SMALL_INPUT px (the input's shorter side), MILD_LARGE at >= LARGE_INPUT px, linear between;
#   scale = start + (FULL_SCALE - start) * t.
# --crop-scale always wins.
SHORT_EPOCHS, LONG_EPOCHS = 3, 100
MILD_SMALL, MILD_LARGE, SMALL_INPUT, LARGE_INPUT = 0.5, 0.35, 64, 160
FULL_SCALE = 0.08


def default_crop_scale(side: int, epochs: int) -> float:
    """The random-resized crop's smallest area fraction for an input of shorter ``side`` px trained ``epochs``
    epochs (the rule above)."""
    import math

    t = min(max(math.log(max(epochs, 1) / SHORT_EPOCHS) / math.log(LONG_EPOCHS / SHORT_EPOCHS), 0.0), 1.0)
    u = min(max((side - SMALL_INPUT) / (LARGE_INPUT - SMALL_INPUT), 0.0), 1.0)
    start = MILD_SMALL + (MILD_LARGE - MILD_SMALL) * u
    return round(start + (FULL_SCALE - start) * t, 3)


# Folder data is decoded into memory when it fits in this many bytes (CIFAR-10 train: 150 MB).
DECODE_LIMIT_BYTES = 2 * 1024 ** 3


class AugmentPlan:
    """Crop offsets and flips for every image and epoch, from (seed, epoch) alone.

    With ``views=K`` (``--teacher-views``) only K views per image exist: epoch e shows view
    (e - 1) mod K + 1, so a teacher cache of K epochs serves a run of any length.
    """

    def __init__(self, kind: str, size: int, seed: int = 0, pad: int = DEFAULT_PAD, views: Optional[int] = None,
                 scale: Optional[float] = None) -> None:
        if kind not in AUGMENTS:
            raise EdgeKDError(f"unknown augmentation {kind!r}: choose from {', '.join(AUGMENTS)}")
        self.kind, self.size, self.seed, self.pad = kind, int(size), int(seed), int(pad)
        self.scale = scale  # the random-resized crop's smallest area fraction
        self.mix: Any = None  # an edgekd.core.mixing.MixPlan under --mix (set by attach_mix)
        self.views: Optional[int] = None
        self.replay(views)

    def replay(self, views: Optional[int]) -> None:
        """Serve only ``views`` distinct views per image from now on (None: a new view every epoch)."""
        if views is not None and (int(views) != views or views < 1):
            raise EdgeKDError(f"--teacher-views must be a positive whole number, got {views!r}")
        self.views = None if views is None else int(views)

    def mix_view(self, epoch: Optional[int]) -> Optional[Tuple[Any, int]]:
        """(MixPlan, view) when ``epoch``'s training batches are mixed (--mix), else None."""
        if self.mix is None or epoch is None:
            return None
        return self.mix, self.view_of(epoch)

    def view_of(self, epoch: int) -> int:
        """The view (1-based, like epochs) that ``epoch`` shows."""
        return int(epoch) if not self.views else (int(epoch) - 1) % self.views + 1

    def params(self, epoch: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dy, dx, flip) int tensors of length ``size`` for ``epoch``; the same on every call."""
        epoch = self.view_of(epoch)
        if self.kind != "standard":  # none; a random-resized crop is drawn per image from its own size (stream.py)
            zeros = torch.zeros(self.size, dtype=torch.long)
            return zeros, zeros, zeros
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(epoch))
        dy = torch.randint(0, 2 * self.pad + 1, (self.size,), generator=g)
        dx = torch.randint(0, 2 * self.pad + 1, (self.size,), generator=g)
        flip = torch.randint(0, 2, (self.size,), generator=g)
        return dy, dx, flip

    def describe(self) -> Dict[str, Any]:
        """The plan as the teacher cache's key and metrics.json record it."""
        d: Dict[str, Any] = {"augment": self.kind, "pad": self.pad, "seed": self.seed, "images": self.size}
        if self.kind == "random-resized-crop":
            d.update(pad=0, scale=[self.scale, 1.0], ratio=[3 / 4, 4 / 3], flip=0.5)
        if self.views:  # only when set, so caches made before --teacher-views keep their key
            d.update(views=self.views)
        if self.mix is not None:  # likewise: a cache of unmixed views is never served for mixed ones
            d.update(mix=self.mix.describe())
        return d


def apply_views(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
                pad: int) -> torch.Tensor:
    """Crop each uint8 image of a batch at its own offset from a zero-padded copy, then flip some.

    One gather for the whole batch (a Python loop of per-image slices ran at a third of the speed).
    """
    if pad == 0 and not flip.any():
        return images
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    rows = dy.view(b, 1) + torch.arange(h).view(1, h)
    ascending = torch.arange(w).view(1, w)
    cols = dx.view(b, 1) + torch.where(flip.bool().view(b, 1), w - 1 - ascending, ascending)
    return padded[torch.arange(b).view(b, 1, 1, 1), torch.arange(c).view(1, c, 1, 1),
                  rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


class Views:
    """A split held as one uint8 (N, C, H, W) tensor, served as normalised, augmented batches."""

    def __init__(self, images: torch.Tensor, targets: Any, mean: List[float], std: List[float],
                 plan: Optional[AugmentPlan] = None) -> None:
        self.images, self.targets = images, torch.as_tensor(targets, dtype=torch.long)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.plan = plan
        # the (plan views, view) whose crop parameters are held, and those parameters (dy, dx, flip)
        self._epoch: Optional[Tuple[Any, int]] = None
        self._params: Tuple[torch.Tensor, ...] = ()

    def __len__(self) -> int:
        return len(self.targets)

    def labelled(self) -> "Views":
        """These views without the unlabelled images (label < 0), with a plan of their own; self when all are
        labelled. What needs labels (a teacher trained here, the batch-norm check) uses these."""
        keep = self.targets >= 0
        if keep.all():
            return self
        plan = None if self.plan is None else AugmentPlan(self.plan.kind, int(keep.sum()), self.plan.seed, self.plan.pad,
                                                         scale=self.plan.scale)
        return Views(self.images[keep], self.targets[keep], self.mean.flatten().tolist(), self.std.flatten().tolist(), plan)

    def batch(self, idx: Any, epoch: Optional[int] = None, teacher_view: bool = False) -> Tuple[Any, ...]:
        """Images ``idx`` as seen in ``epoch`` (plan applied) and their labels; with ``teacher_view``
        (x, None, y): the teacher resizes the student's view itself (images held at the student's size)."""
        x, y = self._batch(idx, epoch)
        return (x, None, y) if teacher_view else (x, y)

    def _batch(self, idx: Any, epoch: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        raw = self.images[idx]
        if self.plan is not None and epoch is not None and self.plan.kind == "standard":
            key = (self.plan.views, self.plan.view_of(epoch))  # the view this epoch shows, under the current plan
            if self._epoch != key:
                self._epoch, self._params = key, self.plan.params(epoch)
            dy, dx, flip = (p[idx] for p in self._params)
            raw = apply_views(raw, dy, dx, flip, self.plan.pad)
        return raw.float().div_(255.0).sub_(self.mean).div_(self.std), self.targets[idx]  # in place: one new tensor

    def batches(self, batch_size: int, epoch: Optional[int] = None, shuffle_seed: Optional[int] = None,
                shard: Optional[Tuple[int, int]] = None, teacher_view: bool = False) -> Iterator[Tuple[Any, ...]]:
        """Yield (x, y, idx) over the split, or (x, None, y, idx) with ``teacher_view`` (as StreamViews);
        shuffled by ``shuffle_seed`` when given.

        ``shard=(rank, world)`` serves only every world-th image from ``rank`` on (evaluation split
        across processes: no image is seen twice, so the counts add up to the split's).
        """
        n = len(self)
        if shuffle_seed is None:
            order = torch.arange(n)
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(int(shuffle_seed)))
        if shard is not None:
            order = order[shard[0]::shard[1]]
            n = len(order)
        for start in range(0, n, batch_size):
            yield self._served(order[start:start + batch_size], epoch, teacher_view)

    def distributed_batches(self, batch_size: int, epoch: int, seed: int, rank: int, world: int,
                            teacher_view: bool = False) -> Iterator[Tuple[Any, ...]]:
        """This rank's (x, y, idx) batches of one training epoch under DDP.

        A DistributedSampler shuffles with ``seed`` and ``set_epoch(epoch)``, gives every rank
        ceil(N / world) images (padding with repeats, as torch does, so every rank takes the same
        number of steps) and ``batch_size`` is the per-process batch.
        """
        order = torch.tensor(distributed_order(len(self), world, rank, seed, epoch), dtype=torch.long)
        for start in range(0, len(order), batch_size):
            yield self._served(order[start:start + batch_size], epoch, teacher_view)

    def _served(self, idx: torch.Tensor, epoch: Optional[int], teacher_view: bool) -> Tuple[Any, ...]:
        """One training batch, its pictures mixed with their partners' under --mix (edgekd.core.mixing)."""
        mixing = None if self.plan is None else self.plan.mix_view(epoch)
        if mixing is None:
            x, y = self._batch(idx, epoch)
        else:
            mix, view = mixing
            load = with_partners(mix, view, idx)
            x, y = self._batch(load, epoch)
            x, _, y, idx = mix_loaded(mix, view, idx, x, None, y, load)
        return (x, None, y, idx) if teacher_view else (x, y, idx)

    def steps_per_epoch(self, batch_size: int, world: int = 1) -> int:
        """Optimizer steps in one epoch at a global ``batch_size`` over ``world`` processes."""
        per_rank = -(-len(self) // world)
        return -(-per_rank // (batch_size // world))


def distributed_order(n: int, world: int, rank: int, seed: int, epoch: int) -> List[int]:
    """This rank's share of one epoch's shuffled indices 0..n-1, as torch's DistributedSampler deals them (it
    reads only the length of what it samples)."""
    sampler: DistributedSampler = DistributedSampler(cast(Dataset, range(n)), num_replicas=world, rank=rank,
                                                     shuffle=True, seed=int(seed))
    sampler.set_epoch(int(epoch))
    return list(sampler)


class _Raw(Dataset):
    """Wrap a split so items come back as uint8 CHW tensors at the input size (for decoding)."""

    def __init__(self, dataset: Any, input_spec: Any) -> None:
        self.dataset = dataset
        self.shape = (input_spec.channels, input_spec.height, input_spec.width)
        self.tf = EvalPixels(input_spec)  # the evaluation geometry (shorter side, center crop), before normalising

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        try:
            img, label = _pil_item(self.dataset, i)
            return self.tf(img), int(label)
        except (OSError, SyntaxError, ValueError):  # PIL's errors for truncated or non-image files
            # Marked, not raised: a worker's exception would lose the file name; decode_split names it.
            c, h, w = self.shape
            return torch.zeros(c, h, w, dtype=torch.uint8), BAD_IMAGE


BAD_IMAGE = -1  # the label an unreadable image gets while decoding


def _path_of(dataset: Any, i: int) -> str:
    if hasattr(dataset, "item_name"):  # edgekd.core.shards.ShardSet: shard.tar:KEY.ext
        return dataset.item_name(i)
    return dataset.samples[i][0] if hasattr(dataset, "samples") else f"item {i}"


def _pil_item(dataset: Any, i: int) -> Tuple[Any, int]:
    """The untransformed (PIL image, label) of item i for ImageFolder, ShardSet, torchvision CIFAR and _PILList."""
    if hasattr(dataset, "pil_item"):  # edgekd.core.shards.ShardSet
        return dataset.pil_item(i), dataset.targets[i]
    if hasattr(dataset, "loader") and hasattr(dataset, "samples"):  # ImageFolder
        path, label = dataset.samples[i]
        return dataset.loader(path), label
    if hasattr(dataset, "images"):  # edgekd.data._PILList
        return dataset.images[i], dataset.targets[i]
    if hasattr(dataset, "data"):  # torchvision CIFAR: HxWxC uint8 arrays
        from PIL import Image

        return Image.fromarray(dataset.data[i]), dataset.targets[i]
    raise EdgeKDError(f"cannot read raw images from a {type(dataset).__name__}")


def decode_split(dataset: Any, input_spec: Any, indices: Any = None, workers: int = 0,
                 desc: str = "decode", progress: bool = True, skip_bad: bool = False,
                 skipped: Optional[List[str]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode (a subset of) a split once into a uint8 tensor and a label tensor.

    Grey, RGBA and palette images are converted to the data's colour mode and every image is resized
    to the input size. An unreadable image is an error that names the file, or with ``skip_bad``
    is left out and counted (its path appended to the list ``skipped`` when one is given).
    """
    n = len(dataset) if indices is None else len(indices)
    nbytes = n * input_spec.channels * input_spec.height * input_spec.width
    if nbytes > DECODE_LIMIT_BYTES:
        raise EdgeKDError(f"{n} images of {input_spec.height}x{input_spec.width} need {nbytes / 1e9:.1f} GB decoded; "
                          f"edgekd keeps training images in memory up to {DECODE_LIMIT_BYTES / 1e9:.1f} GB: "
                          "use --train-subset or smaller images")
    raw: Dataset = _Raw(dataset, input_spec)
    if indices is not None:
        raw = torch.utils.data.Subset(raw, [int(i) for i in indices])
    loader: torch.utils.data.DataLoader = torch.utils.data.DataLoader(
        raw, batch_size=256, num_workers=workers if n > 2000 else 0)
    batches = list(bar(loader, desc=desc, unit="batch", disable=not progress))
    if not batches:
        raise EdgeKDError(f"{desc}: the split holds no images")
    images, labels = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    bad = (labels == BAD_IMAGE).nonzero().flatten().tolist()
    order = [int(i) for i in indices] if indices is not None else range(n)
    paths = [_path_of(dataset, order[i]) for i in bad]
    if bad and not skip_bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise EdgeKDError(f"{bad_reason(dataset, order[bad[0]])}{more} ({desc}); "
                          "remove it, or pass --skip-bad-images to leave unreadable images out")
    if bad:
        log.warning("%s: skipped %d unreadable images, e.g. %s", desc, len(bad), paths[0])
        keep = labels != BAD_IMAGE
        images, labels = images[keep], labels[keep]
    if skipped is not None:
        skipped.extend(paths)
    return images, labels


def bad_reason(dataset: Any, i: int) -> str:
    """Why item i of ``dataset`` could not be decoded (a shard's member or a file)."""
    if hasattr(dataset, "bad_reason"):  # edgekd.core.shards.ShardSet
        return dataset.bad_reason(i)
    return _bad_image_reason(_path_of(dataset, i))


def _bad_image_reason(path: str) -> str:
    """Why an image could not be decoded, found again in this process (a loader worker's exception is lost)."""
    try:
        open_image(path).close()
    except ImageTooLarge as e:
        return str(e)
    except Exception:  # unreadable: the usual case, said below
        pass
    return f"cannot read image {path!r}: corrupt or not an image"


def channel_stats(images: torch.Tensor, chunk: int = 64) -> Tuple[List[float], List[float]]:
    """Per-channel mean and std (unbiased) of a uint8 (N, C, H, W) tensor, in [0, 1] units.

    Summed exactly in integers a few images at a time: a float64 copy of the whole tensor would take 8x its
    size (2.4 GB for CIFAR-10's train split, or 2,000 images at 160 px)."""
    import math

    n_channels = images.shape[1]
    total, squares = [0] * n_channels, [0] * n_channels
    for part in images.split(chunk):
        x = part.transpose(0, 1).reshape(n_channels, -1).long()
        total = [t + v for t, v in zip(total, x.sum(1).tolist())]
        squares = [q + v for q, v in zip(squares, (x * x).sum(1).tolist())]
    n = images.numel() // n_channels
    mean = [t / (n * 255) for t in total]
    std = [math.sqrt((q * n - t * t) / (n * (n - 1) * 255 ** 2)) if n > 1 else 0.0 for t, q in zip(total, squares)]
    return mean, std


def stratified_subset(targets: Any, size: int, seed: int = 0) -> torch.Tensor:
    """``size`` indices with every class represented in proportion, chosen by a fixed seed."""
    targets = torch.as_tensor(targets)
    n = len(targets)
    if size >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(int(seed))
    classes = targets.unique()
    picked = []
    for c in classes.tolist():
        members = (targets == c).nonzero().flatten()
        k = max(1, round(size * len(members) / n))
        picked.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.cat(picked).sort().values
