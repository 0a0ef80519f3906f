"""One small registry for every pluggable thing: losses, model sources, export formats, backends."""

import difflib

from .errors import EdgeKDError


class Registry:
    """Maps names to objects plus metadata; refuses duplicates and suggests close names on a miss."""

    def __init__(self, kind):
        self.kind = kind
        self._entries = {}

    def register(self, name, **meta):
        """Decorator: ``@REG.register("name", key=value)`` stores the object and its metadata."""

        def add(obj):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = (obj, meta)
            return obj

        return add

    def get(self, name):
        return self._lookup(name)[0]

    def meta(self, name):
        return self._lookup(name)[1]

    def names(self):
        return sorted(self._entries)

    def __contains__(self, name):
        return name in self._entries

    def _lookup(self, name):
        if name not in self._entries:
            raise EdgeKDError(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name):
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}: choose from {', '.join(self.names())}{hint}"
