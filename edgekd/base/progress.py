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

REPORT = logging.getLogger("edgekd.report")


def printable(text):
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

    def format(self, record):
        return printable(super().format(record))


def report_to_stdout():
    """Show REPORT's lines on stdout as plain lines (the CLI calls this once)."""
    if not REPORT.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(PrintableFormatter("%(message)s"))
        REPORT.addHandler(handler)
        REPORT.setLevel(logging.INFO)
        REPORT.propagate = False  # not again through the "edgekd" logger's stderr handler


def bar(iterable=None, total=None, desc="", unit="it", disable=False, leave=False):
    """A progress bar over ``iterable`` (or updated by hand up to ``total``); silent when ``disable``."""
    if not disable and _stderr_is_terminal():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, file=sys.stderr)
    return LineBar(iterable, total, desc, unit, silent=disable)


def _stderr_is_terminal():
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class LineBar:
    """tqdm's interface (iterate, update, set_postfix, close, with) that writes one line when closed."""

    def __init__(self, iterable=None, total=None, desc="", unit="it", silent=False):
        self.iterable, self.desc, self.unit, self.silent = iterable, desc, unit, silent
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.postfix, self.start, self.closed = 0, {}, time.perf_counter(), False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.n += 1
        finally:
            self.close()

    def update(self, n=1):
        self.n += n

    def set_postfix(self, **values):
        self.postfix = values

    def set_postfix_str(self, text):
        self.postfix = {"at": text}

    def close(self):
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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextlib.contextmanager
def nncf_quiet(progress):
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
