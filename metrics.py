"""Validation metrics on generated answers: edit distance, and final-answer correctness checked with math-verify."""

from __future__ import annotations


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions of characters)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def gold_answer(reference: str) -> str:
    """The final answer of a GSM8K solution: the text after its last '####'."""
    return reference.rsplit("####", 1)[1].strip()


def answer_text(sample: str) -> str:
    """The part of a generated solution that states its answer: the first line after its last '####', else all of it.

    Only the first line, because math-verify reads the last number of what it is given, and models often keep
    talking after '#### N'. Without '####', math-verify finds the answer itself ('the answer is 9', or the last number).
    """
    if "####" not in sample:
        return sample
    tail = sample.rsplit("####", 1)[1].strip()
    return tail.splitlines()[0] if tail else ""


def check(sample: str, gold: list) -> tuple[str, bool]:
    """The answer math-verify reads in ``sample`` ('' if none) and whether it equals ``gold`` (a parsed answer)."""
    import math_verify

    parsed = math_verify.parse(answer_text(sample))  # [sympy value, its text], or [] when nothing is found
    if not parsed:
        return "", False
    return str(parsed[-1]), bool(math_verify.verify(gold, parsed))


def answers_match(prediction: str, reference: str) -> bool:
    """Whether a generated solution's final answer equals a GSM8K reference's ('#### 0.5' matches '#### 1/2')."""
    import math_verify

    return check(prediction, math_verify.parse(gold_answer(reference)))[1]
