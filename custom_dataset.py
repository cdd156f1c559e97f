"""Datasets: load from the hub, a local file or folder, or the built-in generator; select rows; normalise formats.

Every row format is turned into one shape, ``{"messages": [{"role", "content"}, ...], "reference": str, "row": int}``
(preference rows add ``"rejected": str``, the final assistant turn being the chosen answer), by a small adapter
in ``FORMATS``: adding a format means adding one function there. ``row`` is the row's index in its split.
Selection order: percentile filter on text length, then the length cap (first or seeded random N).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from config import TrainConfig
from objectives import get_objective

log = logging.getLogger(__name__)

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TRAIN_SPLITS = ("train", "train_sft", "train_prefs")
TEST_SPLITS = ("test", "test_sft", "test_prefs", "validation")
SOURCE_ROW = "_source_row"  # index in the original split, added when a test split is carved out of it


class DataError(ValueError):
    """Bad input data; the message names the dataset, split or row."""


def _messages_row(row: dict[str, Any]) -> dict[str, Any]:
    """HuggingFaceTB/smol-smoltalk style: a list of {role, content}, multi-turn, optional system turn."""
    messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    for i, message in enumerate(messages):  # JSON rows that lack a field get None from datasets, not a KeyError
        for key in ("role", "content"):
            if not isinstance(message[key], str):
                raise DataError(f"message {i} of 'messages': '{key}' is missing or not text")
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError("the last message must be the assistant's answer")
    return {"messages": messages, "reference": messages[-1]["content"]}


def _gsm8k_row(row: dict[str, Any]) -> dict[str, Any]:
    """GSM8K style: ``question`` and an ``answer`` whose last line is '#### <number>'."""
    if "####" not in row["answer"]:
        raise DataError("the answer has no '#### <number>' final line")
    messages = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
    return {"messages": messages, "reference": row["answer"]}


def _math_row(row: dict[str, Any]) -> dict[str, Any]:
    """MATH style (hendrycks/competition_math): ``problem`` and a ``solution`` whose final answer is in ``\\boxed{}``."""
    if "\\boxed" not in row["solution"]:
        raise DataError("the solution has no \\boxed{} final answer")
    messages = [{"role": "user", "content": row["problem"]}, {"role": "assistant", "content": row["solution"]}]
    return {"messages": messages, "reference": row["solution"]}


def _response(value: Any, column: str) -> str:
    """A response given as a string or as a message list whose last turn is the assistant's."""
    if isinstance(value, list):
        if not value or value[-1].get("role") != "assistant":
            raise DataError(f"'{column}' must end with the assistant's answer")
        value = value[-1]["content"]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"'{column}' is empty")
    return value


def _preference_row(row: dict[str, Any]) -> dict[str, Any]:
    """Preference pairs: ``prompt`` and ``chosen``/``rejected`` answers, each a string or a message list whose
    last turn is the answer (HuggingFaceH4/ultrafeedback_binarized); the chosen list's earlier turns are the prompt."""
    for column in ("prompt", "chosen", "rejected"):
        if row.get(column) is None:
            raise DataError(f"missing '{column}'")
    chosen, rejected = _response(row["chosen"], "chosen"), _response(row["rejected"], "rejected")
    if isinstance(row["chosen"], list) and len(row["chosen"]) > 1:
        prompt = [{"role": m["role"], "content": m["content"]} for m in row["chosen"][:-1]]
    elif isinstance(row["prompt"], str) and row["prompt"].strip():
        prompt = [{"role": "user", "content": row["prompt"]}]
    else:
        raise DataError("'prompt' is empty")
    return {"messages": [*prompt, {"role": "assistant", "content": chosen}], "rejected": rejected, "reference": chosen}


def _verifier_row(row: dict[str, Any]) -> dict[str, Any]:
    """GenRM-CoT rows of ``extension/data_preparation.py``: a verification row (``prompt``, ``rationale``,
    ``label`` Yes/No) learns the rationale, a correct-solution row (``question``, ``solution``) the solution.
    ``part`` says which (``losses.sft.VERIFIER_PARTS``)."""
    if row.get("rationale") is not None:
        for column in ("prompt", "rationale"):
            if not isinstance(row.get(column), str) or not row[column].strip():
                raise DataError(f"verification row: '{column}' is empty")
        if row.get("label") not in ("Yes", "No"):
            raise DataError(f"verification row: 'label' must be 'Yes' or 'No', got {row.get('label')!r}")
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["rationale"]}]
        return {"messages": messages, "reference": row["rationale"], "part": "verify", "label": row["label"]}
    for column in ("question", "solution"):
        if not isinstance(row.get(column), str) or not row[column].strip():
            raise DataError(f"correct-solution row: '{column}' is empty")
    messages = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["solution"]}]
    return {"messages": messages, "reference": row["solution"], "part": "correct"}


# name: (adapter, columns that identify the format, the data kind it holds: an Objective's ``data_kind``)
FORMATS: dict[str, tuple[Callable[[dict], dict], set[str], str]] = {
    "messages": (_messages_row, {"messages"}, "sft"),
    "gsm8k": (_gsm8k_row, {"question", "answer"}, "sft"),
    "math": (_math_row, {"problem", "solution"}, "sft"),
    "preference": (_preference_row, {"prompt", "chosen", "rejected"}, "preference"),
    "verifier": (_verifier_row, {"question", "solution"}, "verifier"),
}
VERIFIER_SPLITS = {"train": ("verify_train", "correct_train"), "test": ("verify_validation", "correct_validation")}


def detect_format(columns: list[str], requested: str, dataset_name: str, training_type: str = "sft") -> str:
    """The --dataset-source to use for a dataset with these columns and this --training-type."""
    kind = get_objective(training_type).data_kind
    if requested != "auto":
        missing = FORMATS[requested][1] - set(columns)
        if missing:
            raise DataError(f"--dataset-source {requested}: {dataset_name} lacks column(s) {sorted(missing)}; it has {columns}")
        if FORMATS[requested][2] != kind:
            raise DataError(f"--dataset-source {requested} holds {FORMATS[requested][2]} data; --training-type {training_type} needs {kind} data")
        return requested
    candidates = {k: v for k, v in FORMATS.items() if v[2] == kind}
    for name, (_, needed, _) in candidates.items():
        if needed <= set(columns):
            return name
    raise DataError(
        f"cannot tell the row format of {dataset_name} from its columns {columns}; "
        f"--training-type {training_type} reads: {', '.join(f'{k} {sorted(v[1])}' for k, v in candidates.items())}"
    )


def interleave(*parts: list[dict]) -> list[dict]:
    """Rows of the parts taken in turn (a1, b1, a2, b2, ...), the longer part's rest at the end: the first N rows
    of the result mix the parts as evenly as they can."""
    out = [row for group in zip(*parts) for row in group]
    shortest = min(len(p) for p in parts)
    return out + [row for p in parts for row in p[shortest:]]


def verifier_dataset(splits: dict[str, list[dict]]):
    """GenRM-CoT splits (``verify_*`` and ``correct_*`` of ``extension/data_preparation.py``) as 'train' and 'test'
    splits of interleaved verification and correct-solution rows."""
    import datasets

    missing = [name for names in VERIFIER_SPLITS.values() for name in names if name not in splits]
    if missing:
        raise DataError(f"GenRM-CoT data lacks split(s) {missing}: build it with extension/data_preparation.py")
    columns = ("question_id", "question", "solution", "prompt", "rationale", "label")
    out = {}
    for split, (verify, correct) in VERIFIER_SPLITS.items():
        rows = interleave(list(splits[verify]), list(splits[correct]))
        out[split] = datasets.Dataset.from_list([{c: row.get(c) for c in columns} for row in rows])
    return datasets.DatasetDict(out)


# What ``datasets.save_to_disk`` writes at the top of a folder (a DatasetDict, a Dataset); any other folder is read as
# a folder of split files.
SAVE_TO_DISK_FILES = ("dataset_dict.json", "state.json")
SPLIT_FILE_NAMES = TRAIN_SPLITS + TEST_SPLITS + tuple(name for names in VERIFIER_SPLITS.values() for name in names)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence the ``datasets`` logger while it reads a user's file: a failure is reported once, by us, naming the
    file and the line, not also in its own words."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _innermost(exc: BaseException) -> BaseException:
    """The exception at the root of ``exc``'s chain (datasets wraps what pyarrow or json found)."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


def _file_problem(path: Path, exc: BaseException) -> str:
    """What is wrong with a UTF-8 JSON or JSON-lines file that ``datasets`` could not read: its first bad line (not
    JSON, not an object), no rows at all, or else the root error. Only called once a read failed."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":  # one JSON document (a list of rows), or JSON lines under a .json name
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            if error.lineno == 1 and "\n" in text.strip():  # JSON lines: report the line that is not JSON
                return _lines_problem(text) or f"line {error.lineno} column {error.colno}: not valid JSON ({error.msg})"
            return f"line {error.lineno} column {error.colno}: not valid JSON ({error.msg})"
    elif problem := _lines_problem(text):
        return problem
    if not text.strip():
        return "the file holds no rows (it is empty or blank)"
    root = _innermost(exc)
    return f"cannot be read as a dataset ({type(root).__name__}: {' '.join(str(root).split())})"


def _utf8_problem(path: Path, chunk: int = 1 << 24) -> str | None:
    """The first line of ``path`` that is not UTF-8 text, described; None if the file is UTF-8 (read in chunks of
    ``chunk`` bytes, at about a second per GB)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = 0  # newlines before the chunk
    with path.open("rb") as handle:
        while True:
            data = handle.read(chunk)
            held = decoder.getstate()[0]  # the start of a character cut by the chunk's edge (never a newline)
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as error:  # error.start counts from the held bytes
                text = held + data
                line = lines + text[:error.start].count(b"\n") + 1
                return f"line {line} is not UTF-8 text (a byte 0x{text[error.start]:02x}, e.g. Latin-1): save it as UTF-8"
            if not data:
                return None
            lines += data.count(b"\n")


def _lines_problem(text: str) -> str | None:
    """The first line of JSON-lines ``text`` that is not a JSON object, described; None if all are."""
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON strings may hold \r or \u2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            return f"line {number} column {error.colno}: not valid JSON ({error.msg})"
        if not isinstance(row, dict):
            return f"line {number} is a JSON {type(row).__name__}, not an object (one row per line)"
    return None


def read_file(path: Path, flag: str):
    """A local ``.jsonl``, ``.json`` or ``.parquet`` file as a ``datasets.Dataset``.

    Raises:
        DataError: the file type is not one of these, or the file cannot be read (empty, a line that is not UTF-8 or
            not JSON, not Parquet); the message names ``flag``, the file and, for JSON, the first bad line.
    """
    import datasets

    builder = LOCAL_FORMATS.get(path.suffix)
    if builder is None:
        raise DataError(f"{flag} {path}: unsupported file type {path.suffix!r} (use .jsonl, .json or .parquet)")
    if path.stat().st_size == 0:
        raise DataError(f"{flag} {path}: the file is empty")
    if builder == "json" and (problem := _utf8_problem(path)):  # pyarrow reads bad bytes in a string, to fail later
        raise DataError(f"{flag} {path}: {problem}")
    try:
        with _quiet_datasets():
            return datasets.load_dataset(builder, data_files=str(path), split="train")
    # What datasets raises for a file it cannot parse: its own wrapper, pyarrow's ArrowInvalid (a ValueError),
    # ValueError for a file of blank lines, StopIteration for one with no row.
    except (datasets.exceptions.DatasetGenerationError, ValueError, StopIteration) as exc:
        problem = _file_problem(path, exc) if builder == "json" else \
            f"not a readable Parquet file ({' '.join(str(_innermost(exc)).split())})"
        raise DataError(f"{flag} {path}: {problem}") from None


def split_files(folder: Path) -> dict[str, Path]:
    """The split files of a folder: ``train.jsonl`` (or ``.json``, ``.parquet``), ``test.*`` or ``validation.*``, and
    any other split name ``load_raw`` knows (``SPLIT_FILE_NAMES``), by split name."""
    files: dict[str, Path] = {}
    for file in sorted(folder.iterdir()):
        if file.is_file() and file.suffix in LOCAL_FORMATS and file.stem in SPLIT_FILE_NAMES:
            if file.stem in files:
                raise DataError(f"{folder}: two files for the {file.stem} split ({files[file.stem].name} and "
                                f"{file.name}): keep one")
            files[file.stem] = file
    return files


def load_splits(name: str, flag: str):
    """Every split of the dataset ``name`` as a ``datasets.DatasetDict`` (a file: one 'train' split), nothing carved.

    ``name`` is a local file (``.jsonl``, ``.json``, ``.parquet``), a ``save_to_disk`` folder, a folder of split
    files (``split_files``: ``train.jsonl`` and ``test.jsonl``, say) or a hub id (``openai/gsm8k:main`` picks the
    'main' configuration). Errors name ``flag``.
    """
    import datasets

    path = Path(name)
    if path.is_dir() and any((path / marker).is_file() for marker in SAVE_TO_DISK_FILES):
        try:
            loaded = datasets.load_from_disk(str(path))
        except (OSError, ValueError, KeyError) as exc:  # a save_to_disk folder with missing or torn files
            raise DataError(f"{flag} {name}: a save_to_disk folder that cannot be read ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())})") from None
    elif path.is_dir():
        files = split_files(path)
        if not files:
            held = sorted(p.name for p in path.iterdir())
            raise DataError(f"{flag} {name}: a folder with no train.jsonl (or .json, .parquet) nor test.* or "
                            f"validation.* file, and not a save_to_disk folder; it holds {held[:8]}"
                            + (" ..." if len(held) > 8 else ""))
        loaded = datasets.DatasetDict({split: read_file(file, flag) for split, file in files.items()})
    elif path.is_file():
        loaded = read_file(path, flag)
    elif path.suffix in LOCAL_FORMATS or name.startswith((".", "/", "~")):
        raise DataError(f"{flag} {name}: no such file or folder")
    else:
        repo, _, subset = name.partition(":")  # 'openai/gsm8k:main' selects the 'main' configuration
        try:
            loaded = datasets.load_dataset(repo, subset or None)
        except ValueError as exc:  # e.g. a configuration the dataset does not have
            raise DataError(f"{flag} {name}: {' '.join(str(exc).split())}") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def first_split(loaded, names: tuple[str, ...], pairs: bool):
    """The first of the splits ``names`` that ``loaded`` has, or None. HuggingFaceH4/ultrafeedback_binarized has
    *_sft and *_prefs splits: preference training (``pairs``) reads *_prefs."""
    ordered = sorted(names, key=lambda n: pairs and not n.endswith("_prefs"))
    return next((loaded[s] for s in ordered if s in loaded), None)


def held_out_split(cfg: TrainConfig):
    """The rows of --test-dataset-name, the held-out split: a file's rows, or a folder's or hub dataset's test
    split (its only split when it has one)."""
    kind = get_objective(cfg.training_type).data_kind
    loaded = load_splits(cfg.test_dataset_name, "--test-dataset-name")
    if kind == "verifier" and any(split.startswith(("verify_", "correct_")) for split in loaded):
        return verifier_dataset({split: loaded[split].to_list() for split in loaded})["test"]
    test = first_split(loaded, TEST_SPLITS, kind == "preference")
    if test is None and len(loaded) == 1:
        test = next(iter(loaded.values()))
    if test is None:
        raise DataError(f"--test-dataset-name {cfg.test_dataset_name}: no test split among {list(loaded)} "
                        f"(looked for {TEST_SPLITS})")
    return test


def load_raw(cfg: TrainConfig):
    """A ``datasets.DatasetDict`` with 'train' and 'test' splits: the test split is --test-dataset-name's rows when
    given, else the dataset's own, else one carved out of the training split (--test-size)."""
    import datasets

    name = cfg.dataset_name
    kind = get_objective(cfg.training_type).data_kind
    pairs, verifier = kind == "preference", kind == "verifier"
    built = name == "synthetic-math"  # each objective builds its own kind of rows, train and test
    if built:
        loaded = get_objective(cfg.training_type).synthetic(cfg)
    else:
        loaded = load_splits(name, "--dataset-name")
        if verifier and any(split.startswith(("verify_", "correct_")) for split in loaded):
            loaded, built = verifier_dataset({split: loaded[split].to_list() for split in loaded}), True
    held_out = held_out_split(cfg) if cfg.test_dataset_name else None
    if built:
        return loaded if held_out is None else datasets.DatasetDict({"train": loaded["train"], "test": held_out})
    train, test = first_split(loaded, TRAIN_SPLITS, pairs), held_out or first_split(loaded, TEST_SPLITS, pairs)
    if train is None:
        raise DataError(f"--dataset-name {name}: no training split among {list(loaded)} (looked for {TRAIN_SPLITS})")
    if test is None:
        # Keep each row's index in the file so errors name the row the user can find.
        train = train.add_column(SOURCE_ROW, list(range(len(train))))
        carved = train.train_test_split(test_size=cfg.test_size, seed=cfg.seed)
        log.info("%s has no test split: carved %d rows (--test-size %s)", name, len(carved["test"]), cfg.test_size)
        train, test = carved["train"], carved["test"]
    return datasets.DatasetDict({"train": train, "test": test})


def text_length(row: dict[str, Any]) -> int:
    """Characters of all message contents (and the rejected answer) of a normalised row: what the percentile filter uses."""
    return sum(len(m["content"]) for m in row["messages"]) + len(row.get("rejected", ""))


def select_rows(rows: list[dict], percentile: float, length: int | None, random_sample: bool, seed: int) -> list[dict]:
    """Keep rows at or below the ``percentile``-th text length, then cap to ``length`` (first or seeded random N)."""
    if percentile < 100 and rows:
        lengths = np.array([text_length(r) for r in rows])
        threshold = np.percentile(lengths, percentile)
        rows = [r for r, n in zip(rows, lengths) if n <= threshold]
    if length is not None and length < len(rows):
        if random_sample:
            keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=length, replace=False))
            rows = [rows[i] for i in keep]
        else:
            rows = rows[:length]
    return rows


def row_problem(exc: Exception, row: dict[str, Any], fmt: str) -> str:
    """What the ``fmt`` adapter's ``exc`` says about ``row``, naming the column: a JSON row without a column gets None
    there from ``datasets``, which the adapter meets as a TypeError."""
    if isinstance(exc, DataError):
        return str(exc)
    columns = sorted(FORMATS[fmt][1])
    empty = [c for c in columns if row.get(c) is None]
    if empty:
        return (f"column {empty[0]!r} is missing or null" if len(empty) == 1 else
                f"columns {', '.join(map(repr, empty))} are missing or null")
    if isinstance(exc, KeyError):
        return f"field {exc.args[0]!r} is missing (in column {', '.join(map(repr, columns))})"
    return f"malformed row ({type(exc).__name__}: {exc!s}; columns {', '.join(map(repr, columns))})"


def normalise(split, fmt: str, dataset_name: str, split_name: str, invalid_rows: str = "error",
              keep_columns: bool = False) -> list[dict]:
    """Apply the format adapter to every row. A bad row raises an error naming it, or with
    ``invalid_rows='skip'`` is left out and counted (each reason printed with its count and first row).
    ``keep_columns``: keep the row's own columns too, as ``columns`` (online RL's python rewards read them)."""
    adapter = FORMATS[fmt][0]
    out, skipped = [], {}
    for i, row in enumerate(split):
        i = row.get(SOURCE_ROW, i)
        try:
            out.append({**adapter(row), "row": i})
            if keep_columns:
                out[-1]["columns"] = {k: v for k, v in row.items() if k != SOURCE_ROW}
        except (DataError, KeyError, TypeError, AttributeError) as exc:
            message = row_problem(exc, row, fmt)
            if invalid_rows == "error":
                raise DataError(f"{dataset_name} [{split_name}] row {i}: {message} (format {fmt}; "
                                "--invalid-rows skip leaves such rows out)") from exc
            skipped.setdefault(message, []).append(i)
    for message, rows in skipped.items():
        print(f"{split_name}: skipped {len(rows)} invalid row(s): {message} (first: row {rows[0]})")
    return out


class CustomDataset(torch.utils.data.Dataset):
    """A list of normalised rows (``messages`` and ``reference``) plus, once tokenized, their features."""

    def __init__(self, rows: list[dict], fmt: str):
        self.rows = rows
        self.format = fmt
        self.features: list[dict] = []

    @classmethod
    def splits(cls, cfg: TrainConfig) -> tuple[CustomDataset, CustomDataset]:
        """Train and validation datasets for ``cfg``, with every selection flag applied."""
        raw = load_raw(cfg)
        columns = [c for c in raw["train"].column_names if c != SOURCE_ROW]
        fmt = detect_format(columns, cfg.dataset_source, cfg.dataset_name, cfg.training_type)
        keep = get_objective(cfg.training_type).online
        train = normalise(raw["train"], fmt, cfg.dataset_name, "train", cfg.invalid_rows, keep)
        train = select_rows(train, cfg.train_percentile, cfg.train_dataset_length, cfg.dataset_random_sample, cfg.seed)
        if not train:
            raise DataError(f"--dataset-name {cfg.dataset_name}: no training rows left after selection")
        if cfg.sanity_train:  # one object: validation sees exactly what training sees
            same = cls(train, fmt)
            return same, same
        test_name, test_flag = (cfg.test_dataset_name, "--test-dataset-name") if cfg.test_dataset_name else \
            (cfg.dataset_name, "--dataset-name")
        if cfg.test_dataset_name:  # another file: its columns must hold the training rows' format
            detect_format(raw["test"].column_names, fmt, test_name, cfg.training_type)
        test = normalise(raw["test"], fmt, test_name, "test", cfg.invalid_rows, keep)
        test = select_rows(test, cfg.test_percentile, cfg.test_dataset_length, cfg.dataset_random_sample, cfg.seed)
        if not test:
            raise DataError(f"{test_flag} {test_name}: no test rows left after selection")
        return cls(train, fmt), cls(test, fmt)

    def __len__(self) -> int:
        return len(self.features) if self.features else len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.features[index] if self.features else self.rows[index]
