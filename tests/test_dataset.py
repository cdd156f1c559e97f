"""Row selection (percentile, cap, random sample, sanity), formats and split handling on known data."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_jsonl

from config import resolve
from custom_dataset import CustomDataset, DataError, detect_format, select_rows


def _rows(lengths):
    return [{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x" * n}], "id": i}
            for i, n in enumerate(lengths)]


LENGTHS = [50, 10, 90, 30, 70, 20, 100, 40, 80, 60]  # text lengths of rows 0..9


def test_percentile_keeps_rows_at_or_below_the_threshold():
    """numpy's linear percentile of 10..100 at 50 is 55: rows of length 10..50 stay (ids 0, 1, 3, 5, 7).
    At 90 it is 91: only the 100-long row 6 goes."""
    kept = select_rows(_rows(LENGTHS), 50, None, False, 0)
    assert [r["id"] for r in kept] == [0, 1, 3, 5, 7]
    kept = select_rows(_rows(LENGTHS), 90, None, False, 0)
    assert [r["id"] for r in kept] == [0, 1, 2, 3, 4, 5, 7, 8, 9]


def test_length_cap_takes_first_rows_after_the_percentile_filter():
    assert [r["id"] for r in select_rows(_rows(LENGTHS), 50, 3, False, 0)] == [0, 1, 3]


def test_random_sample_is_seeded_and_keeps_order():
    expected = sorted(np.random.default_rng(5).choice(10, size=4, replace=False))
    kept = select_rows(_rows(LENGTHS), 100, 4, True, 5)
    assert [r["id"] for r in kept] == expected
    assert kept == select_rows(_rows(LENGTHS), 100, 4, True, 5)
    assert [r["id"] for r in select_rows(_rows(LENGTHS), 100, 4, True, 6)] != expected


def _cfg(tmp_path, *flags):
    cfg, _ = resolve(["--storage-path", str(tmp_path), "--name", "t", *flags])
    return cfg


def test_local_jsonl_without_test_split_is_carved(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", _rows(range(1, 101)))
    train, test = CustomDataset.splits(_cfg(tmp_path, "--dataset-name", str(data), "--test-size", "0.1"))
    assert (len(train), len(test), train.format) == (90, 10, "messages")
    assert not {t["reference"] for t in train.rows} & {t["reference"] for t in test.rows}


def test_sanity_train_validates_on_the_selected_training_rows(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", _rows(LENGTHS * 10))
    train, val = CustomDataset.splits(_cfg(tmp_path, "--dataset-name", str(data), "--sanity-train",
                                           "--train-dataset-length", "7"))
    assert val is train and len(train) == 7


def test_gsm8k_rows_become_chats(tmp_path):
    rows = [{"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"} for i in range(50)]
    data = write_jsonl(tmp_path / "gsm.jsonl", rows)
    train, _ = CustomDataset.splits(_cfg(tmp_path, "--dataset-name", str(data)))
    assert train.format == "gsm8k"
    row = train.rows[0]
    assert row["messages"][0]["role"] == "user" and row["messages"][1]["content"] == row["reference"]


def test_synthetic_math_sizes_follow_the_length_flags(tmp_path):
    train, test = CustomDataset.splits(_cfg(tmp_path, "--train-dataset-length", "12", "--test-dataset-length", "5"))
    assert (len(train), len(test), train.format) == (12, 5, "gsm8k")


def test_bad_row_is_named(tmp_path):
    rows = _rows([5, 5, 5])
    rows[2]["messages"] = rows[2]["messages"][:1]  # no assistant answer
    data = write_jsonl(tmp_path / "bad.jsonl", rows * 20)
    with pytest.raises(DataError, match=r"bad.jsonl \[(train|test)\] row \d+: the last message must be the assistant"):
        CustomDataset.splits(_cfg(tmp_path, "--dataset-name", str(data)))


def test_unknown_columns_and_missing_files_are_clear(tmp_path):
    with pytest.raises(DataError, match="cannot tell the row format .* columns \\['text'\\]"):
        detect_format(["text"], "auto", "x")
    with pytest.raises(DataError, match="--dataset-source gsm8k: x lacks column"):
        detect_format(["messages"], "gsm8k", "x")
    with pytest.raises(DataError, match="no such file or folder"):
        CustomDataset.splits(_cfg(tmp_path, "--dataset-name", str(tmp_path / "missing.jsonl")))
