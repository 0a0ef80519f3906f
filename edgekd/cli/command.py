"""What every subcommand is: ``Command`` (its name, help and arguments; heavy imports only in ``run``) and the
argparse pieces the command line is built from."""

import argparse
from typing import Any, NoReturn

from ..core import config


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: what is wrong, and where the full usage is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Command:
    """A subcommand: declares its arguments, imports its heavy code only in run()."""

    name = help = description = ""

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        """The command's options, from its options class (edgekd/core/config.py)."""
        config.add_options(p, self.name)

    def run(self, args: Any) -> None:
        """Run the command with its typed options (the frozen dataclass of its options class)."""
        raise NotImplementedError


class KeepLines(argparse.HelpFormatter):
    """Wraps help text as usual, except text with its own line breaks (the example table)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)
