"""Output folders: nothing lost, nothing mixed.

- An output never overwrites an input: a command whose --out holds one of its inputs (where the run
  would replace it) is refused.
- ``--force`` replaces only what edgekd wrote: a folder edgekd made carries a small ``.edgekd``
  marker naming the command (a bundle is recognised by its manifest.json); a non-empty folder
  without it, holding files edgekd does not write, is refused even with ``--force``. The earlier
  run's outputs are set aside and put back if the new run fails.
- One run at a time: a run folder is locked (``fcntl.flock`` on ``.edgekd.lock``, released by the
  kernel when the process dies, so a killed run leaves no stale lock); a second run into it is
  refused with the holder's pid.
- Temporary files and folders are named ``[.]edgekd-tmp-<pid>-<host>-...``: removed on failure, and those
  of a process that no longer exists (a SIGKILLed run) are removed by the next run.
- A failed run (not an interrupted one, which stays resumable) leaves the folder as it found it.
"""

import json
import logging
import os
import re
import shutil
import tempfile

from .. import EdgeKDError, Interrupted, __version__

log = logging.getLogger(__name__)

MARKER = ".edgekd"
LOCK = ".edgekd.lock"
TMP = "edgekd-tmp-"
_TMP_NAME = re.compile(r"^\.?" + TMP + r"(\d+)-([a-z0-9]*)-")


def _host():
    """This machine, in temporary names: a pid means something only on the machine that made it
    (a shared or network folder may hold another machine's live temporaries)."""
    import socket

    return re.sub(r"[^a-z0-9]", "", socket.gethostname().lower())[:16]

# What each command writes into its folder (a --force run sets these aside, whichever command wrote them).
OUTPUTS = {
    "train": ("model.pt", "metrics.json", "config.yaml", "model.state.pt"),
    "distill": ("student.pt", "teacher.pt", "metrics.json", "config.yaml", "student.state.pt", "teacher.state.pt"),
    "bench": ("results.json", "results.csv", "report.md", "accuracy_vs_latency.png", "latency.png", "compare.md"),
}
ALL_OUTPUTS = frozenset(n for names in OUTPUTS.values() for n in names)


def temp_prefix(kind=""):
    """The prefix of a temporary file or folder of this process (pass a leading '.' to hide it)."""
    return f"{TMP}{os.getpid()}-{_host()}-{kind + '-' if kind else ''}"


def _alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else
        return True
    return True


def clean_stale(folder):
    """Remove edgekd's temporary files and folders in ``folder`` whose process is gone."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = _TMP_NAME.match(name)
        if not m or m.group(2) != _host() or _alive(int(m.group(1))):
            continue
        path = os.path.join(folder, name)
        log.info("removing %s, left by edgekd process %s that no longer runs", path, m.group(1))
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except OSError:  # another run cleaning at the same time, or not ours to remove
            pass


def _real(path):
    return os.path.realpath(os.path.abspath(path))


def refuse_inputs_inside(out, inputs, replaced=None):
    """``inputs`` lists (option, path or None) pairs, e.g. ("CHECKPOINT", "run/student.pt"). Refuse an input
    inside ``out`` that this run replaces: any (``replaced`` None: the whole folder is replaced) or one
    of the names in ``replaced``."""
    root = _real(out)
    for option, path in inputs:
        if not path or not os.path.exists(path):
            continue
        real = _real(path)
        inside = real == root or real.startswith(root + os.sep)
        if inside and (replaced is None or os.path.dirname(real) == root and os.path.basename(real) in replaced):
            raise EdgeKDError(f"{option} {path!r} is inside --out {out!r}, which this run replaces: choose another "
                              "--out (an output never overwrites an input)")


def check_writable(out):
    """Refuse an --out that is a file, or that cannot be created or written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise EdgeKDError(f"output path {out!r} is a file, not a folder")
    existing = out
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing.rstrip(os.sep)) or "."
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise EdgeKDError(f"output folder {out!r} is not writable ({existing!r} does not allow it); choose another --out")


def _contents(out):
    """The folder's entries that count: not the lock, the marker, or stale temporaries."""
    if not os.path.isdir(out):
        return []
    return sorted(n for n in os.listdir(out) if n not in (LOCK, MARKER) and not _TMP_NAME.match(n))


def _is_bundle(folder):
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            return isinstance(json.load(f).get("files"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def check_contents(out, force, bundle=False, resume=False):
    """Refuse a non-empty ``out`` without --force, and with --force one that edgekd did not write."""
    names = _contents(out)
    if not names or resume:
        return
    if not force:
        hint = "" if bundle else f", or --resume {out}"
        raise EdgeKDError(f"output folder {out!r} is not empty; pass --force to overwrite it or choose another "
                          f"--out{hint}")
    ours = os.path.isfile(os.path.join(out, MARKER)) or (_is_bundle(out) if bundle else set(names) <= ALL_OUTPUTS)
    if not ours:
        shown = ", ".join(n for n in names if n not in ALL_OUTPUTS)[:120]
        raise EdgeKDError(f"output folder {out!r} was not written by edgekd (it holds {shown}); --force only "
                          "replaces edgekd's own outputs: choose another --out")


def prepare_bundle_out(out, force, zip_too, inputs):
    """Export's checks before any work: no input inside the bundle folder it replaces, a folder that
    is empty or (with --force) an edgekd bundle, DIR.zip likewise; stale temporaries removed."""
    refuse_inputs_inside(out, inputs)
    check_writable(out)
    check_contents(out, force, bundle=True)
    if zip_too:
        check_zip(os.path.abspath(out).rstrip(os.sep) + ".zip", force)
    clean_stale(os.path.dirname(os.path.abspath(out)))
    clean_stale(tempfile.gettempdir())


def check_zip(path, force):
    """Export's DIR.zip: refuse to replace one without --force, or one that is not an edgekd bundle."""
    import zipfile

    if not os.path.lexists(path):
        return
    if not force:
        raise EdgeKDError(f"{path!r} already exists; pass --force to replace it or choose another --out")
    try:
        with zipfile.ZipFile(path) as z:
            ours = any(n.count("/") == 1 and n.endswith("/manifest.json") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        ours = False
    if not ours or not os.path.isfile(path):
        raise EdgeKDError(f"{path!r} is not a bundle zip written by edgekd; --force only replaces edgekd's own "
                          "outputs: choose another --out")


class RunFolder:
    """``with RunFolder(out, command, force, resume):`` the folder of a train, distill or bench run:
    checked, locked, marked; set back as it was if the run fails."""

    def __init__(self, out, command, force=False, resume=False):
        self.out, self.command, self.force, self.resume = out, command, force, resume
        self.fd = self.aside = None
        self.created = self.lock_created = False

    def __enter__(self):
        check_writable(self.out)
        clean_stale(tempfile.gettempdir())
        self.created = not os.path.isdir(self.out)
        self.before = set() if self.created else set(os.listdir(self.out))
        os.makedirs(self.out, exist_ok=True)
        try:
            self._lock()
            clean_stale(self.out)
            self.before = {n for n in self.before if os.path.lexists(os.path.join(self.out, n))}
            check_contents(self.out, self.force, resume=self.resume)
            if self.force and not self.resume:
                self._set_aside()
            self._mark()
        except BaseException:
            self._undo()
            raise
        return self

    def __exit__(self, kind, exc, tb):
        if kind is None or issubclass(kind, (Interrupted, KeyboardInterrupt)):
            if self.aside:  # the new run replaced the old one (an interrupted run stays resumable)
                shutil.rmtree(self.aside, ignore_errors=True)
            self._unlock()
        else:
            self._undo()
        return False

    def _lock(self):
        import fcntl

        path = os.path.join(self.out, LOCK)
        self.lock_created = not os.path.exists(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a process that just started"
            os.close(fd)
            raise EdgeKDError(f"output folder {self.out!r} is in use by another edgekd run ({holder}); wait for it "
                              "to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, edgekd {self.command}\n".encode())
        self.fd = fd

    def _unlock(self):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None

    def _mark(self):
        from .files import atomic_write

        def write(tmp):
            with open(tmp, "w") as f:
                json.dump({"command": self.command, "edgekd": __version__}, f)
                f.write("\n")

        atomic_write(os.path.join(self.out, MARKER), write)

    def _set_aside(self):
        """Move the earlier run's outputs into a hidden folder: deleted when this run succeeds, put back
        when it fails (and, after a SIGKILL, removed by the next run as a stale temporary)."""
        names = [n for n in os.listdir(self.out) if n in ALL_OUTPUTS]
        if not names:
            return
        self.aside = tempfile.mkdtemp(dir=self.out, prefix="." + temp_prefix("previous"))
        for name in names:
            os.replace(os.path.join(self.out, name), os.path.join(self.aside, name))

    def _undo(self):
        """Leave the folder as this run found it: remove what it wrote, put back what it set aside."""
        try:
            if self.fd is None:  # refused before the lock was ours: another run may be writing here
                if self.lock_created:
                    os.unlink(os.path.join(self.out, LOCK))
            elif not self.resume:
                for name in set(os.listdir(self.out)) - self.before:
                    path = os.path.join(self.out, name)
                    if path == self.aside:
                        continue
                    if name in ALL_OUTPUTS or name == MARKER or (name == LOCK and self.lock_created) \
                            or _TMP_NAME.match(name):
                        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
            if self.aside:
                for name in os.listdir(self.aside):
                    os.replace(os.path.join(self.aside, name), os.path.join(self.out, name))
                os.rmdir(self.aside)
            if self.created and not os.listdir(self.out):
                os.rmdir(self.out)
        except OSError as e:  # never hide the run's own error behind a cleanup one
            log.warning("could not tidy %s after the failure: %s", self.out, e)
        finally:
            self._unlock()
