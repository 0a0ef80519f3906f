"""One small registry for every pluggable thing: losses, model sources, export formats, backends."""

import difflib
from typing import Any, Callable, Dict, List, Tuple

from .errors import EdgeKDError


class Registry:
    """Maps names to objects plus metadata; refuses duplicates and suggests close names on a miss."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, Tuple[Any, Dict[str, Any]]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Any], Any]:
        """Decorator: ``@REG.register("name", key=value)`` stores the object and its metadata."""

        def add(obj: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = (obj, meta)
            return obj

        return add

    def get(self, name: str) -> Any:
        """The object registered as ``name`` (EdgeKDError naming the choices and the closest one otherwise)."""
        return self._lookup(name)[0]

    def meta(self, name: str) -> Dict[str, Any]:
        """The metadata registered with ``name``."""
        return self._lookup(name)[1]

    def names(self) -> List[str]:
        """Every registered name, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _lookup(self, name: str) -> Tuple[Any, Dict[str, Any]]:
        if name not in self._entries:
            raise EdgeKDError(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name: object) -> str:
        """The one-line error for a name that is not registered: the choices, and the closest match."""
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}: choose from {', '.join(self.names())}{hint}"
