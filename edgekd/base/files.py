"""Files written so that no reader ever sees half of one."""

import os
import tempfile


def atomic_write(path, write):
    """Call ``write(tmp_path)`` then move the finished file into place, so no reader sees half a file."""
    from .outdir import temp_prefix  # outdir imports this module

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
