"""edgekd: distill a compact vision student, export it, and benchmark it honestly."""

__version__ = "0.1.0"


class EdgeKDError(Exception):
    """An error in the user's input or environment, shown as one line with exit code 2."""


class Interrupted(EdgeKDError):
    """Ctrl-C during training: the last complete epoch is on disk and the run can be resumed."""

