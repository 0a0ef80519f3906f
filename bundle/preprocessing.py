"""Preprocessing, torch-free and standalone (part of the device runner): image files to the manifest's input,
exactly as training's evaluation transform, and names made safe to print."""

import math
import os
import re
import warnings
from typing import Any, Optional, Sequence, Tuple, Type

from ..base.errors import BundleError
from ..base.files import require_regular
from .manifest import ModelInput


# The most pixels edgekd decodes from one image, everywhere it reads images (training, unlabelled folders,
# calibration, predict, the device runner): Pillow's own decompression-bomb threshold (about 89
# megapixels, 0.27 GB decoded as RGB). A larger file is refused from its header, before any pixel is decoded.
MAX_IMAGE_PIXELS = 89_478_485


def image_too_large(path: Any, pixels: float, size: Optional[Sequence[int]] = None) -> str:
    """The one-line refusal of an image above MAX_IMAGE_PIXELS."""
    dims = "%dx%d pixels, " % tuple(size) if size else ""
    return ("image %r is too large to decode (%s%.0f megapixels; edgekd reads images up to %.0f megapixels)"
            % (printable(str(path)), dims, pixels / 1e6, MAX_IMAGE_PIXELS / 1e6))


def open_image(path: Any, error: Optional[Type[Exception]] = None) -> Any:
    """An image file opened lazily (header only); ``error`` (BundleError by default) when its header claims more
    than MAX_IMAGE_PIXELS. Pillow warns above its own limit and raises above twice it: both become this refusal."""
    from PIL import Image

    error = error or BundleError
    if isinstance(path, (str, os.PathLike)) and os.path.exists(path):  # a FIFO would hang Image.open: stat first
        try:
            require_regular(path, "image", printable(str(path)))
        except (OSError, ValueError) as e:
            raise error(str(e)) from None
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            found = re.search(r"\((\d+) pixels\)", str(e))
            raise error(image_too_large(path, int(found.group(1)) if found else MAX_IMAGE_PIXELS + 1)) from e
    if img.width * img.height > MAX_IMAGE_PIXELS:
        img.close()
        raise error(image_too_large(path, img.width * img.height, img.size))
    return img


# Pillow's modes that hold more than 8 bits per pixel (16-bit grey PNG and TIFF, 32-bit integer, float):
# its own convert("L"/"RGB") clips them to 0..255, which turns a 16-bit grey image into black and white.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_8bit(image: Any) -> Any:
    """A PIL image with at most 8 bits per channel; 16-bit and float images scaled to 0..255, not clipped.

    16-bit modes (and mode I, which Pillow uses for 16-bit PNGs too) are scaled by 255/65535; float images
    are taken as [0, 1] when every value lies there, else as 0..255. Other modes are returned unchanged.
    """
    if image.mode not in WIDE_MODES:
        return image
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        finite = np.nan_to_num(pixels, nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0 else 1.0
        pixels = finite * scale
    else:
        pixels = pixels * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")


def resize_crop(size: Tuple[int, int], out_hw: Tuple[int, int], crop_pct: Optional[float]
                ) -> Tuple[Tuple[int, int], Tuple[int, int, int, int]]:
    """Where an image of ``size`` (width, height) goes: ``(resized (w, h), crop box (left, top, right, bottom))``.

    torchvision's and timm's evaluation geometry: resize the shorter side to ``out / crop_pct`` keeping the
    aspect ratio (``int`` truncation of the longer side, as ``transforms.Resize(int)``), then center-crop to
    ``out_hw`` (offsets rounded as ``transforms.CenterCrop``). ``crop_pct`` None (manifests written before it
    was recorded) stretches the whole image to ``out_hw``, as edgekd did then.
    """
    width, height = size
    out_h, out_w = out_hw
    if crop_pct is None:
        return (out_w, out_h), (0, 0, out_w, out_h)
    if out_h == out_w:  # timm: the scalar case, torchvision's Resize(int)
        short = int(math.floor(out_h / crop_pct))
        if width <= height:
            new = (short, int(short * height / width))
        else:
            new = (int(short * width / height), short)
    else:  # timm's ResizeKeepRatio: the scale that makes both sides at least the target's
        target_h, target_w = int(math.floor(out_h / crop_pct)), int(math.floor(out_w / crop_pct))
        ratio = min(height / target_h, width / target_w)
        new = (int(round(width / ratio)), int(round(height / ratio)))
    if new[0] * new[1] > MAX_IMAGE_PIXELS:  # bounded before the resize allocates it (edgekd.base.bounds' rule)
        raise BundleError("crop_pct %r resizes a %dx%d image to %dx%d pixels (%.3g; at most %.0f megapixels)"
                          % (crop_pct, width, height, new[0], new[1], new[0] * new[1], MAX_IMAGE_PIXELS / 1e6))
    left = int(round((new[0] - out_w) / 2.0))
    top = int(round((new[1] - out_h) / 2.0))
    return new, (left, top, left + out_w, top + out_h)


def preprocess_pixels(image: Any, spec: ModelInput) -> Any:
    """PIL image -> the manifest's geometry and colour, as a PIL image (the pixels before /255 and normalising);
    16-bit and float images scaled to 8 bits first (Pillow's own conversion clips them)."""
    from PIL import Image

    image = to_8bit(image)
    if image.mode != spec.color:
        image = image.convert(spec.color)
    new, box = resize_crop(image.size, spec.resize, spec.crop_pct)
    if image.size != new:
        # Image.Resampling since Pillow 9.1; a device's older Pillow has the constant on Image itself
        image = image.resize(new, getattr(Image, "Resampling", Image).BILINEAR)
    if box != (0, 0) + new:
        image = image.crop(box)  # a crop past the edge (an upscale rounding) pads with zeros, as CenterCrop does
    return image


def preprocess(image: Any, spec: ModelInput) -> Any:
    """PIL image -> (C, H, W) float32 exactly as the manifest's input spec says (training's evaluation transform):
    mode, bilinear resize of the shorter side to size / crop_pct, center crop, /255, normalise."""
    import numpy as np

    pixels = np.asarray(preprocess_pixels(image, spec), dtype=np.float32) / 255.0
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return (pixels - mean) / std


def load_images(paths: Sequence[Any], spec: ModelInput) -> Any:
    """The image files as one preprocessed batch; an unreadable or oversized file is a BundleError naming it."""
    import numpy as np
    from PIL import UnidentifiedImageError

    batch = []
    for path in paths:
        try:
            with open_image(path) as img:
                batch.append(preprocess(img, spec))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # truncated, damaged, not an image
            raise BundleError("cannot read image %r: %s" % (printable(str(path)), printable(str(e) or type(e).__name__))) \
                from e
    return np.stack(batch)


def printable(text: str) -> str:
    """``text`` with control characters (escape sequences, carriage returns, bidi overrides) escaped, so a name
    read from a file cannot move the cursor, recolour or rewrite what the terminal shows."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
