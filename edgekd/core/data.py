"""Data specs -> datasets, transforms and loaders.

Specs: ``digits`` (scikit-learn's handwritten digits, embedded), ``PATH`` or ``imagefolder:PATH``
(a folder with ``train/`` and ``test/`` or ``val/``, one sub-folder per class), ``cifar10`` /
``cifar100`` (torchvision; ``data_root`` may also point at an ImageFolder copy), ``webdataset:PATH`` (a
folder with ``train/`` and ``test/`` or ``val/`` of WebDataset .tar shards: edgekd.core.shards).
"""

import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from .. import EdgeKDError
from ..base.bounds import check_geometry
from ..base.files import check_link_loops, check_reach, require_regular
from ..base.jsonrec import record_dict, record_from
from ..bundle import preprocessing
from ..bundle.manifest import ModelInput
from .shards import SPEC, ShardSet, label_classes, quoted as _q, read_classes

log = logging.getLogger(__name__)

# The seed article normalises every channel with mean 0.5 and std 0.5.
DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.5
# Digits are 8x8; they are resized to 32x32 so the seed CNNs (two 2x pools, fc over 8x8 maps)
# see the input size they were designed for.
DIGITS_SIZE = 32
DIGITS_TEST_FRACTION = 0.2
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
# One limit for every image edgekd reads (training, unlabelled, calibration, predict, the device runner):
# Pillow's own decompression-bomb threshold (about 89 megapixels, 0.27 GB decoded as RGB). A larger file is
# refused before it is decoded, so a tiny PNG that claims 15000x15000 pixels cannot take gigabytes.
MAX_IMAGE_PIXELS = preprocessing.MAX_IMAGE_PIXELS


class ImageTooLarge(EdgeKDError, ValueError):
    """An image whose header claims more pixels than edgekd decodes (a ValueError, so --skip-bad-images skips it)."""


def open_image(path: Any) -> Any:
    """Open an image file lazily (header only), refusing one above MAX_IMAGE_PIXELS before any pixel is decoded."""
    return preprocessing.open_image(path, ImageTooLarge)


def load_image(path: Any) -> Any:
    """The loader of every image folder (labelled and unlabelled): behind edgekd's size limit, 16-bit and float
    images scaled to 8 bits (Pillow's own conversion clips them), then RGB like torchvision's loader."""
    with open_image(path) as img:
        return preprocessing.to_8bit(img).convert("RGB")


@dataclass
class InputSpec:
    """What a model expects: channels, size, normalisation and colour order."""

    channels: int
    height: int
    width: int
    mean: List[float] = field(default_factory=list)
    std: List[float] = field(default_factory=list)
    # Evaluation geometry (timm's crop_pct): resize the shorter side to size / crop_pct, center-crop to size.
    # None: stretch to (height, width), what checkpoints and bundles made before it was recorded mean.
    crop_pct: Optional[float] = None

    @property
    def color(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    @property
    def size(self) -> Tuple[int, int]:
        """(height, width)."""
        return self.height, self.width

    def to_dict(self) -> Dict[str, Any]:
        """The checkpoint's ``input`` entry: the fields (crop_pct only when set), the colour and the resize."""
        d = record_dict(self, omit_none=frozenset({"crop_pct"}))
        return {**d, "mean": list(self.mean), "std": list(self.std), "color": self.color,
                "resize": [self.height, self.width]}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "InputSpec":
        """The spec of a checkpoint's checked ``input`` entry (its color and resize follow from the fields)."""
        spec = record_from(cls, d)
        check_geometry(spec.height, spec.width, spec.crop_pct, "the checkpoint's input crop_pct")
        return replace(spec, mean=list(spec.mean), std=list(spec.std))

    @classmethod
    def from_manifest(cls, d: Dict[str, Any]) -> "InputSpec":
        """The spec of the bundle runner's preprocessing spec (``manifest``): its colour gives the channels."""
        values: List[Any] = [d.get(k) for k in ("color", "resize", "mean", "std", "crop_pct")]
        color, (height, width), mean, std, crop_pct = values
        return cls(1 if color == "L" else 3, int(height), int(width), list(mean), list(std), crop_pct)

    def manifest(self) -> Dict[str, Any]:
        """The runner's view of this spec (bundle/preprocessing.preprocess reads color, resize, crop_pct, mean, std)."""
        d: Dict[str, Any] = {"color": self.color, "resize": [self.height, self.width], "mean": list(self.mean),
                             "std": list(self.std)}
        return d if self.crop_pct is None else {**d, "crop_pct": self.crop_pct}


@dataclass
class Data:
    """A resolved data spec: the two splits, the class names and the input spec."""

    spec: str
    train: Any  # a split: a torchvision dataset, a ShardSet, a list of images
    test: Any
    classes: List[str]
    input: InputSpec
    sizes: Optional[Set[Tuple[int, int]]] = None   # (width, height) of the training images probed (a sample)
    # Settled by the run that prepares the data (edgekd.core.distill.prepare_data), for metrics.json:
    pipeline: Optional[str] = None            # memory or stream
    train_size: Optional[int] = None          # training views (labelled and --unlabeled)
    labelled_images: Optional[int] = None
    unlabeled: Optional[Dict[str, Any]] = None   # the --unlabeled folder's record
    skipped_images: List[str] = field(default_factory=list)   # unreadable files left out (--skip-bad-images)
    norm_source: Optional[str] = None         # where the mean and std came from


def default_input(channels: int, height: int, width: int, crop_pct: Optional[float] = None) -> InputSpec:
    return InputSpec(channels, height, width, [DEFAULT_MEAN] * channels, [DEFAULT_STD] * channels, crop_pct)


class ConvertMode:
    """Convert a PIL image to L or RGB (a class, not a lambda, so loader workers can pickle it)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Any) -> Any:
        return img if img.mode == self.mode else img.convert(self.mode)


class EvalTransform:
    """PIL image -> normalised float tensor: the bundle runner's own preprocessing (bundle/preprocessing.preprocess),
    so training's evaluation, export's parity images, predict and the device runner give the same tensor."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = ModelInput.from_json(spec.manifest())

    def __call__(self, img: Any) -> Any:
        import torch

        return torch.from_numpy(preprocessing.preprocess(img, self.spec))


class EvalPixels(EvalTransform):
    """PIL image -> uint8 (C, H, W) tensor of the evaluation geometry (before /255 and normalising)."""

    def __call__(self, img: Any) -> Any:
        import numpy as np
        import torch

        pixels = np.array(preprocessing.preprocess_pixels(img, self.spec), dtype=np.uint8)  # writable: torch shares it
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(pixels))


def eval_transform(spec: InputSpec) -> EvalTransform:
    """PIL image -> normalised tensor. The torch-free runtime reproduces these exact steps (it runs the same code)."""
    return EvalTransform(spec)


# The student's input size for folders of mixed image sizes when --input-size is not given: the usual size of
# ImageNet-pretrained edge models (MobileNet, EfficientNet-B0, ResNet), and timm's default evaluation crop.
MIXED_DEFAULT_SIZE = 224
MIXED_CROP_PCT = 0.875
# Image headers read to decide whether a folder's images share one size (spread over the split).
SIZE_PROBES = 256


@dataclass
class SizeChoice:
    """--input-size and --crop-pct as given (None: chosen from the data), and a pretrained student's own view."""

    size: Optional[Tuple[int, int]] = None
    crop_pct: Optional[float] = None
    pretrained: Optional[Tuple[Tuple[int, ...], float, str]] = None   # ((height, width), crop_pct, source), or None


def parse_size(value: Any, flag: str = "--input-size") -> Optional[Tuple[int, int]]:
    """'H' or 'H,W' (or a list) -> (height, width); None stays None."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).replace("x", ",").split(",")
    try:
        sizes = [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        sizes = []
    if not 1 <= len(sizes) <= 2 or min(sizes) < 1 or max(sizes) > 8192:
        raise EdgeKDError(f"{flag} {value!r}: give SIZE or HEIGHT,WIDTH in pixels (1 to 8192), e.g. 160 or 224,160")
    return (sizes[0], sizes[-1])


def choose_input(channels: int, sizes: Set[Tuple[int, int]], choice: Optional["SizeChoice"] = None,
                 where: str = "the data") -> InputSpec:
    """The student's InputSpec from the image sizes found ((width, height) set) and the user's choice.

    The data's own size when every image has it and no size is given (CIFAR-10, digits, thumbnails: the
    geometry is then the identity, as it always was); for mixed sizes MIXED_DEFAULT_SIZE square, or the
    images' median shorter side when that is smaller (thumbnails are not upsampled), or a pretrained
    student's own size, with timm's crop_pct; logged. A given size keeps everything of uniform data
    (crop_pct 1.0: only an aspect change is cropped) and crops mixed photos as timm evaluates them.
    """
    choice = choice or SizeChoice()
    uniform = len(sizes) == 1
    if choice.size is not None:
        size = choice.size
    elif uniform:
        width, height = next(iter(sizes))
        size = (height, width)
    else:
        side = min(MIXED_DEFAULT_SIZE, sorted(min(w, h) for w, h in sizes)[len(sizes) // 2])
        size, why = (side, side), f"edgekd's default for mixed sizes ({MIXED_DEFAULT_SIZE}"
        why += ")" if side == MIXED_DEFAULT_SIZE else f", lowered to the images' median shorter side {side})"
        if choice.pretrained is not None:
            (height, width), why = choice.pretrained[0], f"the pretrained student's own ({choice.pretrained[2]})"
            size = (int(height), int(width))
        log.warning("%s holds images of %d different sizes: the student's input is %dx%d, %s; set --input-size",
                    where, len(sizes), size[0], size[1], why)
    crop = choice.crop_pct
    if crop is None:
        crop = 1.0 if uniform else (choice.pretrained[1] if choice.pretrained is not None else MIXED_CROP_PCT)
    check_geometry(size[0], size[1], crop, "--crop-pct")  # bounded in memory before any image is resized
    return default_input(channels, size[0], size[1], crop)


def load_data(spec: Any = "digits", data_root: Optional[str] = None, input_spec: Optional[InputSpec] = None,
              choice: Optional[SizeChoice] = None) -> Data:
    """Resolve a data spec. ``input_spec`` (from a checkpoint) overrides the data's own; ``choice`` (a
    SizeChoice: --input-size, --crop-pct) sets the student's size and crop when there is no checkpoint's."""
    spec = str(spec)
    if spec == "digits":
        return _digits(input_spec, choice)
    if spec in ("cifar10", "cifar100"):
        return _torchvision_cifar(spec, data_root, input_spec, choice)
    if spec.startswith("webdataset:"):
        return _webdataset(spec[len("webdataset:"):], input_spec, choice)
    path = spec[len("imagefolder:"):] if spec.startswith("imagefolder:") else spec
    if spec.startswith("imagefolder:") or os.sep in spec or os.path.exists(spec):
        return _imagefolder(spec, path, input_spec, choice)
    raise EdgeKDError(
        f"unknown data {spec!r}: use digits, cifar10, cifar100, a folder PATH, imagefolder:PATH or webdataset:PATH"
    )


def data_folders(options: object) -> list:
    """The folders a command reads as data (``options``: its data, data_root and unlabeled options): a derived
    folder (--out, --teacher-cache) inside one would be read back as images or a class of its own."""
    spec = str(getattr(options, "data", None) or "")
    path = spec.split(":", 1)[1] if spec.startswith(("imagefolder:", "webdataset:")) else spec
    found = [path if path and os.path.isdir(path) else None, getattr(options, "data_root", None),
             getattr(options, "unlabeled", None)]
    return [f for f in found if f and os.path.isdir(f)]


class _PILList:
    """A list of (PIL image, label) with a transform, like a torchvision dataset."""

    def __init__(self, images: List[Any], labels: Any, transform: Callable[[Any], Any]) -> None:
        self.images, self.targets, self.transform = images, list(labels), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tuple[Any, int]:
        return self.transform(self.images[i]), self.targets[i]


def _digits(input_spec: Optional[InputSpec], choice: Optional[SizeChoice] = None) -> Data:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are 0..16; scale to 8-bit grey so they are ordinary images.
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    idx_train, idx_test = train_test_split(
        np.arange(len(pixels)), test_size=DIGITS_TEST_FRACTION, stratify=digits.target,
        random_state=0,  # fixed, so the held-out split never depends on --seed
    )
    # digits are shown at 32x32 (the 8x8 scans resized), their own size as far as --input-size is concerned
    spec = input_spec or choose_input(1, {(DIGITS_SIZE, DIGITS_SIZE)}, choice)
    tf = eval_transform(spec)

    def split(idx: Any) -> _PILList:
        return _PILList([Image.fromarray(pixels[i], "L") for i in idx], digits.target[idx], tf)

    classes = [str(c) for c in digits.target_names]
    return Data("digits", split(idx_train), split(idx_test), classes, spec, {(8, 8)})


def _imagefolder(spec: str, path: str, input_spec: Optional[InputSpec], choice: Optional[SizeChoice] = None) -> Data:
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(path):
        raise EdgeKDError(f"data folder {path!r} does not exist (expected a folder with train/ and test/ or val/)")
    train_dir = os.path.join(path, "train")
    test_dir = next((os.path.join(path, s) for s in ("test", "val") if os.path.isdir(os.path.join(path, s))), None)
    if not os.path.isdir(train_dir) or test_dir is None:
        found = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        raise EdgeKDError(
            f"data folder {path!r} needs train/ and test/ (or val/) sub-folders, one folder per class "
            f"inside each; found: {', '.join(found) or 'no sub-folders'}"
        )
    check_reach(path, "data folder", walk=[train_dir, test_dir])
    for split in (train_dir, test_dir):
        check_link_loops(split)
    channels, sizes = _probe_sizes(train_dir)
    spec_in = input_spec or choose_input(channels, sizes, choice, where=train_dir)
    tf = eval_transform(spec_in)
    try:
        train = ImageFolder(train_dir, transform=tf, loader=load_image)
        test = ImageFolder(test_dir, transform=tf, loader=load_image)
    except (FileNotFoundError, OSError) as e:
        raise EdgeKDError(f"cannot read image folder {path!r}: {e}") from e
    for image, _ in train.samples + test.samples:  # stat, never open: a FIFO named like an image would hang
        require_regular(image, "image")
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise EdgeKDError(
            f"class folders differ between {train_dir!r} and {test_dir!r}: "
            f"only in train: {only_train or 'none'}; only in test: {only_test or 'none'}"
        )
    return Data(f"imagefolder:{os.path.abspath(path)}", train, test, list(train.classes), spec_in, sizes)


def _webdataset(path: str, input_spec: Optional[InputSpec], choice: Optional[SizeChoice] = None) -> Data:
    """``webdataset:PATH``: its two splits as edgekd.core.shards.ShardSets, the classes, the input spec."""
    if not os.path.isdir(path):
        raise EdgeKDError(f"webdataset folder {_q(path)} does not exist (expected a folder with train/ and "
                          "test/ or val/, each holding .tar shards)")
    train_dir = os.path.join(path, "train")
    test_dir = next((os.path.join(path, s) for s in ("test", "val") if os.path.isdir(os.path.join(path, s))), None)
    if not os.path.isdir(train_dir) or test_dir is None:
        found = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        raise EdgeKDError(f"webdataset folder {_q(path)} needs train/ and test/ (or val/) sub-folders of .tar "
                          f"shards; found: {', '.join(found) or 'no sub-folders'}")
    check_reach(path, "webdataset folder", walk=[train_dir, test_dir])
    named = read_classes(os.path.join(path, "classes.txt"))
    train, test = ShardSet(train_dir, named, ImageTooLarge), ShardSet(test_dir, named, ImageTooLarge)
    classes = named or label_classes(train.targets + test.targets, f"the shards under {_q(path)}")
    channels, sizes = _probe(len(train), train.open, f"no readable images found in the shards under {_q(train_dir)}")
    spec_in = input_spec or choose_input(channels, sizes, choice, where=train_dir)
    train.classes = test.classes = classes
    train.transform = test.transform = eval_transform(spec_in)
    return Data(f"{SPEC}{os.path.abspath(path)}", train, test, classes, spec_in, sizes)


def _probe_sizes(train_dir: str) -> Tuple[int, Set[Tuple[int, int]]]:
    """(channels, {(width, height)}) from the headers of up to SIZE_PROBES images spread over the split: grey
    folders stay 1-channel, the rest are RGB.

    Unreadable and oversized files are passed over here; decoding names them (or skips them with
    --skip-bad-images).
    """
    paths = [os.path.join(root, name) for root, _, files in sorted(os.walk(train_dir, followlinks=True))
             for name in sorted(files) if name.lower().endswith(IMAGE_EXTENSIONS)]
    return _probe(len(paths), lambda i: open_image(paths[i]),
                  f"no readable images ({', '.join(IMAGE_EXTENSIONS)}) found under {train_dir!r}")


def _probe(n: int, open_at: Callable[[int], Any], nothing: str) -> Tuple[int, Set[Tuple[int, int]]]:
    """(channels, sizes) from the headers of up to SIZE_PROBES of ``n`` images (``open_at(i)`` opens image i
    lazily) spread over the split; EdgeKDError(``nothing``) when none can be read."""
    step = max(1, n // SIZE_PROBES)
    channels, sizes = None, set()
    for i in range(0, n, step)[:SIZE_PROBES]:
        try:
            with open_at(i) as img:
                if channels is None:
                    channels = 1 if img.mode in ("L", "1") + preprocessing.WIDE_MODES else 3
                sizes.add(img.size)
        except (OSError, SyntaxError, ValueError):
            continue
    if channels is None:
        raise EdgeKDError(nothing)
    return channels, sizes


def _torchvision_cifar(spec: str, data_root: Optional[str], input_spec: Optional[InputSpec],
                       choice: Optional[SizeChoice] = None) -> Data:
    from torchvision import datasets

    root = data_root or os.path.join(os.path.expanduser("~"), ".cache", "edgekd", spec)
    # A local ImageFolder copy (train/ + test/) is read in place.
    if os.path.isdir(os.path.join(root, "train")):
        data = _imagefolder(spec, root, input_spec, choice)
        data.spec = spec
        return data
    spec_in = input_spec or choose_input(3, {(32, 32)}, choice)
    cls = datasets.CIFAR10 if spec == "cifar10" else datasets.CIFAR100
    tf = eval_transform(spec_in)
    try:
        train = cls(root, train=True, transform=tf, download=True)
        test = cls(root, train=False, transform=tf, download=True)
    except Exception as e:  # no network, bad archive: say where to put a copy instead
        raise EdgeKDError(
            f"could not load {spec} into {root!r} ({type(e).__name__}: {e}); "
            "pass --data-root pointing at a downloaded copy or an ImageFolder folder"
        ) from e
    return Data(spec, train, test, list(train.classes), spec_in, {(32, 32)})


def take_images(dataset: Any, limit: Optional[int] = None) -> Tuple[Any, Any]:
    """The first ``limit`` items of a split as one (N, C, H, W) tensor and a label tensor."""
    import torch

    n = len(dataset) if limit is None else min(limit, len(dataset))
    # A stride over the split keeps every class in a capped sample (ImageFolder is class-sorted).
    step = max(1, len(dataset) // n) if n else 1
    items = [dataset[i] for i in range(0, step * n, step)][:n]
    if not items:
        raise EdgeKDError("the test split holds no images")
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


class UnlabeledFolder:
    """Image files under a folder (any nesting, no class folders), read like an ImageFolder's.

    Every item carries label 0 while it is decoded (edgekd.augment marks unreadable images with -1);
    the caller turns them into edgekd.losses.UNLABELED afterwards. ``skipped`` counts what was left out.
    """

    def __init__(self, folder: str, paths: List[str], skipped: Dict[str, int], found: int) -> None:
        self.folder, self.samples, self.skipped, self.found = folder, [(p, 0) for p in paths], skipped, found
        self.targets = [0] * len(paths)
        self.loader = load_image  # the labelled folders' loader: the same size limit, the same 8-bit scaling

    def __len__(self) -> int:
        return len(self.samples)


def image_files(folder: str) -> List[str]:
    """Real paths of the image files under ``folder``, sorted; a folder linked back to one above is visited once."""
    seen, found = set(), []
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink loop, or a second link to a folder already read
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        found += [os.path.realpath(os.path.join(root, f)) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(dict.fromkeys(found))


def split_paths(dataset: Any, indices: Optional[Any] = None) -> Optional[Set[str]]:
    """Real paths of a split's image files (those of ``indices`` only), or None for data without files."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return None
    picked = samples if indices is None else [samples[int(i)] for i in indices]
    return {os.path.realpath(path) for path, _ in picked}


def load_unlabeled(folder: str, labelled: Optional[Set[str]] = None,
                   test: Optional[Set[str]] = None) -> UnlabeledFolder:
    """The unlabelled images of ``folder`` for distillation, without those already in the labelled training
    set or the test split (same real path): a labelled image must not come back as an unlabelled one, and
    a test image must not be trained on. ``labelled``/``test`` are sets of real paths (None: data without
    files, nothing to compare)."""
    if not os.path.isdir(folder):
        raise EdgeKDError(f"--unlabeled {folder!r} is not a folder (expected a folder of images, any nesting)")
    check_reach(folder, "--unlabeled")
    paths = image_files(folder)
    for path in paths:  # stat, never open: a FIFO named like an image would hang
        require_regular(path, "--unlabeled image")
    if not paths:
        raise EdgeKDError(f"--unlabeled {folder!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    in_train = [p for p in paths if labelled and p in labelled]
    in_test = [p for p in paths if test and p in test and not (labelled and p in labelled)]
    drop = set(in_train) | set(in_test)
    keep = [p for p in paths if p not in drop]
    if in_train or in_test:
        log.info("--unlabeled %s: %d images, skipped %d already in the labelled training set and %d of the test "
                 "split", folder, len(paths), len(in_train), len(in_test))
    if not keep:
        raise EdgeKDError(f"--unlabeled {folder!r}: all {len(paths)} images are already in the labelled training set "
                          "or the test split; point it at other images, or label fewer with --train-subset")
    return UnlabeledFolder(os.path.abspath(folder), keep, {"in_labelled_train": len(in_train), "in_test": len(in_test)},
                           len(paths))
