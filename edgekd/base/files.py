"""Files written so that no reader ever sees half of one, and files read only when they are files.

Reading: every path that comes from a user or from a file edgekd reads back (a manifest, a data folder's
listing, a shard list, a config) goes through ``require_regular(path, what)`` (or ``open_regular``) before it
is opened. It calls ``os.stat`` (never ``open``: opening a FIFO blocks until a writer comes, for ever) and
refuses FIFOs, sockets, character and block devices and folders in one line naming the user's ``what``.
``check_reach`` / ``check_link_loops`` keep a folder walk inside the folder it was given, and
``refuse_inside`` keeps a derived folder (a cache, an output) out of a data folder.
"""

import os
import re
import stat
import tempfile
from typing import IO, Any, Callable, Iterable, Optional

from .. import EdgeKDError

TMP = "edgekd-tmp-"
_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


class NotRegularFile(EdgeKDError, ValueError):
    """A path that is not a regular file (a ValueError too, so --skip-bad-images passes over such an image)."""


def file_kind(mode: int) -> str:
    """What a stat mode is, in words ('a regular file', 'a FIFO (named pipe)', ...)."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def require_regular(path: "str | os.PathLike[str]", what: str, shown: Optional[str] = None) -> os.stat_result:
    """``os.stat(path)`` after refusing anything but a regular file (links are followed), in one line naming
    ``what`` and ``shown`` (the path as the user typed it; default ``path``). Never opens the path."""
    shown = str(path) if shown is None else shown
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        if not os.path.lexists(path):
            raise NotRegularFile(f"{what} {shown!r} does not exist") from None
        raise NotRegularFile(f"{what} {shown!r} cannot be read: {e.strerror} (a link to nothing)") from None
    except OSError as e:  # a dangling link, no permission, a name too long
        raise NotRegularFile(f"{what} {shown!r} cannot be read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(f"{what} {shown!r} is not a regular file (it is {file_kind(st.st_mode)}); edgekd reads "
                             "only regular files")
    return st


def open_regular(path: "str | os.PathLike[str]", what: str, mode: str = "rb", **kwargs: Any) -> IO[Any]:
    """``open(path, mode)`` for reading, after ``require_regular`` (a FIFO named like an image never hangs)."""
    require_regular(path, what)
    return open(path, mode, **kwargs)


def is_inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (real paths: links resolved)."""
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def refuse_inside(path: Optional[str], option: str, folders: Iterable[Optional[str]], what: str = "the data") -> None:
    """Refuse a derived folder (``option`` names it: --teacher-cache, --out) inside a data folder: it would be
    read back as data (a new class of the split, or images of --unlabeled)."""
    if not path:
        return
    for folder in folders:
        if folder and os.path.isdir(folder) and is_inside(path, folder):
            raise EdgeKDError(f"{option} {path!r} is inside {what} {folder!r}: it would be read back as data; "
                              "choose a folder outside it")


def host_tag() -> str:
    """This machine, in temporary names: a pid means something only on the machine that made it
    (a shared or network folder may hold another machine's live temporaries)."""
    import socket

    return re.sub(r"[^a-z0-9]", "", socket.gethostname().lower())[:16]


def temp_prefix(kind: str = "") -> str:
    """The prefix of a temporary file or folder of this process (pass a leading '.' to hide it)."""
    return f"{TMP}{os.getpid()}-{host_tag()}-{kind + '-' if kind else ''}"


def atomic_write(path: str, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` then move the finished file into place, so no reader sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # edgekd's temporary naming: a killed process's leftovers are recognised and removed by the next run
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + temp_prefix(), suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (a crash right after os.replace keeps the new file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Paths that edgekd records in its files (metrics.json, checkpoints, manifests) are relative to the folder of
# the file that records them: a run or a bundle moved to another machine or folder says nothing about the
# machine that made it, and a relative reference (the data, the source checkpoint) still resolves beside it.
PATH_KEYS = ("file", "source", "path", "folder", "checkpoint", "bundle")
SPEC_KEYS = ("data", "spec")
FOLDER_SPEC = "imagefolder:"
FOLDER_SPECS = (FOLDER_SPEC, "webdataset:")  # data specs that name a folder


def _relative(path: str, folder: str) -> str:
    return os.path.relpath(path, os.path.abspath(folder))


def spec_for_file(spec: Any, folder: str) -> Any:
    """A spec (data, teacher) as a file in ``folder`` records it: a path in it (``PATH`` or ``KIND:PATH``, e.g.
    ``imagefolder:/data/x``) relative to ``folder``."""
    if not isinstance(spec, str):
        return spec
    kind, sep, rest = spec.partition(":")
    if sep and kind.isalnum() and os.path.isabs(rest):
        return f"{kind}:{_relative(rest, folder)}"
    return _relative(spec, folder) if os.path.isabs(spec) else spec


def spec_from_file(spec: Any, folder: str) -> Any:
    """A data spec read from a file in ``folder`` (spec_for_file's inverse; absolute specs of older files stay)."""
    for kind in FOLDER_SPECS:
        if isinstance(spec, str) and spec.startswith(kind) and not os.path.isabs(spec[len(kind):]):
            return kind + os.path.normpath(os.path.join(os.path.abspath(folder), spec[len(kind):]))
    return spec


def path_from_file(path: Any, folder: str) -> Any:
    """A path read from a file in ``folder``: relative ones are relative to that folder."""
    if isinstance(path, str) and path and not os.path.isabs(path) and "://" not in path:
        return os.path.normpath(os.path.join(os.path.abspath(folder), path))
    return path


def portable(record: Any, folder: str) -> Any:
    """A copy of ``record`` (metrics, a manifest) with the machine's absolute paths made relative to ``folder``:
    the values of PATH_KEYS that are absolute paths, and image-folder data specs under SPEC_KEYS."""
    if isinstance(record, dict):
        out: dict = {}
        for key, value in record.items():
            if key in PATH_KEYS and isinstance(value, str) and os.path.isabs(value):
                out[key] = _relative(value, folder)
            elif key in SPEC_KEYS and isinstance(value, str):
                out[key] = spec_for_file(value, folder)
            else:
                out[key] = portable(value, folder)
        return out
    if isinstance(record, (list, tuple)):
        return [portable(v, folder) for v in record]
    return record



def rebased(record: Any, old: str, new: str) -> Any:
    """``record`` as written for a file in ``old`` (``portable``), made right for the same file copied to ``new``:
    the relative paths and image-folder data specs that resolve from ``old`` are made relative to ``new``, so a
    bundle copied to another depth still finds its data and its source checkpoint. Other values stay."""
    if isinstance(record, dict):
        out: dict = {}
        for key, value in record.items():
            if key in PATH_KEYS and isinstance(value, str) and value and not os.path.isabs(value) \
                    and "://" not in value and os.path.exists(path_from_file(value, old)):
                out[key] = _relative(path_from_file(value, old), new)
            elif key in SPEC_KEYS and isinstance(value, str):
                out[key] = spec_for_file(spec_from_file(value, old), new)
            else:
                out[key] = rebased(value, old, new)
        return out
    if isinstance(record, (list, tuple)):
        return [rebased(v, old, new) for v in record]
    return record

# --- folder walks that stay inside the folder they were given -----------------------------------------------

SYSTEM_FOLDERS = ("/proc", "/sys", "/dev")  # views of the running system, not folders of images


def _system(real: str) -> bool:
    return any(real == p or real.startswith(p + "/") for p in SYSTEM_FOLDERS)


def check_reach(root: str, what: str, walk: Optional[list] = None) -> None:
    """Refuse a data folder that would be read beyond itself: the file-system root or a system folder
    (/proc, /sys, /dev), or a symbolic link under it leading to the root, to an ancestor of the folder or into
    a system folder (``--unlabeled /proc`` would otherwise read the whole disk through /proc/self/root).
    Links to files and to folders elsewhere are followed as usual. ``walk`` lists the sub-folders to walk
    (default: all of ``root``)."""
    top = os.path.realpath(root)
    if top == os.sep or _system(top):
        where = "the file-system root" if top == os.sep else f"a system folder ({top})"
        raise EdgeKDError(f"{what} {root!r} is {where}, not a folder of images")
    seen = set()
    for start in walk or [root]:
        for folder, dirs, _ in os.walk(start, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:  # a second link to a folder already checked (loops are check_link_loops' refusal)
                dirs[:] = []
                continue
            seen.add(real)
            for d in dirs:
                path = os.path.join(folder, d)
                target = os.path.realpath(path)
                if target == os.sep or top == target or top.startswith(target + os.sep) or _system(target):
                    where = ("the file-system root" if target == os.sep else f"a system folder ({target})"
                             if _system(target) else f"{target!r}, which holds the folder itself")
                    raise EdgeKDError(f"{what} {root!r}: the link {path!r} leads to {where}; edgekd reads nothing "
                                      "outside the folders it is given: remove the link")


def check_link_loops(root: str) -> None:
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
