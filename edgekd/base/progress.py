"""Progress bars and the report lines of the CLI.

``bar(...)`` is tqdm when stderr is a terminal; otherwise (a log file, CI, a pipe) it writes one line
when the bar closes, instead of hundreds of carriage-return redraws. ``REPORT`` carries the lines a
command prints as its result (one per epoch, say): the library logs them, the CLI shows them on stdout
through ``report_to_stdout()``, and a program that imports edgekd decides for itself.
"""

import contextlib
import logging
import sys
import time
from typing import Any, Dict, Iterable, Iterator, Optional, Sized

REPORT = logging.getLogger("edgekd.report")


def printable(text: object) -> str:
    """``text`` with control characters (escape sequences, carriage returns, bidi overrides) escaped, line breaks
    kept: a class name or path read from a file cannot move the cursor, recolour or rewrite the terminal.
    (bundle/preprocessing.py, which the device runner carries to devices without edgekd, has its own copy.)"""
    text = str(text)
    if text.isprintable():
        return text
    return "\n".join("".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in line)
                     for line in text.split("\n"))


class PrintableFormatter(logging.Formatter):
    """A log formatter whose lines are ``printable``."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


class CurrentStreamHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stdout`` or ``sys.stderr`` is when a record is emitted, not the
    stream of the moment it was made: the CLI run in-process (a test's captured streams, a redirect) must not
    leave a handler behind on a stream that is closed by then."""

    def __init__(self, name: str) -> None:
        self._which = name
        super().__init__()

    @property
    def stream(self) -> Any:
        return getattr(sys, self._which)

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # StreamHandler's constructor and setStream: the stream is always the current one


def report_to_stdout() -> None:
    """Show REPORT's lines on stdout as plain lines (the CLI calls this once)."""
    if not REPORT.handlers:
        handler = CurrentStreamHandler("stdout")
        handler.setFormatter(PrintableFormatter("%(message)s"))
        REPORT.addHandler(handler)
        REPORT.setLevel(logging.INFO)
        REPORT.propagate = False  # not again through the "edgekd" logger's stderr handler


def bar(iterable: Optional[Iterable[Any]] = None, total: Optional[int] = None, desc: str = "", unit: str = "it",
        disable: bool = False, leave: bool = False) -> Any:
    """A progress bar over ``iterable`` (or updated by hand up to ``total``); silent when ``disable``."""
    if not disable and _stderr_is_terminal():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, file=sys.stderr)
    return LineBar(iterable, total, desc, unit, silent=disable)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class LineBar:
    """tqdm's interface (iterate, update, set_postfix, close, with) that writes one line when closed."""

    def __init__(self, iterable: Optional[Iterable[Any]] = None, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", silent: bool = False) -> None:
        self.iterable, self.desc, self.unit, self.silent = iterable, desc, unit, silent
        self.total = total if total is not None else (len(iterable) if isinstance(iterable, Sized) else None)
        self.n, self.start, self.closed = 0, time.perf_counter(), False
        self.postfix: Dict[str, Any] = {}

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable or ():
                yield item
                self.n += 1
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def set_postfix_str(self, text: str) -> None:
        self.postfix = {"at": text}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.silent:
            return
        seconds = time.perf_counter() - self.start
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        sys.stderr.write(f"{self.desc}: {count} {self.unit} in {seconds:.1f} s{extra}\n")
        sys.stderr.flush()

    def __enter__(self) -> "LineBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def nncf_quiet(progress: bool) -> Iterator[None]:
    """Without --progress, NNCF prints neither its INFO lines nor its progress bars. Its bars
    (nncf.common.logging.track_progress) are rich Progress objects on rich's global console, which has a
    ``quiet`` switch; its lines go to the "nncf" logger."""
    if progress:
        yield
        return
    import rich

    console, logger = rich.get_console(), logging.getLogger("nncf")
    quiet, level = console.quiet, logger.level
    console.quiet = True
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        console.quiet = quiet
        logger.setLevel(level)
