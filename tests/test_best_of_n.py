"""Best-of-N evaluation: the table and the whole report by hand, labeled candidates in the data_collection layout
(a seeded sample, whatever the files' order), and a resumable run."""

from __future__ import annotations

import argparse
import gzip
import json

import pytest

from custom_dataset import DataError
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


def test_report_by_hand(tmp_path):
    """Two problems, 4 candidates each, K_max = 4 rationales per candidate, adaptive K with K_min 2, tau 0.01
    (stop after 2 when the population variance ((a - b) / 2)^2 of the first two p("Yes") is below 0.01).

    candidate  correct  answer  p("Yes")                 k  adaptive score  fixed K=4 score  p_normalized, mean of k
    A0         F        6       .875 .875 .125 .125      2  .875            .5               1 1 0 0 -> 1
    A1         T        5       1 .5 .5 1 (var .0625)    4  .75             .75              1 (x4) -> 1
    A2         F        4       .25 (x4)                 2  .25             .25              .25 (x4) -> .25
    A3         T        5       .5 .5 1 1                2  .5              .75              .75 (x4) -> .75
    B0         F        7       .25 .25 .75 .75          2  .25             .5               .5 (x4) -> .5
    B1         F        ""      .5 (x4)                  2  .5              .5               .75 (x4) -> .75
    B2         T        9       .625 (x4)                2  .625            .625             .75 (x4) -> .75
    B3         F        7       0 1 0 1 (var .25)        4  .5              .5               .5 (x4) -> .5

    candidate accuracy 3/8 = .375; mean rationales (2+4+2+2 + 2+2+2+4) / 8 = 20/8 = 2.5.
    AUC (3 positives x 5 negatives = 15 pairs, ties half):
      adaptive: .75 beats .25 .25 .5 .5 (4); .5 beats .25 .25, ties .5 .5 (3); .625 beats 4 -> 11/15.
      normalized: 1 beats .25 .5 .75 .5, ties A0's 1 (4.5); each .75 beats .25 .5 .5, ties B1 (3.5 twice) -> 11.5/15.
      fixed K: .75 .75 .625 beat every negative (.5 .25 .5 .5 .5) -> 15/15.
    decisions (score >= .5), adaptive vs fixed: only B0 differs (.25 vs .5) -> 7/8 = .875.
    Best-of-4 picks (ties: earliest): A adaptive 0 (.875), fixed 1 (.75 ties A3); B both 2 -> 1/2 = .5.
    table (each N: mean over the 4/N groups of a problem, then over the 2 problems):
      N=1: every method is the candidate accuracy: (2/4 + 1/4) / 2 = .375.
      N=2, groups {0,1} {2,3}: first: A0 F, A2 F -> 0; B0 F, B2 T -> .5; (0 + .5) / 2 = .25.
        majority: A 6/5 tie -> A0 F, 4/5 tie -> A2 F -> 0; B "7" ("" has no answer) -> B0 F, 9/7 tie -> B2 T
        -> .5; .25.  adaptive: A .875>.75 -> A0 F, .5>.25 -> A3 T -> .5; B .5>.25 -> B1 F, .625 -> B2 T -> .5; .5.
        fixed: A .75>.5 -> A1 T, .75>.25 -> A3 T -> 1; B tie .5 -> B0 F, B2 T -> .5; .75.
        oracle: A 1, 1; B 0, 1 -> (1 + .5) / 2 = .75.
      N=4: first A0 F, B0 F -> 0.  majority: A "5" twice -> A1 T; B "7" twice -> B0 F -> .5.
        adaptive: A0 F, B2 T -> .5.  fixed: A1 T, B2 T -> 1.  oracle 1.
    Every number is a dyadic fraction or k/15 from the same division, so they compare exactly.
    """
    problems = _problems([[False, True, False, True], [False, False, True, False]],
                         [["6", "5", "4", "5"], ["7", "", "9", "7"]])
    p_yes = [[[.875, .875, .125, .125], [1, .5, .5, 1], [.25] * 4, [.5, .5, 1, 1]],
             [[.25, .25, .75, .75], [.5] * 4, [.625] * 4, [0, 1, 0, 1]]]
    p_normalized = [[[1, 1, 0, 0], [1] * 4, [.25] * 4, [.75] * 4], [[.5] * 4, [.75] * 4, [.75] * 4, [.5] * 4]]
    scored = {(str(p), i): {"question_id": str(p), "index": i, "p_yes": p_yes[p][i], "p_normalized": p_normalized[p][i],
                            "rationale": "..."} for p in range(2) for i in range(4)}
    args = argparse.Namespace(n=4, k_min=2, k_max=4, tau=0.01, compare_fixed_k=True)
    results = best_of_n.report(args, problems, scored)
    assert results == {
        "problems": 2, "candidates_per_problem": 4, "candidate_accuracy": 0.375,
        "auc": 11 / 15, "auc_normalized": 11.5 / 15, "mean_rationales_adaptive": 2.5,
        "auc_fixed_k": 1.0, "decision_agreement": 0.875, "pick_agreement": 0.5, "rationales_fixed_k": 4,
        "table": [
            {"N": 1, "first sample": .375, "majority vote": .375, "verifier (adaptive K)": .375,
             "verifier (K=4)": .375, "oracle": .375},
            {"N": 2, "first sample": .25, "majority vote": .25, "verifier (adaptive K)": .5, "verifier (K=4)": .75,
             "oracle": .75},
            {"N": 4, "first sample": 0.0, "majority vote": .5, "verifier (adaptive K)": .5, "verifier (K=4)": 1.0,
             "oracle": 1.0},
        ]}
    best_of_n.write_outputs(results, tmp_path)
    assert (tmp_path / "table.md").read_text().splitlines() == [
        "| N | first sample | majority vote | verifier (adaptive K) | verifier (K=4) | oracle |",
        "|---|---|---|---|---|---|",
        "| 1 | 37.5% | 37.5% | 37.5% | 37.5% | 37.5% |",
        "| 2 | 25.0% | 25.0% | 50.0% | 75.0% | 75.0% |",
        "| 4 | 0.0% | 50.0% | 50.0% | 100.0% | 100.0% |",
        "",
        "2 problems, 4 candidates each, 37.5% of candidates correct.",
        "Verifier AUC: 0.733 (p('Yes'), adaptive K), 0.767 (Yes/(Yes+No)).",
        "Adaptive K: 2.5 rationales per candidate on average.",
        "Against fixed K=4 (AUC 1.000): decisions (score >= 0.5) agree on 87.5% of candidates, "
        "Best-of-4 picks on 50.0% of problems.",
    ]
    assert json.loads((tmp_path / "results.json").read_text()) == results


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


def _write_labeled(folder, counts: dict[str, tuple[int, int]], incorrect_first: bool = False):
    """data_collection files for ``counts`` (question id -> (correct, incorrect) candidates), one file per label
    as in the release. By default the correct file sorts first and each file lists its rows by question, so the
    first rows read of a question are all correct; ``incorrect_first`` names the files the other way round and
    reverses the rows. Integer ids and correctness, as in the release."""
    folder.mkdir(parents=True)
    rows = {True: [], False: []}
    for qid, (n_correct, n_wrong) in counts.items():
        for i in range(n_correct + n_wrong):
            correct = i < n_correct
            rows[correct].append({"question": f"Question {qid}?", "question_id": int(qid), "model_output_id": i,
                                  "model_output": f"solution {i} of {qid}", "extracted_answer": "1" if correct else "2",
                                  "correctness": int(correct), "verifier_output": "..."})
    for correct, label_rows in rows.items():
        prefix = ("b" if correct else "a") if incorrect_first else ("a" if correct else "b")
        name = f"{prefix}_critique_gen_{'correct' if correct else 'incorrect'}_solutions_round_0_shard_0.jsonl.gz"
        with gzip.open(folder / name, "wt") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in (label_rows[::-1] if incorrect_first else label_rows)))
    return folder


def test_labeled_candidates_are_a_seeded_sample_not_the_first_rows(tmp_path, capsys):
    """Questions 0-2 have 6 correct and 6 incorrect candidates, the correct file read first: keeping each
    question's first 4 rows would give 4 correct candidates each (the bias). Question 3 has only correct ones."""
    counts = {"0": (6, 6), "1": (6, 6), "2": (6, 6), "3": (8, 0)}
    ordered = _write_labeled(tmp_path / "ordered", counts)
    reordered = _write_labeled(tmp_path / "reordered", counts, incorrect_first=True)
    read = best_of_n.read_labeled_candidates
    problems = read(ordered, num_problems=10, n=4, seed=0)
    assert [p["question_id"] for p in problems] == ["0", "1", "2", "3"]
    for p in problems:  # n distinct candidates of the question's own pool
        solutions = [c["solution"] for c in p["candidates"]]
        assert len(set(solutions)) == 4 and all(s.endswith(f" of {p['question_id']}") for s in solutions)
        assert all(c["answer"] == ("1" if c["correct"] else "2") for c in p["candidates"])
    # Seeded, and the same sample, in the same order, whatever the files' and rows' order.
    assert read(ordered, 10, 4, seed=0) == problems == read(reordered, 10, 4, seed=0)
    assert read(ordered, 10, 4, seed=1) != problems
    # The first-rows rule would give 12 correct of 12 for questions 0-2 (and 12 incorrect with `reordered`).
    mix = [sum(c["correct"] for p in read(ordered, 3, 4, seed=seed) for c in p["candidates"]) for seed in range(5)]
    assert all(0 < correct < 12 for correct in mix)
    out = capsys.readouterr().out
    assert "4 questions, 4 with at least 4 candidates, 3 of those with both correct and incorrect candidates" in out
    # --mixed-only drops question 3; a question's sample does not depend on which others are evaluated.
    mixed = read(ordered, 10, 4, seed=0, mixed_only=True)
    assert [p["question_id"] for p in mixed] == ["0", "1", "2"] and mixed == problems[:3]
    assert "(--mixed-only: only these)" in capsys.readouterr().out
    assert read(ordered, 10, 13, seed=0) == []  # no question has 13 candidates


def test_labeled_candidate_with_both_labels_is_an_error(tmp_path):
    folder = _write_labeled(tmp_path / "dc", {"0": (2, 0)})
    row = {"question": "Question 0?", "question_id": 0, "model_output_id": 1, "model_output": "solution 1 of 0",
           "correctness": 0}
    (folder / "c_more.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"c_more.jsonl row 1: candidate '1' of question 0 is labeled False, but True"):
        best_of_n.read_labeled_candidates(folder, 1, 2)


def test_mixed_only_needs_candidates(capsys):
    with pytest.raises(SystemExit):
        best_of_n.parse_args(["--verifier", "v", "--generator", "g", "--mixed-only", "--output-dir", "o"])
    assert "--mixed-only selects among labeled --candidates" in capsys.readouterr().err


@pytest.mark.slow
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
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        best_of_n.main([*args, "--k-max", "8"])
    assert stop.value.code == 2 and "--k-max 4 -> 8" in capsys.readouterr().err
    # A bad line before the last is not a crash's torn line: the run stops naming it, and keeps every row.
    lines = scores.splitlines(keepends=True)
    (out / "scores.jsonl").write_text(lines[0][:20] + "\n" + "".join(lines[1:]))
    with pytest.raises(SystemExit) as stop:
        best_of_n.main(args)
    assert stop.value.code == 2 and "scores.jsonl line 1 is not valid JSON" in capsys.readouterr().err
    assert len((out / "scores.jsonl").read_text().splitlines()) == 8


def test_generated_candidates_are_for_the_held_out_problems():
    """--generator's problems are train.py's test split: for synthetic-math, the first problems of the stream,
    which the SFT and DPO runs with the same seed held out, however many are asked for."""
    import synthetic_math
    from math_problems import load_problems

    for n in (3, 250):  # more than train.py's 200 test rows too
        problems = load_problems("synthetic-math", "test", n, seed=42, synthetic_levels="1,2")
        rows = synthetic_math.build_dataset(0, n, seed=42, levels=(1, 2))["test"]
        assert [(p["question_id"], p["question"], p["reference"]) for p in problems] == \
            [(r["id"], r["question"], r["answer"]) for r in rows]
    assert problems[0]["gold_answer"] == rows[0]["answer"].rsplit("####", 1)[1].strip()
