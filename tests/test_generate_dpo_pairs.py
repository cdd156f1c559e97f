"""generate_dpo_pairs.py: pairing of scripted samples checked by math-verify, resume after a crash, the output as
train.py reads it, the --repo token check, and real sampling with the tiny model."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

import generate_dpo_pairs as gen
from config import resolve
from custom_dataset import CustomDataset, load_raw
from models import load_causal_lm, load_tokenizer

# (id, gold answer after '####', the scripted samples, expected pair or skip reason). A pair is given as
# (chosen index, rejected index, chosen answer, rejected answer), the answers as math-verify's extracted text.
CASES = [
    ("first-of-each", "12", ["#### 13", "wrong #### 11", "3 * 4 = 12\n#### 12", "#### 12"], (2, 0, "12", "13")),
    ("fraction", "1/2", ["Half of it.\n#### 0.5", "#### 2"], (0, 1, "0.5", "2")),
    ("thousands", "1000", ["#### 100", "10 * 100 = 1,000\n#### 1,000"], (1, 0, "1000", "100")),
    ("none-correct", "5", ["#### 1", "#### 2"], "no correct sample"),
    ("none-incorrect", "7", ["#### 7", "The answer is 7."], "no incorrect sample"),
    ("no-marker", "9", ["So the answer is 9 apples.", "I think it is 8."], (0, 1, "9", "8")),
    ("talks-on", "4", ["#### 4\nThen I add 9 more.", "#### 5"], (0, 1, "4", "5")),
    ("empty-sample", "3", ["", "#### 3", "#### 6"], (1, 2, "3", "6")),  # an empty answer is never the rejected one
]
SAMPLES = {f"Problem {case_id}?": samples for case_id, _, samples, _ in CASES}


def _rows() -> list[dict]:
    rows = [{"id": case_id, "question": f"Problem {case_id}?", "answer": f"Some working.\n#### {gold}"}
            for case_id, gold, _, _ in CASES]
    # A file has no test split, so train.py's carving (--test-size 0.02, seeded) holds one row of the 9 out of
    # 'train': with --seed 0 it is row 4, where this filler sits (checked by _train_ids).
    return [*rows[:4], {"id": "filler", "question": "Filler?", "answer": "#### 1"}, *rows[4:]]


def scripted(calls: list[list[str]], fail_on_call: int | None = None):
    """A stand-in for sample_solutions that answers from SAMPLES and records the questions of each call."""

    def sample(model, tokenizer, questions, k, **settings):
        calls.append(list(questions))
        if len(calls) == fail_on_call:
            raise RuntimeError("simulated crash")
        return [SAMPLES[q][:k] if k < len(SAMPLES[q]) else SAMPLES[q] for q in questions]

    return sample


@pytest.fixture
def problems_file(tmp_path):
    return write_jsonl(tmp_path / "gsm8k.jsonl", _rows())


def _args(model_dir, data, out, *extra) -> list[str]:
    return ["--model-name", str(model_dir), "--dataset-name", str(data), "--output-dir", str(out), "--seed", "0",
            "--samples-per-problem", "4", "--batch-size", "3", "--test-size", "0.2", *extra]


def _train_ids(data) -> list[str]:
    """Ids of the problems in the train split, in its (shuffled) order: every case but not the filler."""
    ids = list(load_raw(resolve(["--dataset-name", str(data), "--seed", "0"])[0])["train"]["id"])
    assert sorted(ids) == sorted(c[0] for c in CASES), "the seeded carving no longer holds out the filler row"
    return ids


def _expected_pair(case) -> dict:
    case_id, gold, samples, (good, bad, chosen_answer, rejected_answer) = case
    return {"prompt": f"Problem {case_id}?", "chosen": samples[good], "rejected": samples[bad], "question_id": case_id,
            "chosen_answer": chosen_answer, "rejected_answer": rejected_answer, "gold_answer": gold}


def _all_pairs(out) -> list[dict]:
    import datasets

    dataset = datasets.load_from_disk(str(out))
    return [*dataset["train"], *dataset["test"]]


def test_math_verify_reads_equivalent_forms_and_the_final_line():
    """The behaviour of math-verify 0.9 that the pairing relies on."""
    def ok(sample: str, gold: str) -> bool:
        import math_verify

        return gen.check(sample, math_verify.parse(gold))[1]

    assert ok("#### 0.5", "1/2") and ok("#### 1/2", "0.5") and ok("#### \\frac{1}{2}", "0.5")
    assert ok("#### 1,000", "1000") and ok("#### $18", "18") and ok("#### 12.0", "12")
    assert ok("Then 5 + 3 = 8 apples.", "8")  # no '####': the last number
    assert ok("#### 4\nThen 9 more.", "4") and not ok("#### 4\nThen 9 more.", "9")  # only the line after '####'
    assert not ok("#### 13", "12") and not ok("", "12") and not ok("no number here", "12")
    assert gen.check("#### 3,5", __import__("math_verify").parse("3.5"))[1]  # a comma before 1-2 digits is a decimal


def test_pairs_are_first_correct_against_first_incorrect(tiny_model_dir, problems_file, tmp_path, monkeypatch, capsys):
    calls: list[list[str]] = []
    monkeypatch.setattr(gen, "sample_solutions", scripted(calls))
    out = tmp_path / "pairs"
    summary = gen.main(_args(tiny_model_dir, problems_file, out))

    _train_ids(problems_file)
    expected = [_expected_pair(c) for c in CASES if isinstance(c[3], tuple)]
    assert sorted(_all_pairs(out), key=lambda p: p["question_id"]) == sorted(expected, key=lambda p: p["question_id"])
    assert summary["problems"] == 8 and summary["pairs"] == 6
    assert summary["skipped"] == {"no correct sample": 1, "no incorrect sample": 1}
    # 19 samples (4 + 3 + 6 * 2); correct: 2 in first-of-each and none-incorrect, 1 in the 5 other pairs.
    assert summary["samples"] == 19 and summary["sampled_accuracy"] == round(9 / 19, 4)
    assert "problems: 8, pairs: 6, skipped: 1 no correct sample, 1 no incorrect sample" in capsys.readouterr().out
    assert [len(c) for c in calls] == [3, 3, 2]  # --batch-size 3 over 8 problems


def test_fallback_uses_the_reference_when_no_sample_is_correct(tiny_model_dir, problems_file, tmp_path, monkeypatch):
    monkeypatch.setattr(gen, "sample_solutions", scripted([]))
    out = tmp_path / "pairs"
    gen.main(_args(tiny_model_dir, problems_file, out, "--fallback-to-reference"))
    pairs = {p["question_id"]: p for p in _all_pairs(out)}
    assert (pairs["none-correct"]["chosen"], pairs["none-correct"]["chosen_answer"]) == ("Some working.\n#### 5", "5")
    assert (pairs["none-correct"]["rejected"], pairs["none-correct"]["rejected_answer"]) == ("#### 1", "1")
    assert "none-incorrect" not in pairs and len(pairs) == 7  # all samples correct: still nothing to reject


def test_resume_after_a_crash_neither_repeats_nor_loses_problems(tiny_model_dir, problems_file, tmp_path, monkeypatch):
    out = tmp_path / "pairs"
    first: list[list[str]] = []
    monkeypatch.setattr(gen, "sample_solutions", scripted(first, fail_on_call=2))
    with pytest.raises(RuntimeError, match="simulated crash"):
        gen.main(_args(tiny_model_dir, problems_file, out))
    saved = [json.loads(line) for line in (out / gen.SAMPLES_FILE).read_text().splitlines()]
    assert [r["question"] for r in saved] == first[0]  # the first batch was flushed, the crashed one never written

    second: list[list[str]] = []
    monkeypatch.setattr(gen, "sample_solutions", scripted(second))
    summary = gen.main(_args(tiny_model_dir, problems_file, out))
    assert second[0] == first[1] and len(second) == 2  # the crashed batch again, then the last one
    ids = [json.loads(line)["question_id"] for line in (out / gen.SAMPLES_FILE).read_text().splitlines()]
    assert sorted(ids) == sorted(_train_ids(problems_file))  # each problem exactly once
    assert summary["problems"] == 8 and summary["pairs"] == 6

    with (out / gen.SAMPLES_FILE).open("a") as f:  # a crash in the middle of a write leaves a torn last line
        f.write('{"question_id": "torn", "sam')
    third: list[list[str]] = []
    monkeypatch.setattr(gen, "sample_solutions", scripted(third))
    assert gen.main(_args(tiny_model_dir, problems_file, out))["pairs"] == 6
    lines = (out / gen.SAMPLES_FILE).read_text().splitlines()
    assert third == [] and [json.loads(line)["question_id"] for line in lines] == ids  # the torn line is gone


def test_rerun_with_other_sampling_settings_is_refused(tiny_model_dir, problems_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gen, "sample_solutions", scripted([]))
    out = tmp_path / "pairs"
    gen.main(_args(tiny_model_dir, problems_file, out))
    with pytest.raises(SystemExit):
        gen.main(_args(tiny_model_dir, problems_file, out, "--temperature", "0.5"))
    assert f"--output-dir {out} holds rows made with other settings (--temperature 0.8 -> 0.5)" in capsys.readouterr().err


def test_output_loads_as_dpo_data(tiny_model_dir, problems_file, tmp_path, monkeypatch):
    monkeypatch.setattr(gen, "sample_solutions", scripted([]))
    out = tmp_path / "pairs"
    gen.main(_args(tiny_model_dir, problems_file, out))
    cfg = resolve(["--training-type", "dpo", "--dataset-name", str(out), "--storage-path", str(tmp_path), "--name", "d"])[0]
    train_set, test_set = CustomDataset.splits(cfg)
    pairs = {p["question_id"]: p for p in _all_pairs(out)}
    assert len(train_set) + len(test_set) == len(pairs) and len(test_set) >= 1
    for row in [*train_set.rows, *test_set.rows]:
        pair = next(p for p in pairs.values() if p["prompt"] == row["messages"][0]["content"])
        assert row["messages"][-1] == {"role": "assistant", "content": pair["chosen"]}
        assert row["rejected"] == pair["rejected"]


def test_repo_needs_hf_token_and_never_prints_it(tiny_model_dir, problems_file, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(SystemExit):
        gen.main(_args(tiny_model_dir, problems_file, tmp_path / "a", "--repo", "me/pairs"))
    assert "--repo me/pairs needs a Hugging Face write token in the HF_TOKEN environment variable" in capsys.readouterr().err

    import datasets

    pushed = {}
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", lambda self, repo, **kw: pushed.update(repo=repo, **kw))
    monkeypatch.setattr(gen, "sample_solutions", scripted([]))
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    no_output_dir = ["--model-name", str(tiny_model_dir), "--dataset-name", str(problems_file), "--seed", "0",
                     "--test-size", "0.2", "--repo", "me/pairs"]
    gen.main(no_output_dir)  # the samples go to a folder under the cache, so that a push can be resumed too
    assert pushed == {"repo": "me/pairs", "private": True, "token": "hf_secret_value"}
    assert (tmp_path / "cache" / "dpo-pairs" / "me--pairs" / gen.SAMPLES_FILE).is_file()
    captured = capsys.readouterr()
    assert "hf_secret_value" not in captured.out + captured.err


def test_real_sampling_shapes_and_determinism(tiny_model_dir):
    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    questions = ["What is 2 + 3?", "Tom has 5 apples and buys 7 more. How many does he have?"]
    settings = {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 8}
    first = gen.sample_solutions(model, tokenizer, questions, 2, seed=0, **settings)
    assert [len(s) for s in first] == [2, 2] and all(isinstance(t, str) for s in first for t in s)
    assert all(len(t) <= 8 for s in first for t in s)  # one character per token, at most 8 new tokens
    assert gen.sample_solutions(model, tokenizer, questions, 2, seed=0, **settings) == first
    assert gen.sample_solutions(model, tokenizer, questions, 2, seed=1, **settings) != first
