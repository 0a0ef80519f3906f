"""How an option is written and checked: ``opt`` declares one field of a command's options class, ``Options`` is
their base, and ``check`` converts and checks one value the same way whether it came from the command line, a
YAML file or a Python caller.

A command's options are a frozen dataclass written in the layer of the command (``TrainOptions`` in
edgekd.core.options, ``ExportOptions`` in export.options, ...)::

    @register("export")
    @dataclass(frozen=True, kw_only=True)
    class ExportOptions(Options):
        val_size: int = opt(1000, "held-out test images for the parity gate", low=1, high=MAX_IMAGES)

The field's type gives the option's kind (int, float, str, bool or a list of one of them); ``opt``'s keywords
are its rules: ``low``/``high`` (bounds, inclusive unless ``low_open``/``high_open``), ``choices``, ``flags``
(extra spellings such as "-T"), ``metavar``, ``group`` (a --help section in edgekd.core.config.GROUPS),
``positional`` (with ``nargs``), ``negate`` (a bool that defaults to true and has an off switch such as
--no-progress), ``required``, ``check`` (a function ``value -> message or None`` for rules beyond a range),
``yaml=False`` for control options that only the command line takes (--force, --config). The help gets
"(default: X)" appended unless it already says "default". Rules across options go in the class's ``validate``.
"""

import dataclasses
import difflib
import math
import os
import types
from dataclasses import dataclass
from typing import (TYPE_CHECKING, Any, Callable, ClassVar, Dict, List, Optional, Tuple, Type, TypeVar, Union,
                    get_args, get_origin, get_type_hints)

from .. import EdgeKDError

DEFAULT_OUT = os.path.join("runs", "default")
# Upper bounds of the size options: beyond them a value is a typo (or an attack), not a plan, and would
# only fail later after allocating memory. Seeds are what numpy and torch's generators all take.
MAX_SEED = 2 ** 32 - 1
MAX_BATCH = 65_536
MAX_IMAGES = 10_000_000    # images in a sample (--val-size, --calib-size, --limit, --train-subset)
MAX_THREADS = 1024
MAX_TIMEOUT = 7 * 24 * 3600
MAX_INPUT_SIDE = 4096      # --teacher-input-size: a 4096x4096 RGB view is already 200 MB per image in float32


@dataclass(frozen=True)
class Opt:
    """One option as the command line, YAML and ``check`` see it (made from a field of an options class)."""

    name: str
    kind: str
    default: Any
    help: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: Optional[Tuple[str, ...]] = None
    item: str = "str"
    flags: Tuple[str, ...] = ()
    metavar: Optional[str] = None
    group: Optional[str] = None
    positional: bool = False
    nargs: Optional[str] = None
    negate: Optional[str] = None
    required: bool = False
    check: Optional[Callable[[Any], Optional[str]]] = None
    yaml: bool = True

    @property
    def flag(self) -> str:
        return self.name if self.positional else "--" + self.name.replace("_", "-")


# The key of a field's metadata that holds its Opt.
OPT = "opt"


def opt(default: Any, help: str, **rules: Any) -> Any:
    """A field of an options class: its default, its --help text and its rules (the keywords of ``Opt``)."""
    spec = Opt(name="", kind="", default=default, help=help, **rules)
    if isinstance(default, list):
        items = list(default)
        return dataclasses.field(default_factory=lambda: list(items), metadata={OPT: spec})
    return dataclasses.field(default=default, metadata={OPT: spec})


def opt_of(f: dataclasses.Field) -> "Opt":
    """The Opt of an options class's field (as ``opt`` made it)."""
    return f.metadata[OPT]


def with_default(cls: type, name: str, default: Any) -> Any:
    """The field ``name`` of ``cls`` again with another default (quantize's shorter training)."""
    spec = opt_of(next(f for f in dataclasses.fields(cls) if f.name == name))
    return opt(default, spec.help, **{f.name: getattr(spec, f.name) for f in dataclasses.fields(Opt)
                                      if f.name not in ("name", "kind", "default", "help")})


_KINDS = {int: "int", float: "float", str: "str", bool: "bool"}


def _kind(hint: Any) -> Tuple[str, str]:
    """(kind, item kind) of a field's type: Optional[int] -> ("int", "str"), List[int] -> ("list", "int")."""
    if get_origin(hint) in (Union, types.UnionType):
        hint = next(a for a in get_args(hint) if a is not type(None))
    if get_origin(hint) is list:
        return "list", _KINDS[get_args(hint)[0]]
    return _KINDS[hint], "str"


def options_of(cls: type) -> List[Opt]:
    """The options of an options class, in field order (the order of --help)."""
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind, item = _kind(hints[f.name])
        out.append(dataclasses.replace(opt_of(f), name=f.name, kind=kind, item=item))
    return out


@dataclass(frozen=True, kw_only=True)
class Options:
    """Base of every command's options: each value is checked as the command line's would be, then the class's
    rules across options (``validate``)."""

    command: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for spec in COMMANDS[self.command]:
            value = getattr(self, spec.name)
            if value is None and (spec.positional or spec.default is None):
                continue
            object.__setattr__(self, spec.name, check(spec, value))
        self.validate()

    def validate(self) -> None:
        """Rules across options (EdgeKDError in one line); each value was checked on its own already."""

    if not TYPE_CHECKING:  # at run time an unknown name says which command lacks it; mypy sees no such method
        def __getattr__(self, name):
            raise AttributeError(f"edgekd {self.command} has no option {name!r}")


# command -> its options class, and its options in --help order; filled as each command's module is imported
CLASSES: Dict[str, Type[Options]] = {}
COMMANDS: Dict[str, List[Opt]] = {}
C = TypeVar("C", bound=Type[Options])


def register(command: str) -> Callable[[C], C]:
    """Class decorator: ``cls`` holds the options of ``edgekd command``."""
    def add(cls: C) -> C:
        cls.command = command
        COMMANDS[command] = options_of(cls)
        CLASSES[command] = cls
        return cls
    return add


# ---------------------------------------------------------------------------------------------
# Converting and checking one value (from the command line, YAML or a Python caller alike).

def _describe(spec: Opt, kind: Optional[str] = None) -> str:
    kind = kind or spec.kind
    if kind == "int":
        named: Dict[Optional[float], str] = {1: "a positive whole number", 0: "a whole number of 0 or more"}
        return named.get(spec.low, "a whole number")
    if spec.low == 0:
        return "a positive number" if spec.low_open else "a number of 0 or more"
    return "a finite number"


def _range_error(spec: Opt, value: float, kind: str) -> Optional[str]:
    desc = _describe(spec, kind)
    if spec.low is not None and (value < spec.low or (spec.low_open and value == spec.low)):
        return f"expected {desc}"
    if spec.high is not None and (value > spec.high or (spec.high_open and value == spec.high)):
        if spec.high_open:
            return f"expected {desc} below {spec.high:g}"
        return f"expected {desc} of at most {spec.high:,} (beyond that it is a typo, not a plan)"
    return None


def _scalar(spec: Opt, value: Any, kind: str) -> Tuple[Any, Optional[str]]:
    """(converted value, error text or None) for one int/float/str value."""
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        return None, f"expected {_describe(spec, kind) if kind != 'str' else 'text'}"
    if kind == "str":
        return str(value), None
    try:
        if kind == "int":
            number = int(value.strip()) if isinstance(value, str) else value
            if not isinstance(number, int):
                raise ValueError
        else:
            number = float(value)
    except (ValueError, TypeError):
        return None, f"expected {_describe(spec, kind)}"
    if kind == "float" and not math.isfinite(number):
        return None, f"expected {_describe(spec, kind)}"
    return number, _range_error(spec, number, kind)


def _list(spec: Opt, value: Any) -> Tuple[List[Any], Optional[str]]:
    items = value.split(",") if isinstance(value, str) else value
    items = [i.strip() if isinstance(i, str) else i for i in (items if isinstance(items, list) else [items])]
    result: List[Any] = []
    error = None
    for item in (i for i in items if i != ""):
        converted, error = _scalar(spec, item, spec.item)
        if error:
            if spec.item != "str":
                plural = _describe(spec, spec.item)[2:].replace("number", "numbers")
                error = f"expected a comma-separated list of {plural}"
            break
        result.append(converted)
    if not error and not result:
        error = "expected a comma-separated list"
    if not spec.positional:  # a comma list names each thing once; MODEL... may repeat on purpose
        result = list(dict.fromkeys(result))
    return result, error


def check(spec: Opt, value: Any, source: Optional[str] = None) -> Any:
    """``value`` (a command-line string or a YAML value) converted to the option's type; EdgeKDError
    with one line naming the option, what it takes and what it got, otherwise."""
    error, result, hint = None, value, ""
    if value is None:
        if spec.default is not None and not spec.positional:
            error = f"expected {_describe(spec) if spec.kind in ('int', 'float') else 'a value'}"
    elif spec.kind == "bool":
        if not isinstance(value, bool):
            error = "expected true or false"
    elif spec.kind == "list":
        result, error = _list(spec, value)
    else:
        result, error = _scalar(spec, value, spec.kind)
        if not error and spec.choices and result not in spec.choices:
            close = difflib.get_close_matches(result, spec.choices, n=1)
            error = f"expected one of {', '.join(spec.choices)}"
            hint = f"; did you mean {close[0]!r}?" if close else ""
        if not error and spec.check:
            error = spec.check(result)
    if error:
        where = f" (key {spec.name} in {source})" if source else ""
        raise EdgeKDError(f"{spec.flag}: {error}, got {shown_value(value)!r}{where}{hint}")
    return result


def shown_value(value: Any, limit: int = 80) -> str:
    """A value as an error message quotes it: a list as typed, cut at ``limit`` characters (a YAML value can be
    a structure of any size; only its start is converted to text)."""
    if isinstance(value, (list, dict)):
        return "a list" if isinstance(value, list) else "a mapping"
    text = str(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit] + "..."
