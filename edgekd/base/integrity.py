"""Derived files that prove themselves: a checksummed index for a folder of files edgekd wrote and reads back.

A store (the teacher cache; later an image store, a latency table, a search's state) keeps ``index.json``
beside its files: a description of what the files hold (whatever identifies them: a teacher's sha256, the
data's fingerprint, shapes, dtypes) and, per file, its size and BLAKE2b digest. Before a file is used, its
bytes are checked against the index; a file the index does not list, or whose bytes differ, is never trusted.

API (every name relative to ``folder``; the index is written atomically, so a reader never sees half of one):

- ``Index.open(folder, description, name="index.json")`` -> Index: reads ``folder/NAME`` (a store may keep
  its description file as the index: the teacher cache's ``meta.json``). A missing index, or one whose
  description differs from ``description``, gives an empty index for ``description`` (its files are then
  unproven); an unreadable index is treated the same way (``problem`` says why).
- ``index.record(name)``: hash ``folder/name`` (a regular file) and write the index with it; ``index.save()``
  writes it as it is (the description before any file).
- ``read_description(path)`` -> the description an index file records (or None when it is not an index).
- ``index.check(name)`` -> None or a one-line reason: the file is listed, regular, of the recorded size and
  digest. ``index.forget(name)`` drops an entry (before a file is rewritten).
- ``digest(path)``: the BLAKE2b hex digest of a file, read in 1 MiB blocks.

The caller decides what a failed check means: rebuild the file (a cache) or refuse in one line (a store that
cannot be rebuilt).
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

from .files import NotRegularFile, atomic_write, require_regular
from .jsonrec import read_json

INDEX = "index.json"
FORMAT = 1
MAX_INDEX_BYTES = 16 * 1024 ** 2


def digest(path: str, chunk: int = 1 << 20) -> str:
    """BLAKE2b (32-byte) hex digest of a file: fast, and a replaced byte anywhere changes it."""
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """One file of an index: its size and BLAKE2b digest when it was recorded."""

    bytes: int
    blake2b: str


@dataclass(frozen=True)
class StoredIndex:
    """An index file as stored (read by ``edgekd.base.jsonrec``); ``files`` holds each entry as it was found."""

    format: Optional[int] = None
    description: Any = None
    files: Optional[Dict[str, Any]] = None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def read_record(path: str) -> Any:
    """The JSON value of an index file, bounded (a regular file of at most MAX_INDEX_BYTES); ValueError in a few
    words when it cannot be read (NotRegularFile is a ValueError too)."""
    try:
        size = require_regular(path, "index").st_size
        if size > MAX_INDEX_BYTES:
            raise ValueError(f"{size} bytes, at most {MAX_INDEX_BYTES}")
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise ValueError(e.strerror or str(e)) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_description(path: str) -> Any:
    """The description an index file records, or None when it is not a checksummed index (ValueError when it
    cannot be read at all)."""
    stored = read_json(StoredIndex, read_record(path))
    return stored.description if stored is not None and stored.format == FORMAT else None


class Index:
    """The checksummed index of one folder of derived files (see the module's docstring)."""

    def __init__(self, folder: str, description: Any, files: Optional[Dict[str, FileEntry]] = None,
                 problem: Optional[str] = None, name: str = INDEX) -> None:
        self.folder, self.description, self.name = folder, description, name
        self.files: Dict[str, FileEntry] = dict(files or {})
        self.problem = problem  # why an index on disk was not taken (None: taken, or there was none)

    @classmethod
    def open(cls, folder: str, description: Any, name: str = INDEX) -> "Index":
        """The folder's index when it describes ``description``; else an empty one (``problem`` says why)."""
        path = os.path.join(folder, name)
        if not os.path.lexists(path):
            return cls(folder, description, name=name)
        try:
            stored = read_json(StoredIndex, read_record(path))
        except ValueError as e:
            return cls(folder, description, problem=f"its {name} cannot be read ({str(e)[:120]})", name=name)
        if stored is None or stored.files is None or stored.format != FORMAT:
            return cls(folder, description, problem=f"its {name} is not a checksummed index", name=name)
        if _canonical(stored.description) != _canonical(description):
            return cls(folder, description, problem=f"its {name} describes other contents", name=name)
        entries = {n: read_json(FileEntry, e) for n, e in stored.files.items()}
        return cls(folder, description, {n: e for n, e in entries.items() if e is not None}, name=name)

    def save(self) -> None:
        """Write the index as it is (atomically)."""
        self._write()

    def _write(self) -> None:
        files = {n: asdict(e) for n, e in self.files.items()}
        record = asdict(StoredIndex(FORMAT, self.description, files))

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(_canonical(record) + "\n")

        atomic_write(os.path.join(self.folder, self.name), write)

    def record(self, name: str) -> None:
        """Hash ``name`` as it is now and write the index with it."""
        path = os.path.join(self.folder, name)
        st = require_regular(path, "derived file")
        self.files[name] = FileEntry(st.st_size, digest(path))
        self._write()

    def forget(self, name: str) -> None:
        """Drop ``name`` from the index (before its file is rewritten or removed)."""
        if self.files.pop(name, None) is not None:
            self._write()

    def check(self, name: str) -> Optional[str]:
        """None when ``name`` is listed and its bytes are those recorded; else why not, in a few words."""
        entry = self.files.get(name)
        if entry is None:
            return f"{name} is not in the folder's checksummed {self.name}"
        path = os.path.join(self.folder, name)
        try:
            st = require_regular(path, "derived file")
        except NotRegularFile as e:
            return str(e)
        if st.st_size != entry.bytes:
            return f"{name} holds {st.st_size} bytes, {entry.bytes} were written"
        if digest(path) != entry.blake2b:
            return f"{name} does not match its checksum (its contents changed after edgekd wrote it)"
        return None
