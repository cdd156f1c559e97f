"""Secrets kept out by construction (secrets_guard.py): a secret-shaped value in any string flag of train.py (or
YAML key), win_rate.py or upload_to_hub.py is refused naming the flag and where the secret goes instead; ``redact``
masks short ``sk-`` keys but keeps words such as "task-..."; and a real training run plus an export, with secrets
planted in the environment and in the data, writes none of them to any file of the run or the export (inside the
checkpoints too) nor to stdout, stderr or the logs; nor does any other script that writes files (win_rate.py,
evaluate_math.py, extension/best_of_n.py, generate_dpo_pairs.py, extension/data_preparation.py), the datasets
they save or push included. The Ray job's counterpart is in tests/test_ray.py.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import strings_in, write_jsonl, write_secret_dataset

import evaluate_math
import generate_dpo_pairs
import train
import upload_to_hub
import win_rate
from config import FIELD_TYPES, FIELDS, ConfigError, flag_name, resolve
from extension import best_of_n, data_preparation
from secrets_guard import redact, redact_data, redact_dataset, redact_output, write_json

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


# ---- every other script that writes files ----------------------------------------------------------------------

def quoted(secrets: dict[str, str]) -> str:
    """Every planted value in one string, as a prompt or an answer may quote them."""
    return " ".join(secrets.values())


def assert_masked(secrets: dict[str, str], folder: Path, masked_in: str) -> None:
    """No planted value in any file under ``folder``, and ``masked_in`` (a file there) shows them masked: the
    values did reach what was written."""
    assert leaks(secrets, [folder]) == []
    assert (folder / masked_in).read_text().count("***") >= len(secrets)


def test_write_json_masks_keys_and_values_and_leaves_no_staged_file(planted, tmp_path):
    path = write_json(tmp_path / "new" / "summary.json", {planted["HF_TOKEN"]: [f"key {planted['JUDGE_API_KEY']}", 1]})
    assert json.loads(path.read_text()) == {"***": ["key ***", 1]}
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]


def test_redact_dataset_masks_every_split_keeps_features_and_returns_a_clean_one_as_it_is(planted):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "n": datasets.Value("int32")})
    dirty = datasets.Dataset.from_dict({"text": [f"a {planted['OPENAI_API_KEY']}", "b"], "n": [1, 2]}, features=features)
    clean = datasets.Dataset.from_dict({"text": ["c"], "n": [3]}, features=features)
    empty = datasets.Dataset.from_dict({"text": [], "n": []}, features=features)
    redacted = redact_dataset(datasets.DatasetDict({"train": dirty, "test": clean, "none": empty}))
    assert redacted["train"].to_dict() == {"text": ["a ***", "b"], "n": [1, 2]}
    assert redacted["train"].features == features and redacted["none"].features == features
    assert redacted["test"] is clean and redact_dataset(clean) is clean


def test_win_rate_writes_no_planted_secret(planted, tmp_path, monkeypatch):
    class LengthJudge:
        def reward(self, prompt, response):
            return float(len(response))

    monkeypatch.setattr(win_rate, "make_judge", lambda kind, model: (LengthJudge(), "length"))
    answers = {name: write_jsonl(tmp_path / f"{name}.jsonl", [
        {"id": str(i), "prompt": [{"role": "user", "content": f"q{i} {quoted(planted)}"}],
         "completion": f"{name} {i}: {quoted(planted)}"} for i in range(2)]) for name in ("ours", "base")}
    win_rate.main(["--candidates", str(answers["ours"]), "--baseline", str(answers["base"]), "--output-dir",
                   str(tmp_path / "wr")])
    assert_masked(planted, tmp_path / "wr", "per_prompt.jsonl")


def test_evaluate_math_writes_no_planted_secret(planted, tmp_path):
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"id": f"{i}", "completion": f"{quoted(planted)}\n#### {i}",
                                                       "reference": "#### 1"} for i in range(2)])
    evaluate_math.main(["--predictions", str(predictions), "--output-dir", str(tmp_path / "out")])
    assert_masked(planted, tmp_path / "out", "results.jsonl")


def test_best_of_n_writes_no_planted_secret(planted, tmp_path, tiny_model_dir, monkeypatch):
    """Labeled candidates that quote the secrets, scored by a stand-in verifier whose rationales repeat the question
    (as a real one may): the scores, the settings, results.json, table.md and the plot hold none of them."""

    def score_solutions(model, tokenizer, questions, solutions, k_max, **settings):
        return [SimpleNamespace(p_yes=[0.5 + 0.1 * ("= 3" in s)] * k_max, p_normalized=[0.5] * k_max,
                                rationales=[f"Checking {q}"]) for q, s in zip(questions, solutions)]

    monkeypatch.setattr("extension.verifier.score_solutions", score_solutions)
    candidates = tmp_path / "candidates.jsonl"
    write_jsonl(candidates, [{"question": f"What is 1 + 2? {quoted(planted)}", "question_id": "0", "model_output_id": i,
                              "model_output": f"{quoted(planted)} 1 + 2 = {3 if i % 2 else 4}", "correctness": i % 2}
                             for i in range(2)])
    best_of_n.main(["--verifier", str(tiny_model_dir), "--candidates", str(candidates), "--num-problems", "1",
                    "--n", "2", "--k-min", "1", "--k-max", "2", "--output-dir", str(tmp_path / "out")])
    assert_masked(planted, tmp_path / "out", "scores.jsonl")


def test_generate_dpo_pairs_saves_and_pushes_no_planted_secret(planted, tmp_path, tiny_model_dir, monkeypatch):
    """The samples are drawn before two of the keys are exported, so samples.jsonl holds those two as they are (they
    were no secret then); the rerun that builds the dataset from it, every key set, saves and pushes none of them."""
    import datasets

    def sample_solutions(model, tokenizer, questions, k, **settings):
        # The questions are "What is i + 1? (...)": a right answer, then a wrong one.
        return [[f"{quoted(planted)}\n#### {int(q.split()[2]) + 1}", f"{quoted(planted)}\n#### 0"] for q in questions]

    pushed = []
    monkeypatch.setattr(generate_dpo_pairs, "sample_solutions", sample_solutions)
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", lambda self, repo, **kwargs: pushed.append(self))
    problems = write_secret_dataset(tmp_path / "problems.jsonl", list(planted.values()), rows=6)
    out = tmp_path / "pairs"
    args = ["--model-name", str(tiny_model_dir), "--dataset-name", str(problems), "--output-dir", str(out),
            "--samples-per-problem", "2", "--test-size", "0.3", "--repo", "me/pairs"]
    late = ("AWS_SECRET_ACCESS_KEY", "JUDGE_API_KEY")  # not token-shaped: a secret only once its variable is set
    for var in late:
        monkeypatch.delenv(var)
    generate_dpo_pairs.main(args)
    for var in late:
        monkeypatch.setenv(var, planted[var])
    pushed.clear()
    summary = generate_dpo_pairs.main(args)
    assert summary["pairs"] >= 2
    assert leaks(planted, [out]) == [f"{out / generate_dpo_pairs.SAMPLES_FILE}: {var}" for var in late]
    pairs = [row for split in datasets.load_from_disk(str(out)).values() for row in split]
    assert len(pairs) == summary["pairs"] and all(p["prompt"].count("***") == len(planted) for p in pairs)
    assert len(pushed) == 1 and leaks_in_dataset(planted, pushed[0]) == []


def test_data_preparation_saves_and_pushes_no_planted_secret(planted, tmp_path, monkeypatch):
    """genrm-critiques rows that quote the secrets in the question, the solution and the critique, and one whose
    critique (no verdict) ends with a key: skipped.jsonl quotes its end."""
    import datasets

    yes = "Step 1 is right.\n\nVerification: Is the answer correct (Yes/No)? Yes"
    rows = [{"question": f"Question {qid}? {quoted(planted)}", "question_id": qid, "model_output": f"{quoted(planted)} 5",
             "correctness": 1, "verifier_output": f"{quoted(planted)}\n{yes}"} for qid in range(4)]
    rows.append({**rows[0], "question_id": 9, "verifier_output": f"I cannot tell. {planted['JUDGE_API_KEY']}"})
    (tmp_path / "critiques" / "data_collection").mkdir(parents=True)
    with gzip.open(tmp_path / "critiques" / "data_collection" / "shard_0.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    pushed = []
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", lambda self, repo, **kwargs: pushed.append(self))
    out = tmp_path / "prep"
    summary = data_preparation.main(["--path", str(tmp_path / "critiques"), "--output-dir", str(out),
                                     "--repo", "me/genrm", "--val-fraction", "0.25"])
    assert summary["skipped"] == {"no verdict": 1}
    assert leaks(planted, [out]) == [] and "***" in (out / "skipped.jsonl").read_text()
    saved = datasets.load_from_disk(str(out))
    assert all("***" in row["prompt"] and "***" in row["rationale"] for row in saved["verify_train"])
    assert len(pushed) == 1 and leaks_in_dataset(planted, pushed[0]) == []


def leaks_in_dataset(secrets: dict[str, str], dataset) -> list[str]:
    """'split: VAR' for every planted value in a string of a DatasetDict."""
    return [f"{name}: {var}" for name, split in dataset.items() for var, secret in secrets.items()
            if any(secret in text for text in strings_in(split.to_dict()))]


def test_an_excerpt_is_redacted_before_it_is_cut(monkeypatch):
    """A key that the cut would halve: cut first, its tail no longer looks like a key and gets through redaction;
    ``excerpt`` redacts the whole text first, so no character of the key is left (the end or the start kept)."""
    from secrets_guard import excerpt, redact

    key = "sk-" + "A1b2C3d4E5f6G7h8J9k0L1m2"  # token-shaped
    text = "x" * 49 + " " + key + " end"
    assert "L1m2" in redact(text[-20:])  # the naive way: the key's last 16 characters leak
    assert excerpt(text, 20, end=True) == "x" * 12 + " *** end"
    monkeypatch.setenv("HF_TOKEN", "hf_envvalueXYZ0123456789abcd")
    assert excerpt("hf_envvalueXYZ0123456789abcd" + "y" * 50, 10) == "***" + "y" * 7
