"""Output folders: nothing lost, nothing mixed.

- An output never overwrites an input: a command whose --out holds one of its inputs (where the run
  would replace it) is refused.
- ``--force`` replaces only what carries edgekd's mark, never by name: a run folder's ``.edgekd`` marker
  lists the files its run wrote (only those are set aside; a folder without it is refused; a name the
  command writes that the marker does not list is refused); a bundle folder (or DIR.zip) is replaced only
  when its manifest.json lists every file in it. The earlier run's outputs are set aside and put back if
  the new run fails.
- One run at a time: a run folder is locked (``fcntl.flock`` on ``.edgekd.lock``, released by the
  kernel when the process dies, so a killed run leaves no stale lock), a bundle folder by
  ``.NAME.edgekd.lock`` beside it; a second run into it is refused with the holder's pid.
- Temporary files and folders are named ``[.]edgekd-tmp-<pid>-<host>-...``: removed on failure, and those
  of a process that no longer exists (a SIGKILLed run) are removed by the next run.
- A failed run (not an interrupted one, which stays resumable) leaves the folder as it found it.
"""

import json
import logging
import os
import re
import shutil
import stat
import tempfile
from typing import Any, Dict, Iterable, List, Literal, Optional, Set, Tuple

from .. import EdgeKDError, Interrupted, __version__
from .files import TMP, atomic_write, host_tag, open_regular, temp_prefix  # noqa: F401  (temp_prefix: re-exported)

log = logging.getLogger(__name__)

MARKER = ".edgekd"
LOCK = ".edgekd.lock"
_TMP_NAME = re.compile(r"^\.?" + TMP + r"(\d+)-([a-z0-9]*)-")


# Every name each command may write into its folder. A run refuses a folder where one of these names is a file
# edgekd did not write; the marker lists what a run did write, and --force sets aside only what the marker lists.
OUTPUTS = {
    "train": ("model.pt", "metrics.json", "config.yaml", "model.state.pt"),
    "distill": ("student.pt", "teacher.pt", "metrics.json", "config.yaml", "student.state.pt", "teacher.state.pt"),
    "quantize": ("student-qat.pt", "metrics.json", "config.yaml", "qat.state.pt", "quantizers.json", "qat.before.json"),
    "bench": ("results.json", "results.csv", "report.md", "accuracy_vs_latency.png", "latency.png", "profile.png",
              "compare.md"),
}
ALL_OUTPUTS = frozenset(n for names in OUTPUTS.values() for n in names)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else
        return True
    return True


def clean_stale(folder: str) -> None:
    """Remove edgekd's temporary files and folders in ``folder`` whose process is gone."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = _TMP_NAME.match(name)
        if not m or m.group(2) != host_tag() or _alive(int(m.group(1))):
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


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def refuse_inputs_inside(out: str, inputs: Iterable[Tuple[str, Optional[str]]],
                         replaced: Optional[Iterable[str]] = None) -> None:
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


def check_writable(out: str) -> None:
    """Refuse an --out that is a file, or that cannot be created or written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise EdgeKDError(f"output path {out!r} is a file, not a folder")
    existing = out
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing.rstrip(os.sep)) or "."
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise EdgeKDError(f"output folder {out!r} is not writable ({existing!r} does not allow it); choose another --out")


def _contents(out: str) -> List[str]:
    """The folder's entries that count: not the lock, the marker, or stale temporaries."""
    if not os.path.isdir(out):
        return []
    return sorted(n for n in os.listdir(out) if n not in (LOCK, MARKER) and not _TMP_NAME.match(n))


# The bundle manifest's name (edgekd.bundle.checks.MANIFEST_FILE, which this layer sits below; a test
# keeps the two equal).
BUNDLE_MANIFEST = "manifest.json"


def read_marker(folder: str) -> Optional[Dict[str, Any]]:
    """The run folder's marker as a dict ({command, edgekd, files}), or None where there is none."""
    path = os.path.join(folder, MARKER)
    if not os.path.isfile(path) or os.path.islink(path):
        return None
    try:
        with open(path) as f:
            marker = json.loads(f.read(1 << 20))
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested past json's limit
        return None
    return marker if isinstance(marker, dict) else None


def entry_kind(path: str) -> str:
    """'file' (a regular file), 'folder' (a real folder, not a link to one) or 'other' (links, FIFOs, ...)."""
    try:
        st = os.lstat(path)
    except OSError:
        return "missing"
    return "folder" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"


def owned_kinds(folder: str) -> Dict[str, str]:
    """{name: kind} of what edgekd's marker in ``folder`` says an edgekd run wrote. A marker from before markers
    listed files names its command's outputs; one from before they recorded kinds gives each name the kind
    both its command writes and a run could have left: 'file' (every name in OUTPUTS is a file)."""
    marker = read_marker(folder)
    if marker is None:
        return {}
    files = marker.get("files")
    if not isinstance(files, list):
        files = list(OUTPUTS.get(str(marker.get("command")), ()))
    given = marker.get("kinds")
    kinds: Dict[str, Any] = given if isinstance(given, dict) else {}
    return {n: (kinds[n] if kinds.get(n) in ("file", "folder") else "file") for n in files if isinstance(n, str)}


def owned(folder: str) -> Set[str]:
    """The names in ``folder`` that edgekd's marker says an edgekd run wrote and that still are what it wrote
    (the same kind: a user's folder named like one of the run's files is never edgekd's)."""
    return {n for n, kind in owned_kinds(folder).items() if entry_kind(os.path.join(folder, n)) == kind}


def marker_command(folder: str) -> Optional[str]:
    """The command (train, distill, ...) whose run the marker in ``folder`` records, or None."""
    marker = read_marker(folder)
    command = marker.get("command") if marker else None
    return command if isinstance(command, str) else None


def bundle_problem(folder: str) -> Optional[str]:
    """Why ``folder`` is not a bundle edgekd wrote (its manifest.json lists every file in it), else None."""
    try:  # stat before open: a FIFO named manifest.json would block the open for ever
        with open_regular(os.path.join(folder, BUNDLE_MANIFEST), "bundle manifest", "r") as f:
            files = json.loads(f.read(16 << 20)).get("files")
    except (OSError, ValueError, AttributeError, RecursionError):  # NotRegularFile is a ValueError
        return "it has no readable manifest.json"
    if not isinstance(files, dict):
        return "its manifest.json lists no files"
    extra = sorted(n for n in os.listdir(folder) if n not in files and n != BUNDLE_MANIFEST)
    if extra:
        return "its manifest does not list " + ", ".join(extra)[:160]
    return None


def _not_ours(out: str, names: List[str]) -> EdgeKDError:
    shown = ", ".join(names)[:160]
    return EdgeKDError(f"output folder {out!r} holds {shown}, which edgekd did not write; --force only replaces "
                       "edgekd's own outputs: move them or choose another --out")


def check_contents(out: str, force: bool, bundle: bool = False, resume: bool = False,
                   command: Optional[str] = None) -> None:
    """Refuse a non-empty ``out`` without --force, and with --force anything in it that edgekd did not write:
    a bundle folder must be exactly what its manifest lists; a run folder needs edgekd's marker, and none of
    the names ``command`` writes may be a file the marker does not list (other files are left alone)."""
    names = _contents(out)
    if not names or resume:
        return
    if not force:
        hint = "" if bundle else f", or --resume {out}"
        raise EdgeKDError(f"output folder {out!r} is not empty; pass --force to overwrite it or choose another "
                          f"--out{hint}")
    if bundle:
        problem = bundle_problem(out)
        if problem:
            raise EdgeKDError(f"output folder {out!r} was not written by edgekd (it holds {', '.join(names)[:120]}): "
                              f"{problem}; --force only replaces edgekd's own outputs: move them or choose another "
                              "--out")
        return
    if read_marker(out) is None:
        raise EdgeKDError(f"output folder {out!r} was not written by edgekd (it holds {', '.join(names)[:120]}): it "
                          f"has no {MARKER} marker; --force only replaces edgekd's own outputs: choose another --out")
    writes = OUTPUTS.get(command, ALL_OUTPUTS) if command is not None else ALL_OUTPUTS
    clash = [n for n in names if n in writes and n not in owned(out)]
    if clash:  # the user's own files first: they are what would be lost
        raise _not_ours(out, clash)
    wrote = marker_command(out)
    if command is not None and wrote is not None and wrote != command:
        raise EdgeKDError(f"output folder {out!r} holds a run of edgekd {wrote[:40]!r}; edgekd {command} "
                          "never replaces another command's run: choose another --out")


def prepare_bundle_out(out: str, force: bool, zip_too: bool, inputs: List[Tuple[str, Optional[str]]]) -> None:
    """Export's checks before any work: no input inside the bundle folder it replaces, a folder that
    is empty or (with --force) an edgekd bundle, DIR.zip likewise; stale temporaries removed."""
    refuse_inputs_inside(out, inputs)
    check_writable(out)
    check_contents(out, force, bundle=True)
    if zip_too:
        check_zip(os.path.abspath(out).rstrip(os.sep) + ".zip", force)
    clean_stale(os.path.dirname(os.path.abspath(out)))
    clean_stale(tempfile.gettempdir())


class BundleFolder:
    """``with BundleFolder(out, force, zip_too, inputs):`` export's bundle folder, checked and locked for the
    whole export. The bundle folder itself is swapped whole when it is published, so the lock is a file
    beside it (``.NAME.edgekd.lock``), removed when the export ends; a second export into the same folder is
    refused at once with the holder's pid."""

    def __init__(self, out: str, force: bool, zip_too: bool, inputs: List[Tuple[str, Optional[str]]]) -> None:
        self.out, self.force, self.zip_too, self.inputs = out, force, zip_too, inputs
        name = os.path.basename(os.path.normpath(os.path.abspath(out)))
        self.lock = os.path.join(os.path.dirname(os.path.abspath(out).rstrip(os.sep)), f".{name}{LOCK}")
        self.fd: Optional[int] = None

    def __enter__(self) -> "BundleFolder":
        refuse_inputs_inside(self.out, self.inputs)
        check_writable(self.out)
        os.makedirs(os.path.dirname(self.lock), exist_ok=True)
        self.fd = _take_lock(self.lock, self.out, "export")
        try:
            prepare_bundle_out(self.out, self.force, self.zip_too, self.inputs)
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> Literal[False]:
        self._release()
        return False

    def _release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.lock)  # while still held: a run that opens it after this takes a new file
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


def _take_lock(path: str, out: str, command: str) -> int:
    """An exclusive flock on ``path`` (created if needed), with this process named in it; refused in one
    line naming the holder. A lock file removed by its holder between our open and flock is taken again."""
    import fcntl

    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a process that just started"
            os.close(fd)
            raise EdgeKDError(f"output folder {out!r} is in use by another edgekd run ({holder}); wait for it "
                              "to finish or choose another --out") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}, edgekd {command}\n".encode())
            return fd
        os.close(fd)
    raise EdgeKDError(f"output folder {out!r} is in use by another edgekd run; choose another --out")


def check_zip(path: str, force: bool) -> None:
    """Export's DIR.zip: refuse to replace one without --force, or one that is not an edgekd bundle."""
    import zipfile

    if not os.path.lexists(path):
        return
    if not force:
        raise EdgeKDError(f"{path!r} already exists; pass --force to replace it or choose another --out")
    try:  # ours: one top folder holding a manifest.json that lists every other member (a regular file: stat first)
        with open_regular(path, "bundle zip") as handle, zipfile.ZipFile(handle) as z:
            names = z.namelist()
            top = {n.split("/", 1)[0] for n in names}
            manifest = f"{next(iter(top))}/{BUNDLE_MANIFEST}" if len(top) == 1 else None
            small = manifest is not None and manifest in names and z.getinfo(manifest).file_size < 16 << 20
            files = json.loads(z.read(manifest)).get("files") if small and manifest else None
            ours = isinstance(files, dict) and {n.split("/", 1)[1] for n in names if n != manifest} <= set(files)
    except (OSError, ValueError, AttributeError, IndexError, KeyError, zipfile.BadZipFile):
        ours = False
    if not ours or not os.path.isfile(path):
        raise EdgeKDError(f"{path!r} is not a bundle zip written by edgekd; --force only replaces edgekd's own "
                          "outputs: choose another --out")


class RunFolder:
    """``with RunFolder(out, command, force, resume):`` the folder of a train, distill or bench run:
    checked, locked, marked; set back as it was if the run fails."""

    def __init__(self, out: str, command: str, force: bool = False, resume: bool = False) -> None:
        self.out, self.command, self.force, self.resume = out, command, force, resume
        self.fd: Optional[int] = None
        self.aside: Optional[str] = None
        self.previous: Optional[Dict[str, Any]] = None
        self.before: Set[str] = set()
        self.created = self.lock_created = False
        self.mine: Set[str] = set()  # what the marker lists: a resumed run's earlier files, then what this run writes

    def __enter__(self) -> "RunFolder":
        check_writable(self.out)
        clean_stale(tempfile.gettempdir())
        self.created = not os.path.isdir(self.out)
        self.before = set() if self.created else set(os.listdir(self.out))
        os.makedirs(self.out, exist_ok=True)
        try:
            self._lock()
            clean_stale(self.out)
            self.before = {n for n in self.before if os.path.lexists(os.path.join(self.out, n))}
            check_contents(self.out, self.force, resume=self.resume, command=self.command)
            self.previous = read_marker(self.out)
            self.mine = owned(self.out) if self.resume else set()
            if self.force and not self.resume:
                self._set_aside()
            self._mark()
        except BaseException:
            self._undo()
            raise
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> Literal[False]:
        if kind is None or issubclass(kind, (Interrupted, KeyboardInterrupt)):
            if self.aside:  # the new run replaced the old one (an interrupted run stays resumable)
                shutil.rmtree(self.aside, ignore_errors=True)
            try:  # the marker lists exactly what edgekd wrote here: what --force may replace later
                self._mark(self._written())
            finally:
                self._unlock()
        else:
            self._undo()
        return False

    def _lock(self) -> None:
        path = os.path.join(self.out, LOCK)
        self.lock_created = not os.path.exists(path)
        self.fd = _take_lock(path, self.out, self.command)

    def _unlock(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None

    def _written(self) -> List[str]:
        """The names this run (and a run it resumed) wrote: what the marker listed, and what is new here."""
        here = set(_contents(self.out))
        return sorted(n for n in here if n in self.mine or n not in self.before)

    def _mark(self, files: Optional[Iterable[str]] = None) -> None:
        """Write the marker; while the run goes on it lists every name the command may write (a killed run's
        files stay edgekd's), at the end exactly what it wrote."""
        if files is None:
            files = sorted(self.mine | set(OUTPUTS.get(self.command, ())))
            self.mine = set(files)
        kinds = {n: entry_kind(os.path.join(self.out, n)) for n in files}
        kinds = {n: (k if k in ("file", "folder") else "file") for n, k in kinds.items()}  # not yet written: a file
        self._write_marker({"command": self.command, "edgekd": __version__, "files": list(files), "kinds": kinds})

    def _write_marker(self, marker: Dict[str, Any]) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                json.dump(marker, f)
                f.write("\n")

        atomic_write(os.path.join(self.out, MARKER), write)

    def _set_aside(self) -> None:
        """Move the earlier run's outputs into a hidden folder: deleted when this run succeeds, put back
        when it fails (and, after a SIGKILL, removed by the next run as a stale temporary)."""
        mine = owned(self.out)
        names = [n for n in os.listdir(self.out) if n in mine and n not in (LOCK, MARKER) and not _TMP_NAME.match(n)]
        if not names:
            return
        aside = self.aside = tempfile.mkdtemp(dir=self.out, prefix="." + temp_prefix("previous"))
        for name in names:
            os.replace(os.path.join(self.out, name), os.path.join(aside, name))

    def _undo(self) -> None:
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
                    if name in OUTPUTS.get(self.command, ALL_OUTPUTS) or name == MARKER \
                            or (name == LOCK and self.lock_created) or _TMP_NAME.match(name):
                        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
                if self.previous is not None:  # the earlier run's marker, listing what is put back
                    self._write_marker(self.previous)
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
