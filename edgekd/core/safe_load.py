"""The one loader for every file that can carry a pickle: checkpoints, training states, weights files,
teacher caches, TorchScript and ``torch.export`` (.pt2) archives.

No code path of edgekd unpickles with ``weights_only=False`` (tests/test_hostile_files.py checks that no
other module calls ``torch.load``, ``torch.jit.load``, ``torch.export.load`` or ``pickle``): a pickle can
name any Python callable, so loading one from a file is running the file's code. A file that cannot be
read without it is refused in one line that says why. NNCF's quantizer state travels as JSON inside a
checkpoint (edgekd/core/quantize.py), so it passes through here too.
"""

import contextlib
import os
import zipfile

import torch

from .. import EdgeKDError

PICKLED = "it holds pickled Python objects, which edgekd never loads (they could run code)"


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _reason(e):
    """Why torch.load(weights_only=True) refused a file, without torch's advice to retry unsafely."""
    text = str(e)
    if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text or "Unsupported operand" in text:
        return PICKLED
    return "not a file written by torch.save, or a damaged one"


def _need_file(path, what):
    if not os.path.isfile(path):
        raise EdgeKDError(f"{what} {path!r} does not exist or is not a file")


class Refused(EdgeKDError):
    """A file the loader will not read; ``reason`` says why without the path."""

    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


def torch_file(path, what="file"):
    """``torch.load(path, weights_only=True)`` on the CPU; a refusal is one line naming ``what``."""
    _need_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise Refused(f"cannot read {what} {path!r}: {_reason(e)}", _reason(e)) from None


def safetensors_file(path, what="weights file"):
    """A .safetensors file (no pickle in the format); damaged headers are one line, not a traceback."""
    _need_file(path, what)
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise EdgeKDError("reading .safetensors files needs the safetensors package: pip install safetensors") from None
    try:
        return load_file(path)
    except Exception as e:  # SafetensorError, OSError, ...
        raise EdgeKDError(f"cannot read {what} {path!r}: not a valid .safetensors file ({_first_line(e)})") from None


def weights_file(path, what="weights file"):
    """What a weights file holds (.safetensors, else a torch file read with weights_only=True)."""
    if path.lower().endswith(".safetensors"):
        return safetensors_file(path, what)
    return torch_file(path, what)


def torchscript(path, what="TorchScript file"):
    """A TorchScript module: its archive is read by torch's C++ unpickler, which rebuilds only tensors and
    TorchScript classes from the archive's own code (it cannot import or call Python)."""
    _need_file(path, what)
    try:
        return torch.jit.load(path, map_location="cpu")
    except Exception as e:
        raise EdgeKDError(f"cannot load {what} {path!r}: {_first_line(e)[:300]}") from None


# members of a .pt2 archive that torch.export.load unpickles with plain pickle or TorchScript's object
# pickler whatever weights_only says (opaque Python objects, torchbind objects): refused, never read
_UNSAFE_PT2 = ("/data/constants/custom_obj_", "/data/constants/opaque_obj_")


@contextlib.contextmanager
def _weights_only_everywhere():
    """torch.export.load retries a pickle that weights_only=True refused with weights_only=False (and reads
    pickled weights and constants with weights_only=False outright); torch honours this variable over the
    argument, so every torch.load inside it stays weights-only."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def exported_program(path, what="torch.export file"):
    """A ``torch.export`` program (.pt2) whose pickled members are read weights-only; an archive that needs
    more (pickled Python objects) is refused in one line."""
    _need_file(path, what)
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise EdgeKDError(f"cannot load {what} {path!r}: not a .pt2 archive ({_first_line(e)})") from None
    unsafe = [n for n in names if any(part in "/" + n for part in _UNSAFE_PT2)]
    if unsafe:
        raise EdgeKDError(f"cannot load {what} {path!r}: member {unsafe[0]!r} is a pickled Python object, which "
                          "edgekd never loads (it could run code); export the model without custom objects")
    try:
        with _weights_only_everywhere():
            return torch.export.load(path)
    except Exception as e:
        text = str(e)
        if "weights_only" in text or "GLOBAL" in text or "Unsupported global" in text:
            raise EdgeKDError(f"cannot load {what} {path!r}: {PICKLED}") from None
        raise EdgeKDError(f"cannot load {what} {path!r}: {_first_line(e)[:300]}") from None
