"""Tests for the synthetic math generator: determinism, exact arithmetic, wrong solutions, rationales."""

import random
import re
from dataclasses import replace

import pytest

from synthetic_math import (
    DATASET_NAME,
    Problem,
    Step,
    build_dataset,
    correct_solution,
    generate_problem,
    generate_problems,
    parse_solution,
    problems_by_id,
    solution_text,
    to_row,
    verification_candidates,
    verification_rationale,
    wrong_solution,
    wrong_steps,
)

_EXACT = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def _hand_built() -> Problem:
    """5 + 3 = 8, then 8 * 4 = 32."""
    steps = (
        Step("Tom starts with 5 apples. Buying 3 more at the shop, Tom has", 5, "+", 3, 8),
        Step("Filling 4 boxes with that many gives", 8, "*", 4, 32),
    )
    question = ("Tom has 5 apples. Tom buys 3 more apples at the shop. Tom fills 4 boxes, each with as many "
                "apples as Tom has now. How many apples does Tom have now?")
    return Problem("hand-0", 2, question, steps, 32)


def _assert_chain_consistent(problem: Problem, steps: tuple[Step, ...], slip: int | None = None) -> None:
    """Each step starts from the previous result and, except the `slip` step, computes exactly."""
    assert steps[0].a == problem.steps[0].a
    for prev, step in zip(steps, steps[1:]):
        assert step.a == prev.result
    for i, step in enumerate(steps):
        assert isinstance(step.result, int) and step.result >= 0
        if i != slip:
            assert _EXACT[step.op](step.a, step.b) == step.result, step


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return generate_problems(500, seed=7, levels=(1, 2, 3, 4))


def test_dataset_name():
    assert DATASET_NAME == "synthetic-math"


def test_same_seed_same_problems_different_seed_different():
    assert generate_problems(30, seed=1) == generate_problems(30, seed=1)
    questions_1 = [p.question for p in generate_problems(30, seed=1)]
    questions_2 = [p.question for p in generate_problems(30, seed=2)]
    assert questions_1 != questions_2
    assert generate_problem(random.Random(3), 2, "x") == generate_problem(random.Random(3), 2, "x")


def test_ids_levels_and_uniqueness():
    problems = generate_problems(7, seed=4, levels=(1, 2, 3))
    assert [p.id for p in problems] == [f"synth-4-{i}" for i in range(7)]
    assert {p.level for p in problems} == {1, 2, 3}
    # 3000 level-1 draws repeat a question about 10 times, so this exercises the dedup.
    many = generate_problems(3000, seed=0, levels=(1,))
    assert len({p.question for p in many}) == 3000


def test_level_is_number_of_steps_and_arithmetic_is_exact(problems):
    assert {p.level for p in problems} == {1, 2, 3, 4}
    for p in problems:
        assert len(p.steps) == p.level
        assert p.answer == p.steps[-1].result
        _assert_chain_consistent(p, p.steps)
        assert max(max(s.a, s.b, s.result) for s in p.steps) <= 3000
        assert p.question.endswith("?")
    level_1 = [p for p in problems if p.level == 1]
    assert all(2 <= p.steps[0].a <= 20 and 2 <= p.steps[0].b <= 20 for p in level_1)


def test_question_states_every_operand_and_the_start(problems):
    for p in problems:
        numbers = re.findall(r"\d+", p.question)
        assert numbers[0] == str(p.steps[0].a)
        assert [int(n) for n in numbers[1:]] == [s.b for s in p.steps], p.question


def test_solution_text_exact_format():
    expected = ("Tom starts with 5 apples. Buying 3 more at the shop, Tom has 5 + 3 = 8.\n"
                "Filling 4 boxes with that many gives 8 * 4 = 32.\n"
                "#### 32")
    problem = _hand_built()
    assert solution_text(problem.steps, problem.answer) == expected
    assert correct_solution(problem) == expected
    division = Step("Sharing equally among 4 friends, each gets", 12, "/", 4, 3)
    assert solution_text([division], 3) == "Sharing equally among 4 friends, each gets 12 / 4 = 3.\n#### 3"


def test_wrong_solution_differs_and_propagates(problems):
    rng = random.Random(0)
    error_indices = set()
    for p in problems:
        steps, index = wrong_steps(p, rng)
        assert 0 <= index < len(p.steps)
        assert len(steps) == len(p.steps)
        assert steps[:index] == p.steps[:index]
        assert steps[index] != p.steps[index] and steps[index].a == p.steps[index].a
        assert steps[-1].result != p.answer
        _assert_chain_consistent(p, steps, slip=index)  # later steps recompute from the wrong value
        for wrong, right in zip(steps[index + 1:], p.steps[index + 1:]):
            assert (wrong.text, wrong.op, wrong.b) == (right.text, right.op, right.b)
        error_indices.add((p.level, index))
    assert {(4, i) for i in range(4)} <= error_indices  # every position gets errors


def test_wrong_solution_text_is_deterministic_and_has_wrong_final_answer(problems):
    for p in problems[:100]:
        text, index = wrong_solution(p, random.Random(p.id))
        assert (text, index) == wrong_solution(p, random.Random(p.id))
        steps, same_index = wrong_steps(p, random.Random(p.id))
        assert (text, index) == (solution_text(steps, steps[-1].result), same_index)
        assert text.splitlines()[-1] == f"#### {steps[-1].result}" != f"#### {p.answer}"


def test_verification_rationale_correct_and_wrong(problems):
    rng = random.Random(1)
    for p in problems:
        rationale, ok = verification_rationale(p, p.steps)
        assert ok
        assert rationale.splitlines()[-1] == "Verification: Is the answer correct (Yes/No)? Yes"
        assert "wrong" not in rationale
        steps, index = wrong_steps(p, rng)
        rationale, ok = verification_rationale(p, steps)
        assert not ok
        lines = rationale.splitlines()
        assert lines[-1] == "Verification: Is the answer correct (Yes/No)? No"
        # It stops at the wrong step (1-based in the text) and names it.
        assert lines[-2].startswith(f"Step {index + 1} computes ") and f"step {index + 1} is wrong" in lines[-2]


def test_verification_rationale_hand_built_cases():
    problem = _hand_built()
    rationale, ok = verification_rationale(problem, problem.steps)
    assert ok
    assert rationale == ("Let's verify step by step.\n"
                         "Step 1 computes 5 + 3. It uses 5 from the question, as the question says. "
                         "5 + 3 = 8; the solution has 8, which matches.\n"
                         "Step 2 computes 8 * 4. It uses 8 from step 1, as the question says. "
                         "8 * 4 = 32; the solution has 32, which matches.\n"
                         "Verification: Is the answer correct (Yes/No)? Yes")
    slip = (replace(problem.steps[0], result=9), replace(problem.steps[1], a=9, result=36))
    rationale, ok = verification_rationale(problem, slip)
    assert not ok
    # The right result comes first, then the solution's: the verdict compares two numbers already written.
    assert rationale.splitlines()[1:] == ["Step 1 computes 5 + 3. It uses 5 from the question, as the question says. "
                                          "5 + 3 = 8; the solution has 9, so step 1 is wrong.",
                                          "Verification: Is the answer correct (Yes/No)? No"]
    # Arithmetic right, but it does not use step 1's result: the chain check catches it.
    unchained = (problem.steps[0], replace(problem.steps[1], a=7, result=28))
    rationale, ok = verification_rationale(problem, unchained)
    assert not ok and "Step 2 computes 7 * 4. But step 1 gives 8, not 7, so step 2 is wrong." in rationale
    # Arithmetic right, but the wrong operation for the story.
    wrong_op = (replace(problem.steps[0], op="*", result=15), replace(problem.steps[1], a=15, result=60))
    rationale, ok = verification_rationale(problem, wrong_op)
    assert not ok and "Step 1 computes 5 * 3. But the question calls for 5 + 3 here, so step 1 is wrong." in rationale
    # Missing the last step.
    rationale, ok = verification_rationale(problem, problem.steps[:1])
    assert not ok and rationale.endswith("No")


@pytest.mark.parametrize("levels", [(1, 2), (1, 2, 3), (2,)])
def test_verification_candidates_balance_labels_within_each_level(levels):
    """With levels cycled over the stream, alternating right/wrong over the stream made every wrong solution of
    levels 1,2 a two-step one: the label must not be readable from the level (the number of steps)."""
    pairs = verification_candidates(48, seed=5, levels=levels)
    assert [p.id for p, _ in pairs] == [p.id for p in generate_problems(48, 5, levels)]
    for level in levels:
        labels = [verification_rationale(p, steps)[1] for p, steps in pairs if p.level == level]
        assert labels == [True, False] * (len(labels) // 2)
    for problem, steps in pairs:
        if steps != problem.steps:  # the one-slip computation, with a final answer that differs
            assert steps == wrong_steps(problem, random.Random(f"5-{problem.id}"))[0] and steps[-1].result != problem.answer


def test_to_row_and_build_dataset():
    dataset = build_dataset(n_train=40, n_test=12, seed=3)
    assert set(dataset) == {"train", "test"}
    assert (len(dataset["train"]), len(dataset["test"])) == (40, 12)
    columns = {"id", "question", "answer", "level", "final_answer"}
    assert set(dataset["train"].column_names) == columns == set(dataset["test"].column_names)
    assert not set(dataset["train"]["question"]) & set(dataset["test"]["question"])
    assert not set(dataset["train"]["id"]) & set(dataset["test"]["id"])
    for split in dataset.values():
        for row in split:
            assert row["answer"].splitlines()[-1] == f"#### {row['final_answer']}"
    assert set(dataset["train"]["level"]) == {1, 2, 3}
    problem = generate_problems(1, seed=3)[0]
    assert to_row(problem) == dataset["test"][0]  # the held-out split comes first in the stream
    assert to_row(problem)["final_answer"] == str(problem.answer)


def test_invalid_level_is_rejected():
    with pytest.raises(ValueError, match="level"):
        generate_problem(random.Random(0), 5, "x")


def test_held_out_split_does_not_depend_on_the_training_size():
    """SFT with 480 rows and DPO with 120 rows must be evaluated on the same held-out problems."""
    big, small = build_dataset(n_train=48, n_test=10, seed=5), build_dataset(n_train=12, n_test=10, seed=5)
    assert big["test"]["question"] == small["test"]["question"]
    assert small["train"]["question"] == big["train"]["question"][:12]
    assert not set(big["test"]["question"]) & set(big["train"]["question"])


def test_parse_solution_reads_back_solution_text_and_refuses_other_text(problems):
    for p in problems:
        steps, answer = parse_solution(correct_solution(p))
        assert (tuple(steps), answer) == (p.steps, p.answer)
    text = "Tom starts with 5 apples. Buying 3 more, Tom has 5 + 3 = 9.\n\n####  9"  # blank line, spaces tolerated
    assert parse_solution(text) == ([Step("Tom starts with 5 apples. Buying 3 more, Tom has", 5, "+", 3, 9)], 9)
    assert parse_solution("Tom has 8 apples.\n#### 8") is None  # a line without a computation
    assert parse_solution("5 + 3 = 8.") is None  # no final answer line
    assert parse_solution("5 + 3 = 8.\n#### eight") is None


def test_problems_by_id_redraws_the_stream():
    stream = generate_problems(6, 5, (1, 2))
    assert problems_by_id(["synth-5-4", "synth-5-1"], (1, 2)) == {"synth-5-4": stream[4], "synth-5-1": stream[1]}
    with pytest.raises(ValueError, match="'gsm-3' is not a synthetic-math problem id"):
        problems_by_id(["gsm-3"], (1, 2))


@pytest.mark.parametrize("config", ["configs/rloo-smollm2-math.yaml", "configs/rloo-genrm-smollm2-math.yaml"])
def test_rloo_configs_train_on_problems_no_other_stage_or_the_held_out_set_has(config):
    """docs/results.md: the RLOO configs' problems share no question with seed 42's first 1,300 (SFT, DPO, the
    verifier's problems 0-999 and the 300 held-out ones), so RL neither rewards memorised answers nor sees the test."""
    import pathlib

    import yaml

    cfg = yaml.safe_load((pathlib.Path(__file__).parent.parent / config).read_text())
    levels = tuple(int(x) for x in str(cfg["synthetic-levels"]).split(","))
    assert cfg["seed"] != 42
    rl = {p.question for p in generate_problems(cfg["train-dataset-length"] + cfg["test-dataset-length"], cfg["seed"], levels)}
    assert len(rl) == cfg["train-dataset-length"] + cfg["test-dataset-length"]
    assert not rl & {p.question for p in generate_problems(1300, 42, levels)}
