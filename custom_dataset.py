"""Datasets: load from the hub, a local file or folder, or the built-in generator; select rows; normalise formats.

Every row format is turned into one shape, ``{"messages": [{"role", "content"}, ...], "reference": str, "row": int}``
(preference rows add ``"rejected": str``, the final assistant turn being the chosen answer), by a small adapter
in ``FORMATS``: adding a format means adding one function there. ``row`` is the row's index in its split.
Selection order: percentile filter on text length, then the length cap (first or seeded random N).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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


def load_raw(cfg: TrainConfig):
    """A ``datasets.DatasetDict`` with 'train' and 'test' splits, carving a test split if there is none."""
    import datasets

    name = cfg.dataset_name
    path = Path(name)
    kind = get_objective(cfg.training_type).data_kind
    pairs, verifier = kind == "preference", kind == "verifier"
    if name == "synthetic-math":  # each objective builds its own kind of rows
        return get_objective(cfg.training_type).synthetic(cfg)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
    elif path.is_file():
        builder = LOCAL_FORMATS.get(path.suffix)
        if builder is None:
            raise DataError(f"--dataset-name {name}: unsupported file type {path.suffix!r} (use .jsonl, .json or .parquet)")
        loaded = datasets.load_dataset(builder, data_files=str(path))
    elif path.suffix in LOCAL_FORMATS or name.startswith((".", "/")):
        raise DataError(f"--dataset-name {name}: no such file or folder")
    else:
        repo, _, subset = name.partition(":")  # 'openai/gsm8k:main' selects the 'main' configuration
        loaded = datasets.load_dataset(repo, subset or None)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if verifier and any(split.startswith(("verify_", "correct_")) for split in loaded):
        return verifier_dataset({split: loaded[split].to_list() for split in loaded})
    def first_split(names: tuple[str, ...]):
        # HuggingFaceH4/ultrafeedback_binarized has *_sft and *_prefs splits: preference training reads *_prefs.
        ordered = sorted(names, key=lambda n: pairs and not n.endswith("_prefs"))
        return next((loaded[s] for s in ordered if s in loaded), None)

    train, test = first_split(TRAIN_SPLITS), first_split(TEST_SPLITS)
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


def normalise(split, fmt: str, dataset_name: str, split_name: str, invalid_rows: str = "error") -> list[dict]:
    """Apply the format adapter to every row. A bad row raises an error naming it, or with
    ``invalid_rows='skip'`` is left out and counted (each reason printed with its count and first row)."""
    adapter = FORMATS[fmt][0]
    out, skipped = [], {}
    for i, row in enumerate(split):
        i = row.get(SOURCE_ROW, i)
        try:
            out.append({**adapter(row), "row": i})
        except (DataError, KeyError, TypeError, AttributeError) as exc:
            message = f"{exc!s}" if isinstance(exc, DataError) else f"malformed row ({type(exc).__name__}: {exc!s})"
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
        fmt = detect_format(raw["train"].column_names, cfg.dataset_source, cfg.dataset_name, cfg.training_type)
        train = normalise(raw["train"], fmt, cfg.dataset_name, "train", cfg.invalid_rows)
        train = select_rows(train, cfg.train_percentile, cfg.train_dataset_length, cfg.dataset_random_sample, cfg.seed)
        if not train:
            raise DataError(f"--dataset-name {cfg.dataset_name}: no training rows left after selection")
        if cfg.sanity_train:  # one object: validation sees exactly what training sees
            same = cls(train, fmt)
            return same, same
        test = normalise(raw["test"], fmt, cfg.dataset_name, "test", cfg.invalid_rows)
        test = select_rows(test, cfg.test_percentile, cfg.test_dataset_length, cfg.dataset_random_sample, cfg.seed)
        if not test:
            raise DataError(f"--dataset-name {cfg.dataset_name}: no test rows left after selection")
        return cls(train, fmt), cls(test, fmt)

    def __len__(self) -> int:
        return len(self.features) if self.features else len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.features[index] if self.features else self.rows[index]
