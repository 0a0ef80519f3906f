"""Bounds in memory, not only in value: a size option is checked by the bytes it will take, before allocation.

``check_bytes(what, value, nbytes, limit)`` refuses in one line naming the option as given, its value, the
bytes it asks for and the limit. ``geometry_problem`` is the evaluation geometry's bound (a crop ratio asks
a resize of the shorter side to ``size / crop_pct``: ``--crop-pct 1e-9`` would be billions of pixels).
"""

import math
from typing import Optional

from .. import EdgeKDError

# One batch of inputs (a teacher's views, a student's batch) may take at most this much memory: above it a run
# would swap or be killed long after it started.
MAX_BATCH_BYTES = 8 * 1024 ** 3
# The largest image edgekd resizes to: Pillow's decompression-bomb threshold, the limit of every image it decodes
# (edgekd.bundle.preprocessing.MAX_IMAGE_PIXELS, kept equal by a test).
MAX_RESIZE_PIXELS = 89_478_485
# Class count: a model's head and every logit row grow with it. A label file may hold many, a stray label may not.
MAX_CLASSES = 100_000


def human(nbytes: float) -> str:
    """Bytes in words: '51.5 GB'."""
    if nbytes != nbytes:  # NaN
        return "an unknown number of bytes"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def check_bytes(what: str, value: object, nbytes: float, limit: float = MAX_BATCH_BYTES, hint: str = "") -> None:
    """Refuse ``what`` = ``value`` when it asks for more than ``limit`` bytes (``nbytes``; NaN is refused too)."""
    if not nbytes <= limit:
        raise EdgeKDError(f"{what} {value}: it asks for {human(nbytes)} of memory, more than the limit of "
                          f"{human(limit)}{'; ' + hint if hint else ''}")


def batch_bytes(batch: int, channels: int, height: int, width: int, itemsize: int = 4) -> int:
    """The bytes of one float batch of (batch, channels, height, width)."""
    return int(batch) * int(channels) * int(height) * int(width) * int(itemsize)


def geometry_problem(height: int, width: int, crop_pct: Optional[float]) -> Optional[str]:
    """Why (height, width) at ``crop_pct`` is not a geometry edgekd can resize to, or None.

    The shorter side is resized to ``side / crop_pct`` (the longer one at least as much): that square alone
    must stay within MAX_RESIZE_PIXELS, and crop_pct must be a finite number in (0, 1]."""
    if crop_pct is None:
        return None
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
        return f"crop_pct {crop_pct!r} is not a number in (0, 1]"
    resized = math.floor(height / crop_pct) * math.floor(width / crop_pct)
    if resized > MAX_RESIZE_PIXELS:
        return (f"crop_pct {crop_pct!r} at {height}x{width} resizes every image to at least "
                f"{math.floor(height / crop_pct)}x{math.floor(width / crop_pct)} pixels ({resized:.3g}; at most "
                f"{MAX_RESIZE_PIXELS / 1e6:.0f} megapixels)")
    return None


def check_geometry(height: int, width: int, crop_pct: Optional[float], where: str) -> None:
    """EdgeKDError naming ``where`` (--crop-pct, a manifest) when ``geometry_problem`` finds one."""
    problem = geometry_problem(height, width, crop_pct)
    if problem:
        raise EdgeKDError(f"{where}: {problem}")


def check_classes(count: int, where: str, limit: int = MAX_CLASSES) -> None:
    """Refuse a class count above ``limit`` (a model head and every logit row are that wide)."""
    if not 1 <= count <= limit:
        raise EdgeKDError(f"{where}: {count} classes, at most {limit} (each is a column of the model's head "
                          "and of every logit row)")
