"""Synthetic grade-school math word problems: the embedded default dataset, no network needed.

Each problem is a short story whose quantity changes once per step (level L has L steps), so the
solution is a chain of exact integer operations. Keeping the computation as structured `Step`s,
not just text, is what lets us derive, without a model:

- SFT rows in GSM8K format (`to_row`: question / answer ending in "#### N"),
- DPO pairs: `correct_solution` vs `wrong_solution` (one arithmetic slip, propagated),
- GenRM-CoT verification data: `verification_rationale` checks a solution step by step and ends
  in a Yes/No verdict.

    rows = [to_row(p) for p in generate_problems(100, seed=0)]
    dataset = build_dataset(n_train=1000, n_test=100, seed=0)  # selected by --dataset-name synthetic-math
"""

import math
import operator
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

DATASET_NAME = "synthetic-math"
LEVELS = (1, 2, 3, 4)


@dataclass(frozen=True)
class Step:
    """One line of a solution: `f"{text} {a} {op} {b} = {result}."`.

    `text` never mentions `a` (except the first step's starting amount) or `result`, so a wrong
    solution can reuse it with different numbers.
    """

    text: str
    a: int
    op: str  # "+", "-", "*" or "/"
    b: int
    result: int


@dataclass(frozen=True)
class Problem:
    """A word problem with its step-by-step computation; `answer == steps[-1].result`."""

    id: str
    level: int
    question: str
    steps: tuple[Step, ...]
    answer: int


@dataclass(frozen=True)
class _Template:
    """One operation as a question sentence and a solution step.

    Templates with a `question` ask something new, so they only end a story; `swaps` ones change
    the object counted to `new`.
    """

    sentence: str
    step: str
    question: str | None = None
    swaps: bool = False


_NAMES = ("Tom", "Maya", "Leo", "Aisha", "Sam", "Nora", "Ravi", "Emma", "Jonas", "Lina", "Kofi", "Mei")
_OBJECTS = (  # (singular, plural)
    ("apple", "apples"), ("pencil", "pencils"), ("coin", "coins"), ("sticker", "stickers"),
    ("book", "books"), ("marble", "marbles"), ("card", "cards"), ("shell", "shells"),
    ("bead", "beads"), ("stamp", "stamps"), ("cookie", "cookies"), ("crayon", "crayons"),
)  # fmt: skip
_TEMPLATES = {
    "+": (
        _Template("{name} buys {b} more {noun} at the shop.", "buying {b} more at the shop, {name} has"),
        _Template("A friend gives {name} {b} more {noun}.", "with {b} more from a friend, {name} has"),
        _Template("Then {name} finds {b} more {noun}.", "finding {b} more gives"),
        _Template("{name} wins {b} {noun} in a game.", "winning {b} in a game brings the total to"),
        _Template("{name}'s grandmother adds {b} {noun}.", "with grandmother's {b}, {name} has"),
        _Template("The next day {name} collects {b} more {noun}.", "collecting {b} more the next day makes"),
    ),
    "-": (
        _Template("{name} gives {b} {noun} to a friend.", "after giving {b} away, {name} has"),
        _Template("{name} loses {b} {noun} on the way home.", "losing {b} leaves"),
        _Template("{name} sells {b} {noun} at a market stall.", "selling {b} at the market leaves"),
        _Template("{name} uses {b} {noun} for a school project.", "using {b} for the project leaves"),
        _Template("{name} donates {b} {noun} to a charity.", "donating {b} leaves"),
        _Template("{name}'s little brother takes {b} {noun}.", "after the brother takes {b}, {name} has"),
    ),
    "*": (
        _Template("{name} fills {b} boxes, each with as many {noun} as {name} has now.",
                  "{b} boxes of that many hold"),
        _Template("By the end of the month {name} has {b} times as many {noun}.", "{b} times as many is"),
        _Template("A magic hat turns each of {name}'s {noun} into {b}.", "with each one turned into {b}, {name} has"),
        _Template("{name} trades each of the {noun} for {b} {new}.", "trading each one for {b} {new} gives",
                  swaps=True),
        _Template("{name} sells every one of the {noun} for {b} dollars.", "selling each one for {b} dollars earns",
                  question="How many dollars does {name} earn?"),
        _Template("In a game, each of the {noun} is worth {b} points.", "at {b} points each, they are worth",
                  question="How many points are all of {name}'s {noun} worth?"),
    ),
    "/": (
        _Template("{name} splits the {noun} into {b} equal piles and keeps one pile.", "one of {b} equal piles holds"),
        _Template("{name} keeps one out of every {b} {noun} and gives the rest away.", "keeping one of every {b} leaves"),
        _Template("{name} exchanges the {noun} for {new} at {b} {noun} per {new1}.",
                  "at {b} per {new1}, {name} gets", swaps=True),
        _Template("{name} shares the {noun} equally among {b} friends.", "shared equally among {b} friends, each gets",
                  question="How many {noun} does each friend get?"),
        _Template("{name} packs the {noun} into bags of {b}.", "bags of {b} make",
                  question="How many bags does {name} fill?"),
        _Template("{name} arranges the {noun} in {b} equal rows.", "in {b} equal rows, each row has",
                  question="How many {noun} are in each row?"),
    ),
}
# Per level: (largest starting amount / addend, largest multiplier, largest intermediate value).
_LIMITS = {1: (20, 5, 100), 2: (50, 9, 500), 3: (100, 12, 1500), 4: (200, 12, 3000)}
_VERDICT = "Verification: Is the answer correct (Yes/No)? "
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def _evaluate(op: str, a: int, b: int) -> Fraction:
    return _OPS[op](Fraction(a), b)


def _apply(op: str, a: int, b: int) -> int | None:
    """`a op b` if it is a non-negative integer (exact division, no debt), else None."""
    if op == "/" and b == 0:
        return None
    value = _evaluate(op, a, b)
    return int(value) if value.denominator == 1 and value >= 0 else None


def _pick_operation(rng: random.Random, a: int, level: int) -> tuple[str, int]:
    """An operation and operand that keep the amount in [2, cap], so every noun stays plural."""
    top, mul_max, cap = _LIMITS[level]
    divisors = [d for d in range(2, 13) if a % d == 0 and a // d >= 2]
    # a >= 4 allows "-", a < 4 allows "+" (caps are >= 100), so there is always a choice.
    ops = [op for op, ok in (("+", a + 2 <= cap), ("-", a >= 4), ("*", 2 * a <= cap), ("/", divisors)) if ok]
    op = rng.choice(ops)
    if op == "+":
        return op, rng.randint(2, min(top, cap - a))
    if op == "-":
        return op, rng.randint(2, a - 2)
    if op == "*":
        return op, rng.randint(2, min(mul_max, cap // a))
    return op, rng.choice(divisors)


def generate_problem(rng: random.Random, level: int, problem_id: str) -> Problem:
    """Draws one story of `level` chained steps, each starting from the previous result.

    Args:
        rng: Source of randomness; the problem is a function of its state.
        level: Number of steps, one of `LEVELS`.
        problem_id: Stored as `Problem.id`.
    """
    if level not in LEVELS:
        raise ValueError(f"synthetic-math level must be one of {LEVELS}, got {level}")
    name = rng.choice(_NAMES)
    noun = rng.choice(_OBJECTS)
    value = rng.randint(2, _LIMITS[level][0])
    sentences = [f"{name} has {value} {noun[1]}."]
    steps: list[Step] = []
    used: list[_Template] = []
    for i in range(level):
        op, b = _pick_operation(rng, value, level)
        last = i == level - 1
        # Never empty: each operation has >= 3 templates without a question, and levels <= 4.
        template = rng.choice([t for t in _TEMPLATES[op] if t not in used and (last or t.question is None)])
        used.append(template)
        new = rng.choice([o for o in _OBJECTS if o != noun])
        fields = {"name": name, "noun": noun[1], "b": b, "new": new[1], "new1": new[0]}
        sentences.append(template.sentence.format(**fields))
        text = template.step.format(**fields)
        text = text[0].upper() + text[1:]
        if i == 0:
            text = f"{name} starts with {value} {noun[1]}. {text}"
        result = _apply(op, value, b)
        assert result is not None, (op, value, b)  # _pick_operation only offers exact operations
        steps.append(Step(text, value, op, b, result))
        value = result
        if template.swaps:
            noun = new
    question = template.question or "How many {noun} does {name} have now?"
    sentences.append(question.format(name=name, noun=noun[1]))
    return Problem(problem_id, level, " ".join(sentences), tuple(steps), value)


def generate_problems(n: int, seed: int, levels: tuple[int, ...] = (1, 2, 3)) -> list[Problem]:
    """`n` distinct problems, deterministic in `(n, seed, levels)`; levels are cycled in order.

    Args:
        n: Number of problems.
        seed: Seeds the generator; ids are `f"synth-{seed}-{index}"`.
        levels: Difficulty levels to cycle through.
    """
    if not levels:
        raise ValueError("synthetic-math needs at least one level")
    rng = random.Random(seed)
    problems: list[Problem] = []
    seen: set[str] = set()
    for _ in range(50 * n + 1000):
        if len(problems) == n:
            break
        index = len(problems)
        problem = generate_problem(rng, levels[index % len(levels)], f"synth-{seed}-{index}")
        if problem.question not in seen:  # duplicates would leak between train and test
            seen.add(problem.question)
            problems.append(problem)
    if len(problems) < n:
        raise ValueError(f"could only draw {len(problems)} distinct synthetic-math problems of {n}; "
                         f"ask for fewer or add higher levels than {levels}")
    return problems


def solution_text(steps: Sequence[Step], answer: int) -> str:
    """GSM8K-style solution: one `"{text} {a} {op} {b} = {result}."` line per step, then `"#### {answer}"`."""
    lines = [f"{s.text} {s.a} {s.op} {s.b} = {s.result}." for s in steps]
    return "\n".join([*lines, f"#### {answer}"])


_STEP_LINE = re.compile(r"(?P<text>.*?) ?(?P<a>\d+) (?P<op>[-+*/]) (?P<b>\d+) = (?P<result>\d+)\.?")
_ANSWER_LINE = re.compile(r"####\s*(?P<answer>-?\d+)")


def parse_solution(text: str) -> tuple[list[Step], int] | None:
    """The steps and final answer of a solution in `solution_text`'s format (a model's sample, say), or None if a
    line is in neither of its forms ("... a op b = r." per step, then "#### N").

        parse_solution("Tom starts with 5 apples. Buying 3 more, Tom has 5 + 3 = 8.\n#### 8")
        == ([Step("Tom starts with 5 apples. Buying 3 more, Tom has", 5, "+", 3, 8)], 8)
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) < 2 or not (answer := _ANSWER_LINE.fullmatch(lines[-1])):
        return None
    steps = []
    for line in lines[:-1]:
        match = _STEP_LINE.fullmatch(line)
        if match is None:
            return None
        steps.append(Step(match["text"], int(match["a"]), match["op"], int(match["b"]), int(match["result"])))
    return steps, int(answer["answer"])


def problems_by_id(problem_ids: Sequence[str], levels: tuple[int, ...]) -> dict[str, Problem]:
    """The problems `generate_problems` numbered these ids ("synth-{seed}-{index}") with these levels.

    Raises:
        ValueError: an id is not of that form.
    """
    wanted: dict[int, set[int]] = {}
    for problem_id in problem_ids:
        match = re.fullmatch(r"synth-(\d+)-(\d+)", problem_id)
        if match is None:
            raise ValueError(f"{problem_id!r} is not a synthetic-math problem id (synth-SEED-INDEX)")
        wanted.setdefault(int(match[1]), set()).add(int(match[2]))
    return {p.id: p for seed, indices in wanted.items()  # the stream is prefix-stable: draw it once per seed
            for i, p in enumerate(generate_problems(max(indices) + 1, seed, levels)) if i in indices}


def correct_solution(problem: Problem) -> str:
    """The reference solution of `problem`."""
    return solution_text(problem.steps, problem.answer)


def _propagate(steps: Sequence[Step], value: int) -> list[Step] | None:
    """Recomputes `steps` correctly from a changed starting `value`; None if a value goes bad."""
    out = []
    for step in steps:
        result = _apply(step.op, value, step.b)
        if result is None:
            return None
        out.append(replace(step, a=value, result=result))
        value = result
    return out


def wrong_steps(problem: Problem, rng: random.Random) -> tuple[tuple[Step, ...], int]:
    """A plausible wrong computation: one slip, carried correctly through the later steps.

    The slip is a result off by 1, 2 or 10, or the wrong operation on the right numbers. Slips
    that would make a later division inexact or an amount negative are skipped; if all are (about
    5% of problems), the result is raised by the product of the later divisors.

    Args:
        problem: The problem to get wrong.
        rng: Picks the step and the slip; the output is a function of its state.

    Returns:
        The steps (final answer always differs from `problem.answer`) and the 0-based index of
        the wrong step.
    """
    index = rng.randrange(len(problem.steps))
    step, later = problem.steps[index], problem.steps[index + 1:]
    slips = [(step.op, step.result + d) for d in (1, -1, 2, -2, 10, -10)]
    slips += [(op, _apply(op, step.a, step.b)) for op in _OPS if op != step.op]
    slips = [(op, r) for op, r in slips if r is not None and r >= 0 and r != step.result]
    rng.shuffle(slips)
    # Last resort, always valid: an excess divisible by every later divisor keeps each division
    # exact, and + - * / never cancel a nonzero difference, so the final answer still differs.
    excess = math.prod(s.b for s in later if s.op == "/")
    for op, result in [*slips, (step.op, step.result + excess)]:
        tail = _propagate(later, result)
        if tail is not None and (tail[-1].result if tail else result) != problem.answer:
            return (*problem.steps[:index], replace(step, op=op, result=result), *tail), index
    raise AssertionError("unreachable: the last-resort slip is always valid")


def wrong_solution(problem: Problem, rng: random.Random) -> tuple[str, int]:
    """`wrong_steps` as GSM8K text: (solution with a wrong final answer, 0-based wrong step index)."""
    steps, index = wrong_steps(problem, rng)
    return solution_text(steps, steps[-1].result), index


def verification_rationale(problem: Problem, steps: Sequence[Step]) -> tuple[str, bool]:
    """GenRM-CoT rationale checking `steps` against `problem`, stopping at the first wrong step.

    Each step is checked for the amount it starts from (the question's, or the previous step's
    claimed result), the operation and operand the story calls for, and its arithmetic. The
    arithmetic is recomputed before the solution's result is quoted ("5 + 3 = 8; the solution has
    9"): a verifier that wrote the claimed result first would be checking a number it has just
    copied. Steps are numbered from 1 in the text. The last line is "Verification: Is the answer
    correct (Yes/No)? Yes" (or "No").

    Returns:
        The rationale and whether the solution is correct.
    """
    lines = ["Let's verify step by step."]
    expected_a = problem.steps[0].a
    for i, (step, truth) in enumerate(zip(steps, problem.steps), start=1):
        a, op, b = step.a, step.op, step.b
        source = "the question" if i == 1 else f"step {i - 1}"
        line = f"Step {i} computes {a} {op} {b}."
        if a != expected_a:
            error = f"{line} But {source} gives {expected_a}, not {a}"
        elif (op, b) != (truth.op, truth.b):
            error = f"{line} But the question calls for {a} {truth.op} {truth.b} here"
        else:
            right = _evaluate(op, a, b)
            line += f" It uses {a} from {source}, as the question says. {a} {op} {b} = {right}; " \
                    f"the solution has {step.result}"
            error = line if right != step.result else None
        if error:
            lines += [f"{error}, so step {i} is wrong.", _VERDICT + "No"]
            return "\n".join(lines), False
        lines.append(f"{line}, which matches.")
        expected_a = step.result
    if len(steps) != len(problem.steps):
        lines += [f"But the solution has {len(steps)} steps where the question needs {len(problem.steps)}.",
                  _VERDICT + "No"]
        return "\n".join(lines), False
    return "\n".join([*lines, _VERDICT + "Yes"]), True


def verification_candidates(n: int, seed: int, levels: tuple[int, ...] = (1, 2, 3)) -> list[tuple[Problem, tuple[Step, ...]]]:
    """The first `n` problems of the stream, each with its own steps or a one-slip wrong computation (`wrong_steps`).

    Within each level the problems are alternately right and wrong, so the label says nothing about the level.
    (Alternating over the whole stream would not do: levels are cycled too, and with levels 1,2 every wrong
    solution would be the two-step one, a cue a verifier learns instead of checking the steps.)
    """
    seen: dict[int, int] = {}
    out = []
    for problem in generate_problems(n, seed, levels):
        count = seen[problem.level] = seen.get(problem.level, 0) + 1
        steps = problem.steps
        if count % 2 == 0:
            steps, _ = wrong_steps(problem, random.Random(f"{seed}-{problem.id}"))
        out.append((problem, steps))
    return out


def to_row(problem: Problem) -> dict:
    """A dataset row with GSM8K's `question`/`answer` columns plus `id`, `level`, `final_answer`."""
    return {
        "id": problem.id,
        "question": problem.question,
        "answer": correct_solution(problem),
        "level": problem.level,
        "final_answer": str(problem.answer),
    }


def to_pair_row(problem: Problem, seed: int) -> dict:
    """`to_row` plus a preference pair: `prompt` (the question), `chosen` (correct) and `rejected` (wrong) solutions."""
    rejected, _ = wrong_solution(problem, random.Random(f"{seed}-{problem.id}"))
    return {**to_row(problem), "prompt": problem.question, "chosen": correct_solution(problem), "rejected": rejected}


def build_dataset(n_train: int, n_test: int, seed: int, levels: tuple[int, ...] = (1, 2, 3),
                  pairs: bool = False) -> "datasets.DatasetDict":
    """A `DatasetDict` with "train" and "test" splits of distinct problems (no shared question).

    Args:
        n_train: Rows in "train".
        n_test: Rows in "test".
        seed: Seeds the generator.
        levels: Difficulty levels, cycled within each split.
        pairs: Add DPO/reward-model columns `prompt`, `chosen`, `rejected` (see `to_pair_row`).
    """
    import datasets  # lazy: the generator itself needs only the standard library

    # The stream of problems is prefix-stable, so taking the test split first keeps it the same whatever n_train:
    # an SFT run and a later DPO run with fewer training rows are evaluated on the same held-out problems.
    problems = generate_problems(n_test + n_train, seed, levels)
    rows = [to_pair_row(p, seed) if pairs else to_row(p) for p in problems]
    return datasets.DatasetDict({
        "train": datasets.Dataset.from_list(rows[n_test:]),
        "test": datasets.Dataset.from_list(rows[:n_test]),
    })
