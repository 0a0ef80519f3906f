"""edgekd's error types, in the bottom layer so that every layer (the bundle layer included) can raise them."""


class EdgeKDError(Exception):
    """An error in the user's input or environment, shown as one line with exit code 2."""


class Interrupted(EdgeKDError):
    """Ctrl-C during training: the last complete epoch is on disk and the run can be resumed."""


class BundleError(EdgeKDError):
    """A bundle that cannot be used here; the message says why and what to install.

    The device runner (edgekd.bundle.assemble's file, which stands alone on a device) defines its own
    BundleError on Exception."""
