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
