"""Datasets: load from the hub, a local file or folder, or the built-in generator; select rows; normalise formats.

Every row format is turned into one shape, ``{"messages": [{"role", "content"}, ...], "reference": str}``,
by a small adapter in ``FORMATS``: adding a format means adding one function there.
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

log = logging.getLogger(__name__)

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TRAIN_SPLITS = ("train", "train_sft", "train_prefs")
TEST_SPLITS = ("test", "test_sft", "test_prefs", "validation")


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


FORMATS: dict[str, tuple[Callable[[dict], dict], set[str]]] = {
    # name: (adapter, columns that identify the format)
    "messages": (_messages_row, {"messages"}),
    "gsm8k": (_gsm8k_row, {"question", "answer"}),
}


def detect_format(columns: list[str], requested: str, dataset_name: str) -> str:
    """The --dataset-source to use for a dataset with these columns."""
    if requested != "auto":
        missing = FORMATS[requested][1] - set(columns)
        if missing:
            raise DataError(f"--dataset-source {requested}: {dataset_name} lacks column(s) {sorted(missing)}; it has {columns}")
        return requested
    for name, (_, needed) in FORMATS.items():
        if needed <= set(columns):
            return name
    raise DataError(
        f"cannot tell the row format of {dataset_name} from its columns {columns}; "
        f"known formats: {', '.join(f'{k} {sorted(v[1])}' for k, v in FORMATS.items())}"
    )


def load_raw(cfg: TrainConfig):
    """A ``datasets.DatasetDict`` with 'train' and 'test' splits, carving a test split if there is none."""
    import datasets

    name = cfg.dataset_name
    path = Path(name)
    if name == "synthetic-math":
        import synthetic_math

        n_train = cfg.train_dataset_length or 5000
        n_test = cfg.test_dataset_length or 200
        return synthetic_math.build_dataset(n_train, n_test, seed=cfg.seed, levels=cfg.levels())
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
    train = next((loaded[s] for s in TRAIN_SPLITS if s in loaded), None)
    if train is None:
        raise DataError(f"--dataset-name {name}: no training split among {list(loaded)} (looked for {TRAIN_SPLITS})")
    test = next((loaded[s] for s in TEST_SPLITS if s in loaded), None)
    if test is None:
        carved = train.train_test_split(test_size=cfg.test_size, seed=cfg.seed)
        log.info("%s has no test split: carved %d rows (--test-size %s)", name, len(carved["test"]), cfg.test_size)
        train, test = carved["train"], carved["test"]
    return datasets.DatasetDict({"train": train, "test": test})


def text_length(row: dict[str, Any]) -> int:
    """Characters of all message contents of a normalised row: the measure the percentile filter uses."""
    return sum(len(m["content"]) for m in row["messages"])


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


def normalise(split, fmt: str, dataset_name: str, split_name: str) -> list[dict]:
    """Apply the format adapter to every row; a bad row raises an error naming it."""
    adapter = FORMATS[fmt][0]
    out = []
    for i, row in enumerate(split):
        try:
            out.append(adapter(row))
        except (DataError, KeyError, TypeError) as exc:
            raise DataError(f"{dataset_name} [{split_name}] row {i}: {exc!s} (format {fmt})") from exc
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
        fmt = detect_format(raw["train"].column_names, cfg.dataset_source, cfg.dataset_name)
        train = normalise(raw["train"], fmt, cfg.dataset_name, "train")
        train = select_rows(train, cfg.train_percentile, cfg.train_dataset_length, cfg.dataset_random_sample, cfg.seed)
        if not train:
            raise DataError(f"--dataset-name {cfg.dataset_name}: no training rows left after selection")
        if cfg.sanity_train:  # one object: validation sees exactly what training sees
            same = cls(train, fmt)
            return same, same
        test = normalise(raw["test"], fmt, cfg.dataset_name, "test")
        test = select_rows(test, cfg.test_percentile, cfg.test_dataset_length, cfg.dataset_random_sample, cfg.seed)
        if not test:
            raise DataError(f"--dataset-name {cfg.dataset_name}: no test rows left after selection")
        return cls(train, fmt), cls(test, fmt)

    def __len__(self) -> int:
        return len(self.features) if self.features else len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.features[index] if self.features else self.rows[index]
