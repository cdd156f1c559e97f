"""How a script ends on bad input: one line on stderr, ``<script>: <message>``, and exit status 2.

Bad input is what the user can fix: a flag, a config file, a data file, a checkpoint, a model folder. Each script's
``main()`` catches exactly the exception types its inputs raise (``config.ConfigError``, ``custom_dataset.DataError``,
``OSError`` of a path it was given, ...) and ends with ``fail``; anything else is a bug and keeps its traceback. The
message names the file and line, row, column or flag (the exception says which), so one line is enough.
``ArgumentParser`` does the same for a flag argparse itself refuses, without the usage text.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

EXIT_BAD_INPUT = 2  # argparse's status for a bad flag, and every script's for bad input


def one_line(error: BaseException | str) -> str:
    """The message of ``error`` on one line: its lines joined with '; ' (a ``ConfigError``'s problems after
    'invalid configuration: ')."""
    problems = getattr(error, "problems", None)
    if isinstance(problems, list):
        return "invalid configuration: " + "; ".join(" ".join(p.split()) for p in problems)
    text = str(error) or type(error).__name__
    out = ""
    for line in text.splitlines():
        line = line.strip().removeprefix("- ")  # a list item of a multi-line message
        if line:
            out += ("" if not out else " " if out.endswith(":") else "; ") + line
    return out


def fail(script: str, error: BaseException | str) -> NoReturn:
    """End ``script`` on bad input: ``<script>: <message>`` as one line on stderr, exit status 2."""
    print(f"{script}: {one_line(error)}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_BAD_INPUT)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, reporting a bad flag as one line, ``<prog>: <message>``, exit status 2, without the usage
    text (``--help`` shows it). Give ``prog``: by default argparse names the program after ``sys.argv[0]``, which is
    not the script when a test calls its ``main``."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, message)
