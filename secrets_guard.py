"""Secrets: what counts as one, and the one place through which everything a process prints or writes passes.

A secret lives in an environment variable (``SECRET_ENV_VARS``), never in a flag or a YAML file: flag values are
printed at start and saved in config.yaml, in every checkpoint and in the model card. ``redact`` alone decides what
is secret: the value of any of those variables, and any token-shaped string (``hf_...``, ``sk-...``, ``nvapi-...``,
``AKIA...``), its variable set or not. Everything below is built on it:

- flags: ``secret_flag_problems`` refuses every flag value that ``redact`` would change (``config.validate`` for
  train.py, ``refuse_secret_args`` for the argparse of the other scripts), so no secret is in a config at all (and
  ``config.ConfigError`` redacts its messages, which may quote a value);
- console and logs: each script's ``main()``, and each Ray worker (``distributed._worker``), first calls
  ``redact_output()``: sys.stdout, sys.stderr, the streams of the logging handlers and every log record pass
  through ``redact`` (so do a Ray job's logs: the driver's and the workers' output);
- files: config.yaml (``config.to_yaml``), every string in a checkpoint (``module.on_save_checkpoint``: the
  config, the checkpoint callback's paths), the model card (``upload_to_hub.model_card``), the generations files
  (``module._save_generations``), every row a script appends (``resumable.append_rows``), every other file a
  script writes whole (``write_text``, ``write_json``, ``write_jsonl``: the reports and summaries of win_rate.py,
  evaluate_math.py, extension/best_of_n.py and bench/) and every dataset a script saves or pushes
  (``redact_dataset``: generate_dpo_pairs.py, extension/data_preparation.py).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Environment variables that may hold secrets; their values are never printed or saved.
SECRET_ENV_VARS = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "OPENAI_API_KEY",
    "NVIDIA_API_KEY",
    "JUDGE_API_KEY",
    "WANDB_API_KEY",
)
# A value shorter than this is no credential (real ones are 20+ characters); masking it would garble ordinary text.
MIN_SECRET_LENGTH = 8
# Token shapes, secret even when their variable is unset (a key pasted into a flag or a YAML file). The lookbehind
# keeps words that merely end in "sk-" (e.g. "task-...") intact.
TOKEN = re.compile(r"(?<![A-Za-z0-9])(?:hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{8,}|nvapi-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16})")
MASK = "***"


def _secret_values() -> dict[str, str]:
    """Variable -> value of every secret environment variable set (to a value long enough to be one)."""
    values = {var: os.environ.get(var, "") for var in SECRET_ENV_VARS}
    return {var: value for var, value in values.items() if len(value) >= MIN_SECRET_LENGTH}


def redact(text: str) -> str:
    """``text`` with '***' in place of the value of every secret environment variable and of every token-shaped
    string: Hugging Face (``hf_...``), OpenAI-style (``sk-`` and 8 or more characters), NVIDIA (``nvapi-...``) keys
    and AWS access key ids (``AKIA...``)."""
    for secret in _secret_values().values():
        text = text.replace(secret, MASK)
    return TOKEN.sub(MASK, text)


def redact_data(obj: Any) -> Any:
    """``obj`` with ``redact`` applied to every string in it, dict keys included, through dicts, lists and tuples;
    other values (tensors, numbers) are kept as they are. Returns ``obj`` itself when nothing in it is secret, so a
    checkpoint's state dicts keep their type and metadata."""
    if isinstance(obj, str):
        clean = redact(obj)
        return obj if clean == obj else clean
    if isinstance(obj, dict):
        pairs = [(redact_data(k), redact_data(v)) for k, v in obj.items()]
        if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(pairs, obj.items())):
            return obj
        clean = copy.copy(obj)  # same type (OrderedDict, ...) and attributes
        clean.clear()
        clean.update(pairs)
        return clean
    if isinstance(obj, (list, tuple)):
        items = [redact_data(v) for v in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return obj._make(items) if hasattr(obj, "_make") else type(obj)(items)  # a named tuple, or a list/tuple
    return obj


# ---- flags --------------------------------------------------------------------------------------------------

# Where the secret a flag may be mistaken for belongs instead.
_ADVICE = {
    "--win-rate-judge": "put the key in JUDGE_API_KEY (or NVIDIA_API_KEY / OPENAI_API_KEY) and pass only 'api[:model]'",
    "--judge-model": "put the key in JUDGE_API_KEY (or NVIDIA_API_KEY / OPENAI_API_KEY) and pass only the model name",
    "--repo-id": "put the token in HF_TOKEN and pass only owner/name",
    "--repo": "put the token in HF_TOKEN and pass only owner/name",
}
_DEFAULT_ADVICE = ("secrets go in environment variables (HF_TOKEN for the Hub, AWS_ACCESS_KEY_ID and "
                   "AWS_SECRET_ACCESS_KEY for S3, JUDGE_API_KEY for an API judge), which are never printed or saved, "
                   "unlike flag and YAML values")


def secret_flag_problems(flags: dict[str, Any]) -> list[str]:
    """One message per flag whose value (a string, or a list of them) holds a secret: a token-shaped string or the
    value of a secret environment variable. Each names the flag and where the secret goes instead, never the value.

    Args:
        flags: flag (``--win-rate-judge``) -> its value.
    """
    problems = []
    secrets = _secret_values()
    for flag, value in flags.items():
        values = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str)]
        if all(redact(v) == v for v in values):
            continue
        held = [var for var, secret in secrets.items() if any(secret in v for v in values)]
        what = f"holds the value of the secret environment variable {held[0]}" if held else \
            "looks like it holds an API key or token"
        problems.append(f"{flag} {what}: {_ADVICE.get(flag, _DEFAULT_ADVICE)}")
    return problems


def refuse_secret_args(parser, args) -> None:
    """Exit (code 2, argparse's usage error) naming every flag of ``args`` that holds a secret
    (``secret_flag_problems``); the flags are the dests spelled ``--dest-name``."""
    problems = secret_flag_problems({"--" + dest.replace("_", "-"): value for dest, value in vars(args).items()})
    if problems:
        parser.error("secrets given as flags:\n" + "\n".join(f"  - {p}" for p in problems))


# ---- console and logs ---------------------------------------------------------------------------------------

class RedactingStream:
    """A text stream that passes what ``redact`` leaves of each write to the stream it wraps (everything else, such
    as ``flush``, ``isatty`` and ``fileno``, is the wrapped stream's). A secret is masked when one write holds it
    whole, as every ``print``, log line and progress bar update does."""

    def __init__(self, stream):
        self.wrapped = stream

    def write(self, text: str) -> int:
        self.wrapped.write(redact(text) if isinstance(text, str) else text)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):
        return getattr(self.wrapped, name)


def _redacting(factory):
    """A log record factory that masks secrets in each record's message (for handlers that write no stream)."""

    def make(*args, **kwargs):
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it when the record is emitted
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return record

    make.redacts = True
    return make


def redact_output() -> None:
    """Route this process's console and log output through ``redact``: sys.stdout and sys.stderr (so ``print``,
    progress bars, warnings, tracebacks and the log handlers made later), the streams of the logging handlers made
    already (e.g. Lightning's), and every log record's message. Called first by each script's ``main()`` and each Ray
    worker; calling it again changes nothing."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):  # a PlaceHolder has none
            stream = getattr(handler, "stream", None)  # None: a FileHandler that opens its file later
            if isinstance(handler, logging.StreamHandler) and stream is not None and not isinstance(stream, RedactingStream):
                handler.setStream(RedactingStream(stream))
    if not getattr(logging.getLogRecordFactory(), "redacts", False):
        logging.setLogRecordFactory(_redacting(logging.getLogRecordFactory()))


def excerpt(text: str, limit: int, end: bool = False) -> str:
    """At most ``limit`` characters of ``text`` (its start, or with ``end`` its end), for a message that quotes it:
    redacted before it is cut, since a key cut in half no longer looks like a key and would get through."""
    clean = redact(text)
    return clean[-limit:] if end else clean[:limit]


# ---- files --------------------------------------------------------------------------------------------------

def write_text(path: Path | str, text: str) -> Path:
    """Write what ``redact`` leaves of ``text`` to ``path`` (its folder made if missing), atomically: through a
    staged file beside it renamed over it, so a crash leaves the old file or none, never half of one. Returns the
    path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(redact(text), encoding="utf-8")
    staging.replace(path)
    return path


def json_lines(rows: Iterable[Any]) -> str:
    """``rows`` as JSON lines (one a line, each ended by a newline), every string in them redacted."""
    return "".join(json.dumps(redact_data(row)) + "\n" for row in rows)


def write_json(path: Path | str, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` through ``write_text``, every string in it redacted."""
    return write_text(path, json.dumps(redact_data(obj), indent=2) + "\n")


def write_jsonl(path: Path | str, rows: Iterable[Any]) -> Path:
    """Write ``rows`` to ``path``, one JSON object a line (``json_lines``), through ``write_text``."""
    return write_text(path, json_lines(rows))


def redact_dataset(dataset):
    """A ``datasets.Dataset`` (or each split of a ``DatasetDict``) with ``redact`` applied to every string in it,
    its features kept; the dataset itself when nothing in it is secret. For a dataset about to be saved
    (``save_to_disk``, ``to_json``) or pushed to the Hub."""
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        splits = {name: redact_dataset(split) for name, split in dataset.items()}
        if all(splits[name] is split for name, split in dataset.items()):
            return dataset
        return datasets.DatasetDict(splits)
    columns = dataset.to_dict()
    clean = redact_data(columns)
    return dataset if clean is columns else datasets.Dataset.from_dict(clean, features=dataset.features)
