"""edgekd.base.jsonrec: JSON read into dataclasses at the edge, by field names and types; and the records built on
it (a run folder's marker, a checksummed index) refusing what is not what they hold."""

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

from edgekd.base.jsonrec import read_json, read_list


@dataclass(frozen=True)
class Entry:
    bytes: int
    blake2b: str


@dataclass(frozen=True)
class Record:
    name: Optional[str] = None
    ratio: float = 0.5
    entries: Dict[str, Entry] = field(default_factory=dict)
    sizes: List[int] = field(default_factory=list)
    flags: Set[str] = field(default_factory=set)


def test_fields_are_read_by_name_and_type():
    r = read_json(Record, {"name": "a", "ratio": 2, "entries": {"x": {"bytes": 3, "blake2b": "ff"}}, "sizes": [1, 2],
                           "flags": ["avx2", "avx2"], "unknown": 1})
    assert r == Record("a", 2.0, {"x": Entry(3, "ff")}, [1, 2], {"avx2"}) and isinstance(r.ratio, float)
    # another type reads as the field's default; a field without one refuses the record
    assert read_json(Record, {"name": 7, "ratio": "x", "sizes": [1, "2"], "entries": {"x": {"bytes": 1}}}) == Record()
    assert read_json(Entry, {"bytes": True, "blake2b": "ff"}) is None  # a bool is not a size
    assert read_json(Entry, {"bytes": 1}) is None and read_json(Entry, [1, "ff"]) is None
    assert read_json(Record, {"name": None}) == Record()
    assert read_list(Entry, [{"bytes": 1, "blake2b": "a"}, {"bytes": "1"}, 5]) == [Entry(1, "a")]
    assert read_list(Entry, {"bytes": 1}) == []


def test_a_marker_and_an_index_read_only_what_they_hold(tmp_path):
    from edgekd.base.integrity import Index
    from edgekd.base.marker import MARKER, read_marker

    (tmp_path / MARKER).write_text(json.dumps({"command": "fit", "files": ["bundle", "report.md", 3],
                                                "kinds": {"report.md": "socket"}}))
    marker = read_marker(str(tmp_path))
    assert marker is not None and marker.command == "fit"
    assert marker.kinds == {"bundle": "folder", "report.md": "file"}  # the kind fit writes each as
    (tmp_path / MARKER).write_text("[1, 2]")
    assert read_marker(str(tmp_path)) is None
    (tmp_path / "a.bin").write_bytes(b"x")
    Index.open(str(tmp_path), {"d": 1}).record("a.bin")
    stored = json.loads((tmp_path / "index.json").read_text())
    stored["files"]["b.bin"] = {"bytes": "1", "blake2b": "00"}  # an entry that is not one: never trusted
    (tmp_path / "index.json").write_text(json.dumps(stored))
    index = Index.open(str(tmp_path), {"d": 1})
    assert index.check("a.bin") is None and "not in the folder's checksummed" in index.check("b.bin")
