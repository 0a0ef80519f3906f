"""Data specs -> datasets, transforms and loaders.

Specs: ``digits`` (scikit-learn's handwritten digits, embedded), ``PATH`` or ``imagefolder:PATH``
(a folder with ``train/`` and ``test/`` or ``val/``, one sub-folder per class), ``cifar10`` /
``cifar100`` (torchvision; ``data_root`` may also point at an ImageFolder copy).
"""

import logging
import os
from dataclasses import asdict, dataclass, field

from .. import EdgeKDError

log = logging.getLogger(__name__)

# The seed article normalises every channel with mean 0.5 and std 0.5.
DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.5
# Digits are 8x8; they are resized to 32x32 so the seed CNNs (two 2x pools, fc over 8x8 maps)
# see the input size they were designed for.
DIGITS_SIZE = 32
DIGITS_TEST_FRACTION = 0.2
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
# Pillow's own decompression-bomb threshold (about 89 megapixels, 0.27 GB decoded as RGB): a larger file is
# refused before it is decoded, so a tiny PNG that claims 15000x15000 pixels cannot take gigabytes.
MAX_IMAGE_PIXELS = 89_478_485


class ImageTooLarge(EdgeKDError, ValueError):
    """An image whose header claims more pixels than edgekd decodes (a ValueError, so --skip-bad-images skips it)."""


def open_image(path):
    """Open an image file lazily (header only), refusing one above MAX_IMAGE_PIXELS before any pixel is decoded."""
    import re
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        # Pillow warns above its limit and raises above twice it; both become one refusal here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            found = re.search(r"\((\d+) pixels\)", str(e))
            pixels = int(found.group(1)) if found else MAX_IMAGE_PIXELS + 1
            raise ImageTooLarge(_too_large(path, pixels)) from None
    if img.width * img.height > MAX_IMAGE_PIXELS:
        img.close()
        raise ImageTooLarge(_too_large(path, img.width * img.height, img.size))
    return img


def _too_large(path, pixels, size=None):
    dims = f"{size[0]}x{size[1]} pixels, " if size else ""
    return (f"image {str(path)!r} is too large to decode ({dims}{pixels / 1e6:.0f} megapixels; edgekd reads images "
            f"up to {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels)")


def load_image(path):
    """The ImageFolder loader: torchvision's (RGB), behind edgekd's size limit."""
    with open_image(path) as img:
        return img.convert("RGB")


@dataclass
class InputSpec:
    """What a model expects: channels, size, normalisation and colour order."""

    channels: int
    height: int
    width: int
    mean: list = field(default_factory=list)
    std: list = field(default_factory=list)

    @property
    def color(self):
        return "L" if self.channels == 1 else "RGB"

    def to_dict(self):
        d = asdict(self)
        d["color"] = self.color
        d["resize"] = [self.height, self.width]
        return d

    @classmethod
    def from_dict(cls, d):
        return cls(d["channels"], d["height"], d["width"], list(d["mean"]), list(d["std"]))


@dataclass
class Data:
    """A resolved data spec: the two splits, the class names and the input spec."""

    spec: str
    train: object
    test: object
    classes: list
    input: InputSpec


def default_input(channels, height, width):
    return InputSpec(channels, height, width, [DEFAULT_MEAN] * channels, [DEFAULT_STD] * channels)


class ConvertMode:
    """Convert a PIL image to L or RGB (a class, not a lambda, so loader workers can pickle it)."""

    def __init__(self, mode):
        self.mode = mode

    def __call__(self, img):
        return img if img.mode == self.mode else img.convert(self.mode)


def eval_transform(spec):
    """PIL image -> normalised tensor. The torch-free runtime reproduces these exact steps."""
    from torchvision import transforms

    return transforms.Compose([
        ConvertMode(spec.color),
        transforms.Resize((spec.height, spec.width)),
        transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])


def load_data(spec="digits", data_root=None, input_spec=None):
    """Resolve a data spec. ``input_spec`` (from a checkpoint) overrides the data's own."""
    spec = str(spec)
    if spec == "digits":
        return _digits(input_spec)
    if spec in ("cifar10", "cifar100"):
        return _torchvision_cifar(spec, data_root, input_spec)
    path = spec[len("imagefolder:"):] if spec.startswith("imagefolder:") else spec
    if spec.startswith("imagefolder:") or os.sep in spec or os.path.exists(spec):
        return _imagefolder(spec, path, input_spec)
    raise EdgeKDError(
        f"unknown data {spec!r}: use digits, cifar10, cifar100, a folder PATH or imagefolder:PATH"
    )


class _PILList:
    """A list of (PIL image, label) with a transform, like a torchvision dataset."""

    def __init__(self, images, labels, transform):
        self.images, self.targets, self.transform = images, list(labels), transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.targets[i]


def _digits(input_spec):
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
    spec = input_spec or default_input(1, DIGITS_SIZE, DIGITS_SIZE)
    tf = eval_transform(spec)

    def split(idx):
        return _PILList([Image.fromarray(pixels[i], "L") for i in idx], digits.target[idx], tf)

    classes = [str(c) for c in digits.target_names]
    return Data("digits", split(idx_train), split(idx_test), classes, spec)


def _imagefolder(spec, path, input_spec):
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
    for split in (train_dir, test_dir):
        check_link_loops(split)
    spec_in = input_spec or _probe_input(train_dir)
    tf = eval_transform(spec_in)
    try:
        train = ImageFolder(train_dir, transform=tf, loader=load_image)
        test = ImageFolder(test_dir, transform=tf, loader=load_image)
    except (FileNotFoundError, OSError) as e:
        raise EdgeKDError(f"cannot read image folder {path!r}: {e}") from None
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise EdgeKDError(
            f"class folders differ between {train_dir!r} and {test_dir!r}: "
            f"only in train: {only_train or 'none'}; only in test: {only_test or 'none'}"
        )
    return Data(f"imagefolder:{os.path.abspath(path)}", train, test, list(train.classes), spec_in)


def check_link_loops(root):
    """Refuse a folder tree where a symbolic link leads back to a folder that contains it.

    torchvision's ImageFolder walks with followlinks=True: such a loop would be walked forever, with
    memory growing. A link to a folder elsewhere is fine (it is walked once).
    """
    root = os.path.normpath(root)
    for folder, _, _ in os.walk(root, followlinks=True):
        real, ancestor = os.path.realpath(folder), folder
        while ancestor != root and os.path.dirname(ancestor) != ancestor:
            ancestor = os.path.dirname(ancestor)
            if os.path.realpath(ancestor) == real:
                raise EdgeKDError(f"data folder {root!r} has a symbolic-link loop: {folder!r} leads back to "
                                  f"{ancestor!r}; remove the link")


def _probe_input(train_dir):
    """Channels and size from the first readable image: grey folders stay 1-channel, the rest are RGB.

    Unreadable and oversized files are passed over here; decoding names them (or skips them with
    --skip-bad-images).
    """
    for root, _, files in sorted(os.walk(train_dir)):
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                try:
                    with open_image(os.path.join(root, name)) as img:
                        channels = 1 if img.mode in ("L", "1", "I;16") else 3
                        return default_input(channels, img.height, img.width)
                except (OSError, SyntaxError, ValueError):
                    continue
    raise EdgeKDError(f"no readable images ({', '.join(IMAGE_EXTENSIONS)}) found under {train_dir!r}")


def _torchvision_cifar(spec, data_root, input_spec):
    from torchvision import datasets

    root = data_root or os.path.join(os.path.expanduser("~"), ".cache", "edgekd", spec)
    # A local ImageFolder copy (train/ + test/) is read in place.
    if os.path.isdir(os.path.join(root, "train")):
        data = _imagefolder(spec, root, input_spec)
        data.spec = spec
        return data
    spec_in = input_spec or default_input(3, 32, 32)
    cls = datasets.CIFAR10 if spec == "cifar10" else datasets.CIFAR100
    tf = eval_transform(spec_in)
    try:
        train = cls(root, train=True, transform=tf, download=True)
        test = cls(root, train=False, transform=tf, download=True)
    except Exception as e:  # no network, bad archive: say where to put a copy instead
        raise EdgeKDError(
            f"could not load {spec} into {root!r} ({type(e).__name__}: {e}); "
            "pass --data-root pointing at a downloaded copy or an ImageFolder folder"
        ) from None
    return Data(spec, train, test, list(train.classes), spec_in)


def take_images(dataset, limit=None):
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

    def __init__(self, folder, paths, skipped, found):
        from torchvision.datasets.folder import default_loader

        self.folder, self.samples, self.skipped, self.found = folder, [(p, 0) for p in paths], skipped, found
        self.targets = [0] * len(paths)
        self.loader = default_loader

    def __len__(self):
        return len(self.samples)


def image_files(folder):
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


def split_paths(dataset, indices=None):
    """Real paths of a split's image files (those of ``indices`` only), or None for data without files."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return None
    picked = samples if indices is None else [samples[int(i)] for i in indices]
    return {os.path.realpath(path) for path, _ in picked}


def load_unlabeled(folder, labelled=None, test=None):
    """The unlabelled images of ``folder`` for distillation, without those already in the labelled training
    set or the test split (same real path): a labelled image must not come back as an unlabelled one, and
    a test image must not be trained on. ``labelled``/``test`` are sets of real paths (None: data without
    files, nothing to compare)."""
    if not os.path.isdir(folder):
        raise EdgeKDError(f"--unlabeled {folder!r} is not a folder (expected a folder of images, any nesting)")
    paths = image_files(folder)
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
