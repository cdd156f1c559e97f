"""Validation metrics on generated answers: edit distance and final-answer accuracy."""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


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


def final_answer(text: str) -> str | None:
    """The answer a GSM8K-style solution commits to: the number after '####', else the last number in the text."""
    marked = text.rsplit("####", 1)
    candidates = _NUMBER.findall(marked[1] if len(marked) == 2 else text)
    if not candidates:
        return None
    return (candidates[0] if len(marked) == 2 else candidates[-1]).replace(",", "")


def answers_match(prediction: str, reference: str) -> bool:
    """Whether the final numbers of two solutions are equal as exact rationals ('12.0' == '12')."""
    got, want = final_answer(prediction), final_answer(reference)
    if got is None or want is None:
        return False
    return Fraction(got) == Fraction(want)
