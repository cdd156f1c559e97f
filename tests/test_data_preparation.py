"""extension/data_preparation.py: both genrm-critiques layouts written as small fixtures (exact counts per label,
skip reasons, the verdict forms the critic models write, question/solution parsing, the question-disjoint
validation carve), the synthetic source, --repo (with push_to_hub stubbed)."""

from __future__ import annotations

import gzip
import json
import zipfile
from collections import Counter

import pytest

from extension import data_preparation as prep

HEADER = 'Solve the math problems and provide step-by-step solutions.\nWhen asked "Verification: ...", respond.\n\n'
YES = "Step 1: 2 + 3 = 5. Correct.\n\nVerification: Is the answer correct (Yes/No)? Yes"
NO = "Step 1: 2 + 3 = 6. Wrong.\n\nVerification: Is the answer correct (Yes/No)? No"


def inputs(question: str, solution: str) -> str:
    return f"{HEADER}Q: {question}\nA: Let's think step by step.\n{solution}\nVerification: Let's verify step by step.\n"


def write_zip(path, rows: list[dict]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(path.name.replace(".zip", ".jsonl"), "".join(json.dumps(r) + "\n" for r in rows))


def zip_row(qid: int, question: str, solution: str, targets: str) -> dict:
    return {"inputs": inputs(question, solution), "targets": targets, "question_id": qid, "model_output_id": 0}


def dc_row(qid: int, correctness: int | str, verifier_output: str, solution: str = "2 + 3 = 5. The answer is 5.") -> dict:
    """A data_collection row; the release's `correctness` is an int (0/1), the reader takes "0"/"1" too."""
    return {"question": f"Question {qid}?", "question_id": qid, "model_output": solution, "model_output_id": 0,
            "extracted_answer": "5", "target": "5", "correctness": correctness, "verifier_prompt": "...",
            "verifier_output": verifier_output}


# (question id, correctness, rationale, label parsed or None) for the data_collection fixture's rows 25-30.
VERDICT_FORMS = [
    (43, 1, "Step 1 is right.\n**Verification:**\nIs the answer correct (Yes/No)? Yes", "Yes"),
    (44, 0, "Step 2 is off.\n**Verification**: Is the answer correct (Yes/No)? No", "No"),
    (45, 1, "All steps check.\n\n  Verification:  \n Is the answer  correct\n(Yes/No)?\n\n  Yes  \n", "Yes"),
    (46, 0, "Step 3 is off.\n\n**Verification:** Is the answer correct? (Yes/No) **No**\n\n**Final Grade:** 2 of 5", "No"),
    (47, "1", "Fine.\n\n**Final Grade:** Verification: Is the answer correct? (Yes/No)? __yes__", "Yes"),
    (48, 0, "Unsure.\n\nVerification: Is the answer correct (Yes/No)? Yes/No", None),
]


@pytest.fixture
def critiques(tmp_path):
    """Zip layout: 3 correct-solution rows (one critique says No, one a duplicate solution), a _val zip.
    data_collection (integer correctness as in the release, one string): rows 1-20 say Yes; then a _val question,
    a bold verdict with a trailer, no verdict, a verdict against correctness, and rows 25-30 in the other forms the
    critic models write the verdict (the last one, "Yes/No" copied from the question, is no verdict)."""
    root = tmp_path / "critiques"
    root.mkdir()
    write_zip(root / "critiques_correct_solutions_batch_01.zip", [
        zip_row(1, "Tom has 2 apples.\nHe buys 3. How many?", "2 + 3 = 5.\nThe answer is 5.", YES),
        zip_row(1, "Tom has 2 apples.\nHe buys 3. How many?", "2 + 3 = 5.\nThe answer is 5.", YES),
        zip_row(2, "Maya has 4 pens. She buys 1. How many?", "4 + 1 = 5. The answer is 5.", NO),
    ])
    write_zip(root / "critiques_incorrect_solutions_batch_01.zip", [zip_row(3, "Q3?", "Wrong. The answer is 6.", NO)])
    write_zip(root / "critiques_correct_solutions_batch_02_val.zip", [zip_row(10, "Q10?", "Right.", YES)])
    write_zip(root / "critiques_incorrect_solutions_batch_02_val.zip", [zip_row(10, "Q10?", "Wrong.", NO)])
    (root / "data_collection").mkdir()
    rows = [dc_row(qid, 1, YES) for qid in range(20, 40)] + [
        dc_row(10, 0, NO, "Also wrong."),  # a _val question of the zip layout: must stay in validation
        dc_row(40, 0, "Step 1 is wrong.\n\nVerification: Is the answer correct (Yes/No)? **No**\n\nGrade: F"),
        dc_row(41, 0, "I cannot tell."),
        dc_row(42, 1, NO),
        *(dc_row(qid, correctness, text) for qid, correctness, text, _ in VERDICT_FORMS),
    ]
    with gzip.open(root / "data_collection" / "critique_gen_round_0_shard_0.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_parse_inputs_exact():
    question, solution = "Tom has 2 apples.\nHe buys 3. How many?", "2 + 3 = 5.\nThe answer is 5."
    assert prep.parse_inputs(inputs(question, solution)) == (question, solution)
    assert prep.parse_inputs(prep.build_prompt(question, solution)) == (question, solution)
    with pytest.raises(prep.SkipRow, match="inputs not in the Q:/A:/Verification layout"):
        prep.parse_inputs("Q: no answer marker\nVerification: Let's verify step by step.")


@pytest.mark.parametrize(("text", "label", "head"), [
    (YES, "Yes", "Step 1: 2 + 3 = 5. Correct."),
    ("Bad.\n**Verification: Is the answer correct (Yes/No)? No**", "No", "Bad."),
    ("Ok.\nVerification:** Is the answer correct (Yes/No)?** Yes\n\n**Final Grade: A**", "Yes", "Ok."),
    ("Verification: Is the answer correct (Yes/No)? <b>no</b>", "No", ""),
    # Markdown and whitespace between the parts, and the "correct? (Yes/No)" variant:
    ("Ok.\n**Verification:**\nIs the answer correct (Yes/No)? Yes", "Yes", "Ok."),
    ("Ok.\n**Verification**: Is the answer correct (Yes/No)? No", "No", "Ok."),
    ("Ok.\n\n  Verification:  \n Is the answer  correct\n(Yes/No)?\n\n  Yes  \n", "Yes", "Ok."),
    ("Ok.\n\n**Verification:** Is the answer correct? (Yes/No) **No**\n\n**Final Grade:** 2 of 5", "No", "Ok."),
    ("Ok.\n<b>Verification:</b> Is the answer correct? (Yes/No)? <b>Yes</b>", "Yes", "Ok."),
    # Without "(Yes/No)" at all (86 rows of the release end in exactly this):
    ("Ok.\n\n**Verification: Is the answer correct? Yes**", "Yes", "Ok."),
    ("Ok.\n* Verification: Is the answer correct? **No**", "No", "Ok."),
    # The last verdict counts, the text before it is kept:
    ("Verification: Is the answer correct (Yes/No)? No\nOn second thought:\n"
     "Verification: Is the answer correct? (Yes/No) Yes", "Yes",
     "Verification: Is the answer correct (Yes/No)? No\nOn second thought:"),
])
def test_parse_verdict_normalises_the_last_line(text, label, head):
    rationale, got = prep.parse_verdict(text)
    assert got == label
    assert rationale == (f"{head}\n\n" if head else "") + f"Verification: Is the answer correct (Yes/No)? {label}"


@pytest.mark.parametrize("text", [
    "I cannot tell.",
    "Verification: Is the answer correct (Yes/No)?",
    "Verification: Is the answer correct (Yes/No)? Yes/No",
    "Verification: Is the answer correct? (Yes/No) Maybe",
    "Verification: Is the answer correct? Maybe. Yes, I think so.",
    "Verification: Is the answer correct (Yes/No)? Yesterday it was.",
    "Is the answer correct (Yes/No)? Yes",
])
def test_parse_verdict_rejects_text_without_a_final_verdict(text):
    with pytest.raises(prep.SkipRow, match="no verdict"):
        prep.parse_verdict(text)


def test_zip_layout_counts_and_skips(critiques, tmp_path):
    for dc in (critiques / "data_collection").iterdir():
        dc.unlink()
    summary = prep.main(["--path", str(critiques), "--output-dir", str(tmp_path / "out")])
    assert summary["kept"] == {"verify_train": {"No": 1, "Yes": 2}, "verify_validation": {"No": 1, "Yes": 1},
                               "correct_train": {"rows": 2}, "correct_validation": {"rows": 1}}
    assert summary["skipped_rows"] == [{"file": "critiques_correct_solutions_batch_01.zip/"
                                                "critiques_correct_solutions_batch_01.jsonl", "row": 3,
                                        "reason": "verdict disagrees with file name",
                                        "detail": "verdict No, file name says Yes"}]
    import datasets

    data = datasets.load_from_disk(str(tmp_path / "out"))
    first = data["verify_train"][0]
    assert first["question"] == "Tom has 2 apples.\nHe buys 3. How many?"
    assert first["solution"] == "2 + 3 = 5.\nThe answer is 5."
    assert first["prompt"] == ("Q: Tom has 2 apples.\nHe buys 3. How many?\nA: Let's think step by step.\n"
                               "2 + 3 = 5.\nThe answer is 5.\nVerification: Let's verify step by step.")
    assert first["rationale"] == YES and first["label"] == "Yes" and first["question_id"] == "1"
    # The row whose critique says No is still a correct solution; the duplicate is dropped.
    assert data["correct_train"]["question_id"] == ["1", "2"]
    assert json.loads((tmp_path / "out" / "skipped.jsonl").read_text())["row"] == 3


def test_data_collection_layout_labels_per_class(critiques, tmp_path):
    """The data_collection file alone, nothing held out: Yes = rows 1-20 and the forms of 43, 45, 47 (23); No =
    questions 10, 40, 44, 46 (4); skipped: 41 and 48 (no verdict), 42 (a No verdict on a correct solution);
    correct solutions, whatever their critique says: 20-39, 42, 43, 45, 47 (24)."""
    for batch in critiques.glob("*.zip"):
        batch.unlink()
    summary = prep.main(["--path", str(critiques), "--output-dir", str(tmp_path / "out"), "--val-fraction", "0"])
    assert summary["kept"] == {"verify_train": {"No": 4, "Yes": 23}, "verify_validation": {},
                               "correct_train": {"rows": 24}, "correct_validation": {"rows": 0}}
    assert summary["skipped"] == {"no verdict": 2, "verdict disagrees with correctness": 1}
    assert [s["row"] for s in summary["skipped_rows"]] == [23, 24, 30]
    import datasets

    data = datasets.load_from_disk(str(tmp_path / "out"))
    labels = dict(zip(data["verify_train"]["question_id"], data["verify_train"]["label"]))
    assert labels == {**{str(q): "Yes" for q in range(20, 40)}, "10": "No", "40": "No",
                      **{str(q): label for q, _, _, label in VERDICT_FORMS if label}}
    assert data["correct_train"]["question_id"] == [*map(str, range(20, 40)), "42", "43", "45", "47"]


def test_both_layouts_carve_disjoint_validation(critiques, tmp_path, capsys):
    summary = prep.main(["--path", str(critiques), "--output-dir", str(tmp_path / "out"), "--val-fraction", "0.2"])
    reasons = [(s["file"], s["row"], s["reason"]) for s in summary["skipped_rows"]]
    assert reasons == [
        ("critiques_correct_solutions_batch_01.zip/critiques_correct_solutions_batch_01.jsonl", 3,
         "verdict disagrees with file name"),
        ("critique_gen_round_0_shard_0.jsonl.gz", 23, "no verdict"),
        ("critique_gen_round_0_shard_0.jsonl.gz", 24, "verdict disagrees with correctness"),
        ("critique_gen_round_0_shard_0.jsonl.gz", 30, "no verdict"),
    ]
    assert summary["skipped"] == {"no verdict": 2, "verdict disagrees with file name": 1,
                                  "verdict disagrees with correctness": 1}
    import datasets

    data = datasets.load_from_disk(str(tmp_path / "out"))
    train = set(data["verify_train"]["question_id"]) | set(data["correct_train"]["question_id"])
    val = set(data["verify_validation"]["question_id"]) | set(data["correct_validation"]["question_id"])
    assert not train & val
    # 32 carve-able ids (1, 2, 3, 20..48; 10 is a _val question): 20% is round(6.4) = 6, plus question 10. Ids
    # whose only row was skipped (41, 48: no verdict, not a correct solution) have no row in either split.
    carved = prep.validation_ids(prep.read_genrm(critiques, prep.Report()), 0.2, 0)
    assert "10" in carved and len(carved - {"10"}) == 6
    assert val == carved - {"41", "48"}
    total = {s: sum(v.values()) for s, v in summary["kept"].items()}
    assert total["verify_train"] + total["verify_validation"] == 3 + 2 + 22 + 5  # zip kept + _val + dc kept
    assert summary["rows_read"]["critique_gen_round_0_shard_0.jsonl.gz"] == 30
    out = capsys.readouterr().out
    assert "no verdict: 2" in out and "critique_gen_round_0_shard_0.jsonl.gz row 23: no verdict" in out


def test_synthetic_labels_match_is_correct_and_balance(tmp_path):
    summary = prep.main(["--source", "synthetic", "--num-problems", "40", "--output-dir", str(tmp_path / "s")])
    import datasets

    import synthetic_math

    data = datasets.load_from_disk(str(tmp_path / "s"))
    rows = list(data["verify_train"]) + list(data["verify_validation"])
    problems = {p.id: p for p in synthetic_math.generate_problems(40, seed=0)}
    # Levels 1, 2, 3 cycle: 14, 13 and 13 problems, right and wrong alternating within each (7/7, 7/6, 7/6).
    by_level = {level: [r["label"] for r in rows if problems[r["question_id"]].level == level] for level in (1, 2, 3)}
    assert {level: (labels.count("Yes"), labels.count("No")) for level, labels in by_level.items()} == {
        1: (7, 7), 2: (7, 6), 3: (7, 6)}
    for row in rows:
        problem = problems[row["question_id"]]
        assert row["label"] == ("Yes" if row["solution"] == synthetic_math.correct_solution(problem) else "No")
        assert row["rationale"].endswith(f"Verification: Is the answer correct (Yes/No)? {row['label']}")
    assert summary["kept"]["correct_validation"] == {"rows": 2} and summary["skipped"] == {}
    assert not set(data["verify_train"]["question_id"]) & set(data["verify_validation"]["question_id"])


def test_repo_without_token_errors_clearly(monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(SystemExit):
        prep.main(["--source", "synthetic", "--repo", "me/genrm"])
    assert "--repo me/genrm needs a Hugging Face write token in the HF_TOKEN environment variable" in capsys.readouterr().err


def test_repo_pushes_a_private_dataset_with_the_env_token(monkeypatch, capsys):
    import datasets

    pushes = []
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub",
                        lambda self, repo, **kwargs: pushes.append((self, repo, kwargs)))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    summary = prep.main(["--source", "synthetic", "--num-problems", "8", "--repo", "me/genrm"])
    assert len(pushes) == 1
    dataset, repo, kwargs = pushes[0]
    assert repo == "me/genrm" and kwargs == {"private": True, "token": "hf_test_token"}
    assert set(dataset) == set(prep.SPLITS)
    assert sum(len(dataset[name]) for name in ("verify_train", "verify_validation")) == 8
    assert summary["kept"]["verify_train"] == dict(sorted(Counter(dataset["verify_train"]["label"]).items()))
    assert dataset["verify_train"].column_names == list(prep.VERIFY_COLUMNS)
    assert "pushed to the private hub dataset me/genrm" in capsys.readouterr().out


def test_path_without_either_layout_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        prep.main(["--path", str(tmp_path), "--output-dir", str(tmp_path / "out")])
    assert "has neither critiques_*_solutions_batch_*.zip batches nor a data_collection folder" in capsys.readouterr().err


def _policy_folder(tmp_path, records: list[dict], dataset_name: str = "synthetic-math"):
    """A generate_dpo_pairs.py output folder: its settings file and samples.jsonl (the layout sample_problems writes)."""
    folder = tmp_path / "samples"
    folder.mkdir(parents=True)
    (folder / "generation.json").write_text(json.dumps(
        {"model_name": "policy", "dataset_name": dataset_name, "split": "train", "samples_per_problem": 4,
         "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 128, "seed": 7, "synthetic_levels": "1,2"}))
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_policy_samples_become_rationales_checked_against_the_known_computation(tmp_path):
    """Two problems x four samples: a correct one (Yes), a one-slip one (No), one not in the solution format and one
    with right steps but a wrong "####" line (rationale says Yes, math-verify says No): 2 Yes, 2 No, 4 skipped."""
    import random

    import datasets

    import synthetic_math as sm

    problems = sm.generate_problems(4, 7, (1, 2))[2:]  # ids synth-7-2 and synth-7-3: not the stream's first
    records = []
    for p in problems:
        wrong, index = sm.wrong_solution(p, random.Random(0))
        bad_answer = sm.solution_text(p.steps, p.answer + 1)
        records.append({"question_id": p.id, "question": p.question, "reference": sm.correct_solution(p),
                        "gold_answer": str(p.answer), "samples": [sm.correct_solution(p), wrong, "I think 12.", bad_answer],
                        "answers": [str(p.answer), "x", "12", str(p.answer + 1)], "correct": [True, False, False, False]})
    summary = prep.main(["--source", "policy", "--path", str(_policy_folder(tmp_path, records)),
                         "--val-fraction", "0", "--output-dir", str(tmp_path / "out")])
    assert summary["kept"]["verify_train"] == {"No": 2, "Yes": 2}
    assert summary["kept"]["correct_train"] == {"rows": 2}
    assert summary["skipped"] == {"sample not in the solution format": 2, "verdict disagrees with math-verify": 2}
    assert [(s["row"], s["reason"]) for s in summary["skipped_rows"]] == [
        (1, "sample not in the solution format"), (1, "verdict disagrees with math-verify"),
        (2, "sample not in the solution format"), (2, "verdict disagrees with math-verify")]
    data = datasets.load_from_disk(str(tmp_path / "out"))
    first = data["verify_train"][0]
    assert first["solution"] == sm.correct_solution(problems[0]) and first["label"] == "Yes"
    # The generator's rationale, its verdict line normalised as every source's is (a blank line before it).
    assert first["rationale"] == prep.parse_verdict(sm.verification_rationale(problems[0], problems[0].steps)[0])[0]
    no = data["verify_train"][1]
    _, index = sm.wrong_solution(problems[0], random.Random(0))
    assert no["label"] == "No" and f"so step {index + 1} is wrong." in no["rationale"]
    assert data["correct_train"]["solution"] == [sm.correct_solution(p) for p in problems]


def test_policy_samples_of_another_dataset_or_stream_error_clearly(tmp_path, capsys):
    record = {"question_id": "synth-7-0", "question": "Not the generator's question.", "samples": [], "correct": []}
    with pytest.raises(SystemExit):
        prep.main(["--source", "policy", "--path", str(_policy_folder(tmp_path, [record])), "--output-dir",
                   str(tmp_path / "out")])
    assert "samples.jsonl row 1: the question of synth-7-0 is not synthetic-math's with seed and levels 7, 1,2" \
        in capsys.readouterr().err
    folder = _policy_folder(tmp_path / "gsm", [record], dataset_name="gsm8k")
    with pytest.raises(SystemExit):
        prep.main(["--source", "policy", "--path", str(folder), "--output-dir", str(tmp_path / "out2")])
    assert "samples of --dataset-name gsm8k; --source policy needs synthetic-math" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prep.main(["--source", "policy", "--output-dir", str(tmp_path / "out3")])
    assert "--source policy needs --path" in capsys.readouterr().err
