"""extension/data_preparation.py: both genrm-critiques layouts written as small fixtures (exact counts, skip
reasons, question/solution parsing, the question-disjoint validation carve), the synthetic source, --repo."""

from __future__ import annotations

import gzip
import json
import zipfile

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


def dc_row(qid: int, correctness: str, verifier_output: str, solution: str = "2 + 3 = 5. The answer is 5.") -> dict:
    return {"question": f"Question {qid}?", "question_id": qid, "model_output": solution, "model_output_id": 0,
            "extracted_answer": "5", "target": "5", "correctness": correctness, "verifier_prompt": "...",
            "verifier_output": verifier_output}


@pytest.fixture
def critiques(tmp_path):
    """Zip layout: 3 correct-solution rows (one critique says No, one a duplicate solution), a _val zip.
    data_collection: correctness 1/0 rows, one rationale without a verdict, one bold verdict with a trailer."""
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
    rows = [dc_row(qid, "1", YES) for qid in range(20, 40)] + [
        dc_row(10, "0", NO, "Also wrong."),  # a _val question of the zip layout: must stay in validation
        dc_row(40, "0", "Step 1 is wrong.\n\nVerification: Is the answer correct (Yes/No)? **No**\n\nGrade: F"),
        dc_row(41, "0", "I cannot tell."),
        dc_row(42, "1", NO),
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
])
def test_parse_verdict_normalises_the_last_line(text, label, head):
    rationale, got = prep.parse_verdict(text)
    assert got == label
    assert rationale == (f"{head}\n\n" if head else "") + f"Verification: Is the answer correct (Yes/No)? {label}"


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


def test_both_layouts_carve_disjoint_validation(critiques, tmp_path, capsys):
    summary = prep.main(["--path", str(critiques), "--output-dir", str(tmp_path / "out"), "--val-fraction", "0.2"])
    reasons = [(s["file"], s["row"], s["reason"]) for s in summary["skipped_rows"]]
    assert reasons == [
        ("critiques_correct_solutions_batch_01.zip/critiques_correct_solutions_batch_01.jsonl", 3,
         "verdict disagrees with file name"),
        ("critique_gen_round_0_shard_0.jsonl.gz", 23, "no verdict"),
        ("critique_gen_round_0_shard_0.jsonl.gz", 24, "verdict disagrees with correctness"),
    ]
    assert summary["skipped"] == {"verdict disagrees with file name": 1, "no verdict": 1,
                                  "verdict disagrees with correctness": 1}
    import datasets

    data = datasets.load_from_disk(str(tmp_path / "out"))
    train = set(data["verify_train"]["question_id"]) | set(data["correct_train"]["question_id"])
    val = set(data["verify_validation"]["question_id"]) | set(data["correct_validation"]["question_id"])
    assert not train & val
    # 25 carve-able ids (1, 2, 3, 20..39, 40, 42; 41 and 10 aside): 20% is 5, plus the _val question 10.
    assert "10" in val and len(val - {"10"}) == 5
    total = {s: sum(v.values()) for s, v in summary["kept"].items()}
    assert total["verify_train"] + total["verify_validation"] == 3 + 2 + 20 + 2  # zip kept + _val + dc kept
    assert summary["rows_read"]["critique_gen_round_0_shard_0.jsonl.gz"] == 24
    out = capsys.readouterr().out
    assert "no verdict: 1" in out and "critique_gen_round_0_shard_0.jsonl.gz row 23: no verdict" in out


def test_synthetic_labels_match_is_correct_and_balance(tmp_path):
    summary = prep.main(["--source", "synthetic", "--num-problems", "40", "--output-dir", str(tmp_path / "s")])
    import datasets

    import synthetic_math

    data = datasets.load_from_disk(str(tmp_path / "s"))
    rows = list(data["verify_train"]) + list(data["verify_validation"])
    assert sum(r["label"] == "Yes" for r in rows) == sum(r["label"] == "No" for r in rows) == 20
    problems = {p.id: p for p in synthetic_math.generate_problems(40, seed=0)}
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


def test_path_without_either_layout_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        prep.main(["--path", str(tmp_path), "--output-dir", str(tmp_path / "out")])
    assert "has neither critiques_*_solutions_batch_*.zip batches nor a data_collection folder" in capsys.readouterr().err
