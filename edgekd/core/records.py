"""Reading a dict at an edge (a JSON file, a torch.load'ed checkpoint or training state) into a dataclass record,
and writing one back, by the record's own field names: the keys are named once, in the dataclass."""

from dataclasses import MISSING, fields
from typing import Any, Dict, Mapping, Type, TypeVar

R = TypeVar("R")


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
