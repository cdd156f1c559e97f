"""Secrets kept out by construction (secrets_guard.py): a secret-shaped value in any string flag of train.py (or
YAML key), win_rate.py or upload_to_hub.py is refused naming the flag and where the secret goes instead; ``redact``
masks short ``sk-`` keys but keeps words such as "task-..."; and a real training run plus an export, with secrets
planted in the environment and in the data, writes none of them to any file of the run or the export (inside the
checkpoints too) nor to stdout, stderr or the logs. The Ray job's counterpart is in tests/test_ray.py.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml
from conftest import strings_in, write_secret_dataset

import train
import upload_to_hub
import win_rate
from config import FIELD_TYPES, FIELDS, ConfigError, flag_name, resolve
from secrets_guard import redact, redact_data, redact_output

# Distinctive values, each of a shape real keys have; OPENAI_API_KEY is a short sk- key.
PLANTED = {
    "HF_TOKEN": "hf_PLANTEDhfTOKEN0123456789abcdef",
    "OPENAI_API_KEY": "sk-PLANTED42",
    "AWS_SECRET_ACCESS_KEY": "PLANTED/aws+Secret/Key0123456789SENTINEL",
    "JUDGE_API_KEY": "PLANTED-judge-key-SENTINEL-77",
}
# The string fields a user types freely (the others are choices): each is checked.
FREE_STRING_FIELDS = [n for n in FIELDS if FIELD_TYPES[n] is str and "choices" not in FIELDS[n].metadata]


@pytest.fixture
def planted(monkeypatch):
    for var, value in PLANTED.items():
        monkeypatch.setenv(var, value)
    return PLANTED


# ---- refused as flags ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FREE_STRING_FIELDS)
def test_a_token_in_any_string_flag_is_refused_naming_the_flag(name, tmp_path):
    key = "sk-" + "Ab3dE" * 3
    with pytest.raises(ConfigError) as err:
        resolve(["--storage-path", str(tmp_path), "--name", "r", flag_name(name), key])
    mine = [p for p in err.value.problems if p.startswith(f"{flag_name(name)} looks like it holds an API key")]
    assert len(mine) == 1, err.value.problems
    assert key not in str(err.value)  # the message never repeats the secret


def test_the_value_of_a_secret_variable_in_a_flag_or_yaml_is_refused_naming_both(planted, tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"win_rate_judge": f"api:{planted['OPENAI_API_KEY']}"}))
    with pytest.raises(ConfigError) as err:
        resolve(["--config", str(run), "--storage-path", str(tmp_path), "--name", "r",
                 "--dataset-name", f"/data/{planted['JUDGE_API_KEY']}/rows.jsonl"])
    problems = err.value.problems
    assert ("--win-rate-judge holds the value of the secret environment variable OPENAI_API_KEY: put the key in "
            "JUDGE_API_KEY (or NVIDIA_API_KEY / OPENAI_API_KEY) and pass only 'api[:model]'") in problems
    assert any(p.startswith("--dataset-name holds the value of the secret environment variable JUDGE_API_KEY")
               for p in problems)
    assert not any(secret in str(err.value) for secret in planted.values())


def test_train_win_rate_and_upload_exit_2_on_a_secret_flag(tmp_path, capsys):
    key = "sk-Xy12345678"
    with pytest.raises(SystemExit) as exit_:
        train.main(["--storage-path", str(tmp_path), "--name", "r", "--win-rate-judge", f"api:{key}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--win-rate-judge looks like it holds an API key" in err and key not in err
    with pytest.raises(SystemExit) as exit_:
        win_rate.parse_args(["--candidates", "a", "--baseline", "b", "--judge", "api", "--judge-model", key,
                             "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--judge-model looks like it holds an API key or token: put the key in JUDGE_API_KEY" in err
    with pytest.raises(SystemExit) as exit_:
        upload_to_hub.parse_args(["--checkpoint-path", "runs/x", "--training-type", "sft", "--repo-id",
                                  "hf_" + "a1B2" * 6, "--local-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--repo-id looks like it holds an API key or token: put the token in HF_TOKEN" in err


# ---- what redact masks ---------------------------------------------------------------------------------------

def test_short_sk_keys_are_masked_and_words_ending_in_sk_are_kept(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert redact("key=sk-abc12345 next") == "key=*** next"  # 8 characters after sk-: a key
    assert redact("sk-abc1234") == "sk-abc1234"  # 7: too short to be one
    for word in ("task-0123456789abcdef", "risk-assessment-2024", "desk-lamp-v2-final"):
        assert redact(word) == word
    cfg, _ = resolve(["--storage-path", str(tmp_path), "--name", "task-0123456789abcdef"])
    assert cfg.name == "task-0123456789abcdef"


def test_redact_data_masks_strings_and_keeps_what_holds_none_as_it_is():
    state = OrderedDict(weight=torch.ones(2))
    state._metadata = {"": {"version": 1}}  # what torch's state dicts carry
    checkpoint = {"state_dict": state, "callbacks": {"dirpath": "/runs/sk-abc12345/checkpoints"}, "epoch": 3}
    clean = redact_data(checkpoint)
    assert clean["callbacks"] == {"dirpath": "/runs/***/checkpoints"} and clean["epoch"] == 3
    assert clean["state_dict"] is state and clean["state_dict"]._metadata == {"": {"version": 1}}
    plain = ["a", ("b", 1)]
    assert redact_data(plain) is plain


def test_redact_output_masks_prints_and_log_records(planted, capsys, caplog):
    redact_output()
    redact_output()  # a second call wraps nothing twice
    print(f"token {planted['HF_TOKEN']}")
    logging.getLogger("secrets-test").warning("key %s", planted["JUDGE_API_KEY"])
    assert capsys.readouterr().out == "token ***\n"
    assert caplog.records[-1].getMessage() == "key ***"


# ---- a real run and an export ----------------------------------------------------------------------------------

def leaks(secrets: dict[str, str], folders: list[Path]) -> list[str]:
    """'file: VAR' for every planted value found in a file under ``folders`` (bytes as written, and every string
    inside a checkpoint once loaded)."""
    found = []
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            texts = [path.read_bytes().decode("utf-8", "replace")]
            if path.suffix == ".ckpt":
                texts.append("\n".join(strings_in(torch.load(path, map_location="cpu", weights_only=False))))
            found += [f"{path}: {var}" for var, secret in secrets.items() if any(secret in t for t in texts)]
    return found


@pytest.mark.slow
def test_a_run_and_its_export_write_and_print_no_planted_secret(planted, tiny_run_args, tmp_path, capfd, caplog):
    caplog.set_level(logging.INFO)
    data = write_secret_dataset(tmp_path / "secret-rows.jsonl", list(planted.values()))
    result = train.main([*tiny_run_args, "--dataset-name", str(data), "--test-size", "0.25", "--max-length", "512",
                          "--max-steps", "2"])
    run = Path(result["run_dir"])
    export = upload_to_hub.main(["--checkpoint-path", str(run), "--training-type", "sft", "--local-dir",
                                 str(tmp_path / "export")])
    out, err = capfd.readouterr()
    # The planted values did reach what is written: the references of the validation answers, masked.
    generations = next((run / "generations").glob("*.jsonl")).read_text()
    assert generations.count("***") >= 4 * len(planted)
    ckpts = list(run.rglob("*.ckpt"))
    assert ckpts and (export / "README.md").is_file() and "after training" in out
    assert leaks(planted, [run, export]) == []
    for var, secret in planted.items():
        assert secret not in out and secret not in err and secret not in caplog.text, var
