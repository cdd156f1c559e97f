"""Row selection (percentile, cap, random sample, sanity), formats and split handling on known data."""

from __future__ import annotations

import re

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


# ---- a user's own files: folders of splits, a held-out file, unreadable files ----------------------------------

def _gsm(n: int, start: int = 0) -> list[dict]:
    return [{"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"} for i in range(start, start + n)]


def test_a_folder_of_split_files_is_read_as_its_splits(tmp_path):
    """train.jsonl (20 rows) and test.jsonl (5 rows) are the splits: nothing is carved out of the training rows."""
    folder = tmp_path / "mydata"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", _gsm(20))
    write_jsonl(folder / "test.jsonl", _gsm(5, start=100))
    (folder / "README.md").write_text("my data")  # other files are left alone
    train, test = CustomDataset.splits(_cfg(tmp_path, "--dataset-name", str(folder)))
    assert (len(train), len(test), train.format) == (20, 5, "gsm8k")
    assert [r["row"] for r in test.rows] == [0, 1, 2, 3, 4] and "What is 100+1?" in test.rows[0]["messages"][0]["content"]


def test_a_folder_of_json_and_parquet_files_with_a_validation_split(tmp_path):
    import json

    import datasets

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps(_gsm(12)))  # one JSON list, not JSON lines
    datasets.Dataset.from_list(_gsm(3, start=50)).to_parquet(str(folder / "validation.parquet"))
    train, test = CustomDataset.splits(_cfg(tmp_path, "--dataset-name", str(folder)))
    assert (len(train), len(test)) == (12, 3)


def test_a_folder_with_only_a_training_file_is_carved(tmp_path):
    folder = tmp_path / "only-train"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", _gsm(40))
    train, test = CustomDataset.splits(_cfg(tmp_path, "--dataset-name", str(folder), "--test-size", "0.25"))
    assert (len(train), len(test)) == (30, 10)


def test_a_folder_without_split_files_or_with_two_for_one_split_is_named(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "data.txt").write_text("x")
    with pytest.raises(DataError, match=r"--dataset-name .*notes: a folder with no train.jsonl .* it holds \['data.txt'\]"):
        CustomDataset.splits(_cfg(tmp_path, "--dataset-name", str(folder)))
    write_jsonl(folder / "train.jsonl", _gsm(5))
    write_jsonl(folder / "train.json", _gsm(5))
    with pytest.raises(DataError, match=r"two files for the train split \(train.json and train.jsonl\)"):
        CustomDataset.splits(_cfg(tmp_path, "--dataset-name", str(folder)))


def test_test_dataset_name_is_the_held_out_split(tmp_path):
    """--test-dataset-name's 7 rows validate; all 30 training rows train (none carved, the file's own order)."""
    data = write_jsonl(tmp_path / "train.jsonl", _gsm(30))
    held = write_jsonl(tmp_path / "held.jsonl", _gsm(7, start=500))
    train, test = CustomDataset.splits(_cfg(tmp_path, "--dataset-name", str(data), "--test-dataset-name", str(held)))
    assert (len(train), len(test)) == (30, 7)
    assert [r["reference"] for r in test.rows] == [r["answer"] for r in _gsm(7, start=500)]
    # A folder's test split wins over its training rows; synthetic-math's own test split is replaced too.
    folder = tmp_path / "heldfolder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", _gsm(9))
    write_jsonl(folder / "test.jsonl", _gsm(4, start=900))
    _, test = CustomDataset.splits(_cfg(tmp_path, "--dataset-name", str(data), "--test-dataset-name", str(folder)))
    assert [r["reference"] for r in test.rows] == [r["answer"] for r in _gsm(4, start=900)]
    _, test = CustomDataset.splits(_cfg(tmp_path, "--train-dataset-length", "8", "--test-dataset-name", str(held)))
    assert len(test) == 7


def test_test_dataset_name_in_another_format_or_with_sanity_train_is_refused(tmp_path):
    from config import ConfigError

    data = write_jsonl(tmp_path / "train.jsonl", _gsm(10))
    chat = write_jsonl(tmp_path / "chat.jsonl", _rows([5, 5]))
    with pytest.raises(DataError, match=r"--dataset-source gsm8k: .*chat.jsonl lacks column\(s\) \['answer', 'question'\]"):
        CustomDataset.splits(_cfg(tmp_path, "--dataset-name", str(data), "--test-dataset-name", str(chat)))
    with pytest.raises(DataError, match=r"--test-dataset-name .*missing.jsonl: no such file or folder"):
        CustomDataset.splits(_cfg(tmp_path, "--dataset-name", str(data), "--test-dataset-name", str(tmp_path / "missing.jsonl")))
    with pytest.raises(ConfigError, match="--sanity-train validates on the training set, so --test-dataset-name"):
        _cfg(tmp_path, "--dataset-name", str(data), "--sanity-train", "--test-dataset-name", str(data))


@pytest.mark.parametrize("name, content, problem", [
    ("broken.jsonl", b'{"question": "q", "answer": "#### 1"}\n\n{"question": "q", "answer": oops}\n',
     r"line 3 column 29: not valid JSON \(Expecting value\)"),
    ("latin1.jsonl", b'{"question": "q", "answer": "#### 1"}\n{"question": "caf\xe9", "answer": "#### 1"}\n',
     r"line 2 is not UTF-8 text"),
    ("list.jsonl", b'{"question": "q", "answer": "#### 1"}\n[1, 2]\n', r"line 2 is a JSON list, not an object"),
    ("empty.jsonl", b"", r"the file is empty"),
    ("blank.jsonl", b"\n  \n", r"the file holds no rows"),
    ("broken.json", b'[{"question": "q",\n  "answer": }]', r"line 2 column 13: not valid JSON"),
    ("garbage.parquet", b"not parquet at all", r"not a readable Parquet file"),
])
def test_an_unreadable_file_is_named_with_its_line(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^--dataset-name {re.escape(str(path))}: {problem}"):
        CustomDataset.splits(_cfg(tmp_path, "--dataset-name", str(path)))


def test_a_row_missing_a_column_names_the_column(tmp_path):
    rows = _gsm(20)
    del rows[13]["answer"]
    data = write_jsonl(tmp_path / "gsm.jsonl", rows)
    with pytest.raises(DataError, match=r"gsm.jsonl \[(train|test)\] row 13: column 'answer' is missing or null"):
        CustomDataset.splits(_cfg(tmp_path, "--dataset-name", str(data)))
    chats = _rows([5] * 20)
    del chats[7]["messages"][1]["content"]
    data = write_jsonl(tmp_path / "chat.jsonl", chats)
    with pytest.raises(DataError, match=r"row 7: (message 1 of 'messages': 'content' is missing or not text|"
                                        r"field 'content' is missing \(in column 'messages'\))"):
        CustomDataset.splits(_cfg(tmp_path, "--dataset-name", str(data)))


# ---- tokenizing: --mode test, and the advice when no row fits --max-length -----------------------------------

def test_mode_test_tokenizes_only_the_validation_rows(tmp_path, char_tokenizer, capsys):
    import train

    flags = ["--train-dataset-length", "12", "--test-dataset-length", "5", "--max-length", "512", "--no-verbose"]
    train_set, val_set = train.prepare_data(_cfg(tmp_path, *flags, "--mode", "test"), char_tokenizer)
    out = capsys.readouterr().out
    assert train_set.features == [] and len(val_set.features) == 5
    assert "test: 5 rows kept" in out and "train:" not in out
    train_set, _ = train.prepare_data(_cfg(tmp_path, *flags), char_tokenizer)  # --mode train tokenizes both
    assert len(train_set.features) == 12


def test_no_row_fits_max_length_gives_advice_that_fits_the_settings(tmp_path, char_tokenizer):
    """ChatML with one token per character: the prompt of 'q' renders in 20 tokens (<|im_start|> user\\n q <|im_end|>
    \\n <|im_start|> assistant\\n), each 200-character answer makes the row 222 long. --max-length 40: every row is
    too long (drop: truncating would keep them); --max-length 1: every prompt alone fills it (truncating cannot
    help)."""
    import train
    from config import ConfigError

    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x" * 200}]}] * 20
    data = str(write_jsonl(tmp_path / "long.jsonl", rows))
    base = ["--dataset-name", data, "--no-verbose", "--invalid-rows", "skip"]
    with pytest.raises(ConfigError, match=r"--max-length 40: no train row fits \(\d+ dropped: .*\); raise it, or use "
                                          "--overlong truncate"):
        train.prepare_data(_cfg(tmp_path, *base, "--max-length", "40"), char_tokenizer)
    train_set, _ = train.prepare_data(_cfg(tmp_path, *base, "--max-length", "40", "--overlong", "truncate"), char_tokenizer)
    assert {len(f["input_ids"]) for f in train_set.features} == {40}
    with pytest.raises(ConfigError) as refused:
        train.prepare_data(_cfg(tmp_path, *base, "--max-length", "1", "--overlong", "truncate"), char_tokenizer)
    assert "the prompts alone fill it" in str(refused.value) and "use --overlong truncate" not in str(refused.value)
