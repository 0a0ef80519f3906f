"""Dicts read into dataclass records at the edge, and records written back, by the record's own field names:
the keys are named once, in the dataclass.

- ``read_json(cls, value)`` builds a record from a parsed JSON object by its fields' names and types (files that
  edgekd, an older edgekd or someone else wrote), so no module passes a dict of string keys on;
- ``record_from``, ``record_dict``, ``field_names`` and ``required`` read and write by name only, for dicts whose
  values edgekd made itself (a torch.load'ed checkpoint or training state, tensors included).

The rules (what a file written by edgekd, or by an older edgekd, or tampered with, may hold):
- a field is read from the key of its name; a missing key, ``null``, or a value of another type gives the field's
  default, and where the field has none the record is refused (``None``);
- ``int`` takes a JSON integer (not a bool), ``float`` an integer or a number, ``str`` and ``bool`` themselves;
  ``Optional[X]``, ``List[X]``, ``Tuple[X, ...]``, ``Set[X]`` (from a list), ``Dict[str, X]`` and nested dataclasses are read item by item
  (a list or dict with one item of another type counts as of another type); ``Any`` takes anything.
"""

import dataclasses
import types
from dataclasses import MISSING, fields
from typing import Any, Dict, List, Mapping, Optional, Type, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")
R = TypeVar("R")
_MISSING = object()  # a value that does not read as its field's type


def _read(hint: Any, value: Any) -> Any:
    """``value`` as ``hint``, or _MISSING."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin is Union or (hasattr(types, "UnionType") and isinstance(hint, types.UnionType)):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            read = _read(arg, value)
            if read is not _MISSING:
                return read
        return _MISSING
    if origin in (list, tuple, set, frozenset):
        if not isinstance(value, list):
            return _MISSING
        item = args[0] if args else Any
        items = [_read(item, v) for v in value]
        return _MISSING if any(v is _MISSING for v in items) else (items if origin is list else origin(items))
    if origin is dict:
        if not isinstance(value, dict):
            return _MISSING
        item = args[1] if len(args) == 2 else Any
        read = {k: _read(item, v) for k, v in value.items()}
        return _MISSING if any(not isinstance(k, str) or v is _MISSING for k, v in read.items()) else read
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        record = read_json(hint, value)
        return _MISSING if record is None else record
    return _scalar(hint, value)


def _scalar(hint: Any, value: Any) -> Any:
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else _MISSING
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISSING
    if hint in (str, bool):
        return value if isinstance(value, hint) else _MISSING
    return _MISSING


def read_json(cls: Type[T], value: Any) -> Optional[T]:
    """The dataclass ``cls`` read from ``value`` (a parsed JSON object) by the rules above; None when ``value`` is
    not an object or a field without a default cannot be read."""
    if not isinstance(value, dict):
        return None
    hints = get_type_hints(cls)
    given: Dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init:
            continue
        read = _read(hints[f.name], value[f.name]) if f.name in value else _MISSING
        if read is not _MISSING:
            given[f.name] = read
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            return None
    return cls(**given)


def read_list(cls: Type[T], value: Any) -> List[T]:
    """The items of the JSON list ``value`` that read as ``cls`` (see ``read_json``); [] when it is not a list."""
    records = [read_json(cls, v) for v in value] if isinstance(value, list) else []
    return [r for r in records if r is not None]

def field_names(cls: Any) -> frozenset:
    """The field names of a dataclass (or of a record's class)."""
    return frozenset(f.name for f in fields(cls))


def record_from(cls: Type[R], d: Mapping[str, Any], **given: Any) -> R:
    """``cls`` from the keys of ``d`` that are its fields (``given`` wins); a field missing from both takes its
    default. Raises TypeError when a field without a default is missing: the caller checked the dict first."""
    names = field_names(cls)
    picked = {k: v for k, v in d.items() if k in names}
    return cls(**{**picked, **given})


def record_dict(record: Any, omit_none: frozenset = frozenset()) -> Dict[str, Any]:
    """The fields of ``record`` as a dict (shallow: tensors and nested values are not copied), leaving out the
    fields named in ``omit_none`` whose value is None."""
    return {f.name: getattr(record, f.name) for f in fields(record)
            if not (f.name in omit_none and getattr(record, f.name) is None)}


def required(cls: Any) -> tuple:
    """The names of the fields of ``cls`` that have no default."""
    return tuple(f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING)
