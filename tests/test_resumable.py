"""resumable.py, the one rule for the JSONL files scripts append to and resume from: a torn last line (a crash in
the middle of a write) is dropped, from the file too; any other bad line (bad JSON, not UTF-8, not an object, a
missing field) is an error naming the file and the line, and nothing is lost. And the settings guard: saved on a
first run, a rerun with other settings refused naming each flag as ``--flag-name old -> new``."""

from __future__ import annotations

import json

import pytest

from config import ConfigError
from custom_dataset import DataError
from resumable import append_rows, check_same_settings, read_rows, save_or_check_settings


def test_append_then_read_round_trips_and_a_missing_file_is_empty(tmp_path):
    path = tmp_path / "rows.jsonl"
    assert read_rows(path) == []
    append_rows(path, [{"id": "a", "text": "é"}, {"id": "b", "n": [1, 2]}])
    append_rows(path, [{"id": "c"}])
    append_rows(path, [])  # nothing to add: the file is unchanged
    assert path.read_text().splitlines() == ['{"id": "a", "text": "\\u00e9"}', '{"id": "b", "n": [1, 2]}', '{"id": "c"}']
    assert read_rows(path, keys=("id",)) == [{"id": "a", "text": "é"}, {"id": "b", "n": [1, 2]}, {"id": "c"}]


def test_a_torn_last_line_is_dropped_from_the_rows_and_the_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    append_rows(path, [{"id": "a"}, {"id": "b"}])
    whole = path.read_bytes()
    # The crash cut the last row inside a two-byte UTF-8 character: neither JSON nor UTF-8, and still only torn.
    path.write_bytes(whole + '{"id": "c", "text": "\u00e9'.encode()[:-1])
    assert read_rows(path) == [{"id": "a"}, {"id": "b"}]
    assert path.read_bytes() == whole  # the next append starts on a line of its own
    append_rows(path, [{"id": "c"}])
    assert [r["id"] for r in read_rows(path)] == ["a", "b", "c"]


def test_a_last_line_that_is_whole_json_but_lacks_its_newline_is_torn_too(tmp_path):
    """The row and its newline go in one write; without the newline the write did not finish."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}')
    assert read_rows(path) == [{"id": "a"}]
    assert path.read_text() == '{"id": "a"}\n'


@pytest.mark.parametrize(("bad", "says"), [
    (b'{"id": "b", "te\n', "line 2 is not valid JSON"),
    (b'{"id": "\xff"}\n', "line 2 is not UTF-8 text"),
    (b'["id", "b"]\n', "line 2 is not a JSON object but list"),
    (b'{"name": "b"}\n', "line 2 is a row without 'id'"),
])
def test_a_bad_line_before_the_last_is_an_error_naming_file_and_line(tmp_path, bad, says):
    path = tmp_path / "rows.jsonl"
    before = b'{"id": "a"}\n' + bad + b'{"id": "c"}\n'
    path.write_bytes(before)
    with pytest.raises(DataError, match="delete that line") as error:
        read_rows(path, keys=("id",))
    assert f"{path} {says}" in str(error.value)
    assert path.read_bytes() == before  # the row after the bad line is still there


def test_a_bad_last_line_with_its_newline_is_an_error_not_a_tear(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a"}\n{"id": \n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_rows(path)


def test_blank_lines_are_skipped_but_count_in_line_numbers(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a"}\n\n  \n{"id": \n{"id": "c"}\n')
    with pytest.raises(DataError, match="line 4 is not valid JSON"):
        read_rows(path)


def test_settings_are_saved_on_the_first_run_and_must_match_on_a_rerun(tmp_path):
    path, out = tmp_path / "settings.json", tmp_path / "out"
    settings = {"model_name": "m", "temperature": 0.8, "lambda_": 0.1, "synthetic_levels": "1,2"}
    save_or_check_settings(path, settings, "--output-dir", out)
    assert json.loads(path.read_text()) == settings
    save_or_check_settings(path, dict(settings), "--output-dir", out)  # the same settings resume
    with pytest.raises(ConfigError) as error:
        save_or_check_settings(path, {**settings, "temperature": 0.5, "lambda_": 0.2}, "--output-dir", out)
    message = str(error.value)
    assert (f"--output-dir {out} holds rows made with other settings (--temperature 0.8 -> 0.5; --lambda 0.1 -> 0.2): "
            "rerun with the same settings to resume it, or choose another --output-dir") in message
    assert "model" not in message.split("(")[1]  # only the flags that differ are named
    assert json.loads(path.read_text()) == settings  # the saved settings are never overwritten


def test_a_setting_the_saved_file_lacks_is_named_as_new(tmp_path):
    with pytest.raises(ConfigError, match=r"--seed None -> 3"):
        check_same_settings({"n": 1}, {"n": 1, "seed": 3}, "--output", tmp_path / "o.jsonl")


def test_a_corrupt_settings_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=f"{path} is not the settings file of --output-dir"):
        save_or_check_settings(path, {"n": 1}, "--output-dir", tmp_path)
