"""A run folder's ``.edgekd`` marker: which command's run the folder holds and exactly what that run wrote, so
that ``--force`` replaces only edgekd's own outputs (edgekd.base.outdir keeps the folders; this module says what
is in them). Every name a command may write is in ``OUTPUTS``; the names it writes as folders are in ``FOLDERS``."""

import json
import os
import stat
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Set

from .jsonrec import read_json

MARKER = ".edgekd"

# Every name each command may write into its folder. A run refuses a folder where one of these names is a file
# edgekd did not write; the marker lists what a run did write, and --force sets aside only what the marker lists.
OUTPUTS = {
    "train": ("model.pt", "metrics.json", "config.yaml", "model.state.pt"),
    "distill": ("student.pt", "teacher.pt", "metrics.json", "config.yaml", "student.state.pt", "teacher.state.pt"),
    "quantize": ("student-qat.pt", "metrics.json", "config.yaml", "qat.state.pt", "quantizers.json", "qat.before.json"),
    "bench": ("results.json", "results.csv", "report.md", "accuracy_vs_latency.png", "latency.png", "profile.png",
              "compare.md"),
    # the study's SQLite file comes with its journal: a hot journal left by a kill belongs to that study only
    "fit": ("config.yaml", "study.db", "study.db-journal", "study.db-wal", "study.db-shm", "latency.json", "report.md",
            "trials.csv", "trials.json", "pareto.png", "bundle", "work", "trials", "teacher-cache"),
}
ALL_OUTPUTS = frozenset(n for names in OUTPUTS.values() for n in names)
# The names in OUTPUTS that a run writes as folders (every other name is a file).
FOLDERS = frozenset({"bundle", "work", "trials", "teacher-cache"})


def output_kind(name: str) -> str:
    """The kind a command writes ``name`` as: 'folder' for FOLDERS, else 'file'."""
    return "folder" if name in FOLDERS else "file"


@dataclass(frozen=True)
class StoredMarker:
    """A ``.edgekd`` marker file as stored (read by ``edgekd.base.jsonrec``; a field of another type reads as absent)."""

    command: Optional[str] = None
    edgekd: Optional[str] = None
    files: Optional[List[Any]] = None
    kinds: Optional[Dict[str, Any]] = None


@dataclass(frozen=True)
class Marker:
    """A run folder's ``.edgekd`` marker: the command whose run it is, the edgekd version, and what the run wrote
    (name -> 'file' or 'folder')."""

    command: Optional[str]
    edgekd: Optional[str]
    kinds: Dict[str, str]

    @classmethod
    def from_json(cls, record: Any) -> Optional["Marker"]:
        """The marker of a parsed ``.edgekd`` file (None when it is not a JSON object). One from before markers
        listed files names its command's outputs; one from before they recorded kinds gives each name the kind
        its command writes it as."""
        stored = read_json(StoredMarker, record)
        if stored is None:
            return None
        files = stored.files if stored.files is not None else list(OUTPUTS.get(str(stored.command), ()))
        given = stored.kinds or {}
        kinds = {n: given[n] if given.get(n) in ("file", "folder") else output_kind(n)
                 for n in files if isinstance(n, str)}
        return cls(stored.command, stored.edgekd, kinds)

    def to_json(self) -> Dict[str, Any]:
        """The marker file's JSON object."""
        return asdict(StoredMarker(self.command, self.edgekd, list(self.kinds), dict(self.kinds)))


def read_marker(folder: str) -> Optional[Marker]:
    """The run folder's marker, or None where there is none (or none that reads as one)."""
    path = os.path.join(folder, MARKER)
    if not os.path.isfile(path) or os.path.islink(path):
        return None
    try:
        with open(path) as f:
            return Marker.from_json(json.loads(f.read(1 << 20)))
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested past json's limit
        return None


def entry_kind(path: str) -> str:
    """'file' (a regular file), 'folder' (a real folder, not a link to one) or 'other' (links, FIFOs, ...)."""
    try:
        st = os.lstat(path)
    except OSError:
        return "missing"
    return "folder" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"


def marker_bytes(folder: str) -> Optional[bytes]:
    """The marker file's bytes as they are (None where ``read_marker`` finds no marker)."""
    if read_marker(folder) is None:
        return None
    try:
        with open(os.path.join(folder, MARKER), "rb") as f:
            return f.read(1 << 20)
    except OSError:
        return None


def owned_kinds(folder: str) -> Dict[str, str]:
    """{name: kind} of what edgekd's marker in ``folder`` says an edgekd run wrote (see ``Marker.from_json``)."""
    marker = read_marker(folder)
    return dict(marker.kinds) if marker else {}


def owned(folder: str) -> Set[str]:
    """The names in ``folder`` that edgekd's marker says an edgekd run wrote and that still are what it wrote
    (the same kind: a user's folder named like one of the run's files is never edgekd's)."""
    return {n for n, kind in owned_kinds(folder).items() if entry_kind(os.path.join(folder, n)) == kind}


def marker_command(folder: str) -> Optional[str]:
    """The command (train, distill, ...) whose run the marker in ``folder`` records, or None."""
    marker = read_marker(folder)
    return marker.command if marker else None
