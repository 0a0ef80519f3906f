"""edgekd: distill a compact vision student, export it, and benchmark it honestly."""

__version__ = "0.1.0"

from .base.errors import EdgeKDError, Interrupted  # noqa: E402 (after __version__, which base/outdir.py reads)

__all__ = ["EdgeKDError", "Interrupted", "__version__"]
