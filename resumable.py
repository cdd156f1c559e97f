"""Resumable outputs: the JSONL files scripts append rows to as they go, and the guard that a rerun resumes them
with the settings that made them.

A script that generates for minutes or hours (inference.py, generate_dpo_pairs.py, extension/best_of_n.py, the
reward cache of win_rate.py) appends each batch's rows with ``append_rows`` and, on a rerun, skips the rows
``read_rows`` finds. One rule for a bad line: the last line without its newline was cut by a crash in the middle of
a write, so it is dropped (its row is made again); any other bad line is an error naming the file and the line,
so that no valid row after it is ever lost without a word. ``save_or_check_settings`` keeps the settings that
shape the rows beside them, and refuses to mix rows of two settings under one output.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from config import ConfigError, flag_name
from custom_dataset import DataError
from secrets_guard import json_lines, write_json


def read_rows(path: Path, keys: Iterable[str] = ()) -> list[dict]:
    """The rows of a JSONL file that a script appends to; [] when there is no file yet.

    A last line without its newline (a crash in the middle of a write) is dropped, from the file too, so that the
    next ``append_rows`` starts on a line of its own. Blank lines are skipped.

    Args:
        path: the file.
        keys: fields every row must have.

    Raises:
        DataError: a line other than a torn last one is not UTF-8, not a JSON object, or lacks one of ``keys``;
            the message names the file and the line.
    """
    if not path.is_file():
        return []
    data = path.read_bytes()
    whole = data.rfind(b"\n") + 1
    if whole < len(data):
        with path.open("r+b") as handle:
            handle.truncate(whole)
    rows = []
    for number, line in enumerate(data[:whole].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            problem = f"not UTF-8 text ({exc})"
        except json.JSONDecodeError as exc:
            problem = f"not valid JSON ({exc})"
        else:
            missing = [k for k in keys if k not in row] if isinstance(row, dict) else None
            if missing is None:
                problem = f"not a JSON object but {type(row).__name__}"
            elif missing:
                problem = f"a row without {', '.join(map(repr, missing))}"
            else:
                rows.append(row)
                continue
        raise DataError(f"{path} line {number} is {problem}: delete that line to make its row again, "
                        "or write to another output")
    return rows


def append_rows(path: Path, rows: Iterable[dict]) -> None:
    """Append ``rows`` to ``path``, one JSON object a line, in one write that is flushed to disk: a crash loses at
    most these rows and tears at most the last line, which ``read_rows`` then drops. Every string in them passes
    through ``redact`` (a prompt or an answer may quote a key)."""
    text = json_lines(rows)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def check_same_settings(saved: dict, settings: dict, flag: str, output: Path | str) -> None:
    """Refuse to resume ``output`` with settings other than those that made its rows.

    Args:
        saved: the settings the output was made with, by config field name (``max_new_tokens``).
        settings: this run's settings, by the same names; every one of them is compared.
        flag: the flag that names the output (``--output-dir``), for the message.
        output: the output file or folder.

    Raises:
        ConfigError: naming each flag that differs, as ``--flag-name old -> new``.
    """
    changed = [f"{flag_name(k)} {saved.get(k)!r} -> {v!r}" for k, v in settings.items() if saved.get(k) != v]
    if changed:
        raise ConfigError([f"{flag} {output} holds rows made with other settings ({'; '.join(changed)}): rerun with "
                           f"the same settings to resume it, or choose another {flag}"])


def save_or_check_settings(path: Path, settings: dict, flag: str, output: Path | str) -> None:
    """On a first run, save ``settings`` (JSON) at ``path`` beside the output; on a rerun, ``check_same_settings``
    against the saved ones."""
    if not path.is_file():
        write_json(path, settings)
        return
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON {type(saved).__name__}, not an object")
    except ValueError as exc:  # also not UTF-8, not JSON
        raise DataError(f"{path} is not the settings file of {flag} {output} ({exc}): restore it, or choose "
                        f"another {flag}") from None
    check_same_settings(saved, settings, flag, output)
