"""Best-of-N evaluation: the table by hand, labeled candidates in the data_collection layout, and a resumable run."""

from __future__ import annotations

import gzip
import json

import pytest

from extension import best_of_n


def _problems(correct: list[list[bool]], answers: list[list[str]]) -> list[dict]:
    return [{"question_id": str(p), "question": f"q{p}", "candidates": [
        {"solution": f"s{i}", "answer": a, "correct": c} for i, (c, a) in enumerate(zip(cs, ans))]}
        for p, (cs, ans) in enumerate(zip(correct, answers))]


def test_best_of_n_table_by_hand():
    """Problem A: correct F T F T, answers 3 5 3 5, scores .1 .9 .8 .2.  Problem B: correct F F F T, answers 7 7 8 9,
    scores .5 .4 .3 .6.

    N=1 (4 groups of one): every method is the candidate accuracy: (2/4 + 1/4) / 2 = 0.375.
    N=2 (groups {0,1}, {2,3}): first: A F,F; B F,F -> 0. Majority: A ties 3/5 -> earliest (F) twice; B 7 (F), tie
      8/9 -> earliest (F) -> 0. Verifier: A picks 1 (T), 2 (F) -> 0.5; B picks 0 (F), 3 (T) -> 0.5; mean 0.5.
      Oracle: A 1, B 0.5 -> 0.75.
    N=4: first 0; majority: A tie -> candidate 0 (F), B '7' -> candidate 0 (F) -> 0; verifier: A 1 (T), B 3 (T) -> 1;
      oracle 1.
    """
    problems = _problems([[False, True, False, True], [False, False, False, True]], [["3", "5", "3", "5"], ["7", "7", "8", "9"]])
    table = best_of_n.best_of_n_table(problems, {"verifier": [[0.1, 0.9, 0.8, 0.2], [0.5, 0.4, 0.3, 0.6]]}, 4)
    expected = [{"N": 1, "first sample": 0.375, "majority vote": 0.375, "verifier": 0.375, "oracle": 0.375},
                {"N": 2, "first sample": 0.0, "majority vote": 0.0, "verifier": 0.5, "oracle": 0.75},
                {"N": 4, "first sample": 0.0, "majority vote": 0.0, "verifier": 1.0, "oracle": 1.0}]
    assert [row["N"] for row in table] == [1, 2, 4]
    for row, want in zip(table, expected):
        assert row == pytest.approx(want)


def _collection(tmp_path, n_questions: int = 3, per_question: int = 4):
    """data_collection-style rows, split into a correct and an incorrect file as in the release, with one
    solution repeated under another critique (a duplicate to drop)."""
    folder = tmp_path / "data_collection"
    folder.mkdir()
    files = {True: [], False: []}
    for q in range(n_questions):
        for i in range(per_question):
            correct = i % 2 == 1
            files[correct].append({"question": f"What is {q} + {i}?", "question_id": str(q), "model_output": f"{q} + {i} = {q + i if correct else 0}",
                                   "model_output_id": str(i), "correctness": "1" if correct else "0",
                                   "extracted_answer": str(q + i if correct else 0), "verifier_output": "..."})
    files[True].append(dict(files[True][0], verifier_output="another critique"))
    for correct, rows in files.items():
        name = f"critique_gen_{'correct' if correct else 'incorrect'}_solutions_round_0_shard_0.jsonl.gz"
        with gzip.open(folder / name, "wt") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_labeled_candidates_from_the_data_collection_layout(tmp_path):
    problems = best_of_n.read_labeled_candidates(_collection(tmp_path), num_problems=2, n=4)
    assert [p["question_id"] for p in problems] == ["0", "1"]
    assert all(len(p["candidates"]) == 4 for p in problems)  # the repeated solution was dropped
    assert sorted(c["correct"] for c in problems[0]["candidates"]) == [False, False, True, True]


def test_best_of_n_run_writes_its_report_and_resumes(tmp_path, tiny_model_dir, capsys):
    args = ["--verifier", str(tiny_model_dir), "--candidates", str(_collection(tmp_path)), "--num-problems", "2",
            "--n", "4", "--k-min", "2", "--k-max", "4", "--compare-fixed-k", "--verifier-max-new-tokens", "4",
            "--output-dir", str(tmp_path / "out")]
    results = best_of_n.main(args)
    out = tmp_path / "out"
    assert {"table.md", "results.json", "best_of_n.png", "scores.jsonl"} <= {p.name for p in out.iterdir()}
    assert [row["N"] for row in results["table"]] == [1, 2, 4]
    assert {"verifier (adaptive K)", "verifier (K=4)", "oracle"} <= set(results["table"][0])
    assert results["table"][-1]["oracle"] == 1.0 and 2 <= results["mean_rationales_adaptive"] <= 4
    scores = (out / "scores.jsonl").read_text()
    assert len(scores.splitlines()) == 8 and all(len(json.loads(r)["p_yes"]) == 4 for r in scores.splitlines())
    again = best_of_n.main(args)  # everything is read back: nothing is sampled again
    assert (out / "scores.jsonl").read_text() == scores and again["table"] == results["table"]
    with pytest.raises(SystemExit, match="--k-max 4 -> 8"):
        best_of_n.main([*args, "--k-max", "8"])
