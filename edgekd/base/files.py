"""Files written so that no reader ever sees half of one."""

import os
import re
import tempfile

TMP = "edgekd-tmp-"


def host_tag():
    """This machine, in temporary names: a pid means something only on the machine that made it
    (a shared or network folder may hold another machine's live temporaries)."""
    import socket

    return re.sub(r"[^a-z0-9]", "", socket.gethostname().lower())[:16]


def temp_prefix(kind=""):
    """The prefix of a temporary file or folder of this process (pass a leading '.' to hide it)."""
    return f"{TMP}{os.getpid()}-{host_tag()}-{kind + '-' if kind else ''}"


def atomic_write(path, write):
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


def _fsync_folder(folder):
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


def _relative(path, folder):
    return os.path.relpath(path, os.path.abspath(folder))


def spec_for_file(spec, folder):
    """A spec (data, teacher) as a file in ``folder`` records it: a path in it (``PATH`` or ``KIND:PATH``, e.g.
    ``imagefolder:/data/x``) relative to ``folder``."""
    if not isinstance(spec, str):
        return spec
    kind, sep, rest = spec.partition(":")
    if sep and kind.isalnum() and os.path.isabs(rest):
        return f"{kind}:{_relative(rest, folder)}"
    return _relative(spec, folder) if os.path.isabs(spec) else spec


def spec_from_file(spec, folder):
    """A data spec read from a file in ``folder`` (spec_for_file's inverse; absolute specs of older files stay)."""
    for kind in FOLDER_SPECS:
        if isinstance(spec, str) and spec.startswith(kind) and not os.path.isabs(spec[len(kind):]):
            return kind + os.path.normpath(os.path.join(os.path.abspath(folder), spec[len(kind):]))
    return spec


def path_from_file(path, folder):
    """A path read from a file in ``folder``: relative ones are relative to that folder."""
    if isinstance(path, str) and path and not os.path.isabs(path) and "://" not in path:
        return os.path.normpath(os.path.join(os.path.abspath(folder), path))
    return path


def portable(record, folder):
    """A copy of ``record`` (metrics, a manifest) with the machine's absolute paths made relative to ``folder``:
    the values of PATH_KEYS that are absolute paths, and image-folder data specs under SPEC_KEYS."""
    if isinstance(record, dict):
        out = {}
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
