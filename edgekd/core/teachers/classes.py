"""Class order: the teacher's outputs matched to the data's classes by name, picked by index, or (for a
teacher without names) taken by position."""

import difflib
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ... import EdgeKDError
from ...base.jsonrec import record_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassMatch:
    """How the teacher's outputs were matched to the data's classes (the teacher record's ``classes``)."""

    matched: str                           # by name, by index (--teacher-classes), by position
    teacher_outputs: int
    names_from: Optional[str] = None       # by name: where the teacher's names came from
    file: Optional[str] = None             # by index: the --teacher-classes file
    index: Optional[List[int]] = None      # the teacher output of each data class
    teacher_names: Optional[List[str]] = None

    def to_json(self) -> Dict[str, Any]:
        """The record, its provenance (names_from or file) before the outputs as teacher records show it."""
        d = record_dict(self, omit_none=frozenset({"names_from", "file", "index", "teacher_names"}))
        return {"matched": d.pop("matched"), **{k: d.pop(k) for k in ("names_from", "file") if k in d}, **d}


def read_classes_file(path: str) -> Tuple[str, List[Any]]:
    """``--teacher-classes FILE``: ('names', [NAME...]) or ('index', [(INDEX, NAME or None)...]).

    One entry per line; blank lines and lines starting with '#' are skipped. ``NAME`` lines name the
    teacher's outputs in order (as many lines as it has outputs). ``INDEX NAME`` lines pick teacher
    output INDEX (from 0) for the data's class NAME; ``INDEX`` lines pick it for the data's class on
    that line's position. A line holding one whole number is an INDEX line.
    """
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise EdgeKDError(f"--teacher-classes {path!r} holds no class lines")
    parsed = [re.match(r"^(\d+)(?:\s+(.+))?$", ln) for ln in lines]
    if not any(parsed):
        return "names", lines
    if not all(parsed):
        bad = lines[parsed.index(None)]
        raise EdgeKDError(f"--teacher-classes {path!r} mixes 'INDEX NAME' lines and name lines (e.g. {bad!r}); "
                          "use one form for the whole file")
    pairs = [(int(m.group(1)), m.group(2)) for m in parsed if m]
    if len({name is None for _, name in pairs}) > 1:
        raise EdgeKDError(f"--teacher-classes {path!r} mixes 'INDEX NAME' and bare 'INDEX' lines; use one form")
    return "index", pairs


def class_index(data_classes: Sequence[str], outputs: int, names: Optional[List[str]] = None,
                names_from: Optional[str] = None, classes_file: Optional[str] = None,
                spec: str = "teacher") -> Tuple[Optional[List[int]], ClassMatch]:
    """The teacher output for each data class (``None`` when that is the identity) and a record of how."""
    data_classes = list(data_classes)
    if classes_file:
        form, entries = read_classes_file(classes_file)
        if form == "index":
            return _index_pairs(data_classes, outputs, entries, classes_file, spec)
        if len(entries) != outputs:
            raise EdgeKDError(f"--teacher-classes {classes_file!r} names {len(entries)} classes but teacher {spec!r} "
                              f"has {outputs} outputs (NAME lines name every output in order)")
        names, names_from = entries, "--teacher-classes"
    if names is None:
        if outputs != len(data_classes):
            raise EdgeKDError(f"teacher {spec!r} has {outputs} outputs but the data has {len(data_classes)} classes; "
                              "pass --teacher-classes FILE to pick and name its outputs (lines 'INDEX NAME')")
        log.warning("teacher %s carries no class names: its %d outputs are taken in the data's class order (%s); "
                    "pass --teacher-classes FILE to have them checked by name", spec, outputs,
                    ", ".join(data_classes[:5]) + (", ..." if outputs > 5 else ""))
        return None, ClassMatch("by position (the teacher carries no class names)", outputs)
    if len(names) != outputs:
        raise EdgeKDError(f"teacher {spec!r} names {len(names)} classes ({names_from}) but has {outputs} outputs")
    where: Dict[str, List[int]] = {}
    for i, name in enumerate(names):
        where.setdefault(name, []).append(i)
    index = []
    for name in data_classes:
        if name not in where:
            close = difflib.get_close_matches(name, list(where), n=3)
            hint = f" (close: {', '.join(close)})" if close else f" (it knows e.g. {', '.join(names[:3])})"
            counts = (f"teacher {spec!r} has {outputs} classes but the data has {len(data_classes)}, and "
                      if outputs != len(data_classes) else "")
            raise EdgeKDError(f"{counts}data class {name!r} is not a class of teacher {spec!r}{hint}; map the classes "
                              "with --teacher-classes FILE (lines 'INDEX NAME')")
        if len(where[name]) > 1:
            raise EdgeKDError(f"data class {name!r} names teacher outputs {where[name]} of {spec!r}; pick one with "
                              "--teacher-classes FILE (lines 'INDEX NAME')")
        index.append(where[name][0])
    record = ClassMatch("by name", outputs, names_from=names_from, index=index,
                        teacher_names=[names[i] for i in index])
    return (None if index == list(range(outputs)) else index), record


def _index_pairs(data_classes: List[str], outputs: int, pairs: List[Tuple[int, Optional[str]]], path: str,
                 spec: str) -> Tuple[Optional[List[int]], ClassMatch]:
    if len(pairs) != len(data_classes):
        raise EdgeKDError(f"--teacher-classes {path!r} picks {len(pairs)} outputs but the data has "
                          f"{len(data_classes)} classes: one line per data class")
    index: List[Optional[int]] = [None] * len(data_classes)
    for k, (i, name) in enumerate(pairs):
        if i >= outputs:
            raise EdgeKDError(f"--teacher-classes {path!r} picks output {i}, but teacher {spec!r} has {outputs} "
                              f"outputs (0..{outputs - 1})")
        if name is None:
            index[k] = i
            continue
        if name not in data_classes:
            raise EdgeKDError(f"--teacher-classes {path!r} names {name!r}, which is not a data class "
                              f"(the data's: {', '.join(data_classes[:10])}{', ...' if len(data_classes) > 10 else ''})")
        if index[data_classes.index(name)] is not None:
            raise EdgeKDError(f"--teacher-classes {path!r} names data class {name!r} twice")
        index[data_classes.index(name)] = i
    if len(set(index)) != len(index):
        raise EdgeKDError(f"--teacher-classes {path!r} picks the same teacher output for two data classes")
    picked = [i for i in index if i is not None]  # every data class: one line each, no class twice
    record = ClassMatch("by index (--teacher-classes)", outputs, file=os.path.abspath(path), index=picked)
    return (None if picked == list(range(outputs)) else picked), record
