"""Validation metrics on generated answers: edit distance, and final-answer correctness checked with math-verify."""

from __future__ import annotations

import logging
import math


class _NoTimeoutNotice(logging.Filter):
    """math-verify warns on every call made without its time limit (see ``_in_main_thread``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutNotice())


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
    """The final answer of a reference solution: the text after the last '####' (GSM8K), else the whole solution
    (MATH: math-verify reads its last ``\\boxed{}``)."""
    return reference.rsplit("####", 1)[1].strip() if "####" in reference else reference


def has_final_answer(reference: str) -> bool:
    """Whether a reference states a checkable final answer: GSM8K's '#### N' or MATH's ``\\boxed{}``."""
    return "####" in reference or "\\boxed" in reference


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% for z = 1.96): better than the normal one near 0 and 1."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The chance that at least one of ``k`` answers drawn without replacement from ``n`` sampled answers, ``correct``
    of them right, is right: ``1 - C(n - c, k) / C(n, k)``, the unbiased pass@k estimator of Chen et al. 2021
    ("Evaluating Large Language Models Trained on Code", eq. 1). k = 1 gives the share right, c / n."""
    if not 0 < k <= n or not 0 <= correct <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= correct <= n, got n={n}, correct={correct}, k={k}")
    return 1.0 if n - correct < k else 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def answer_text(sample: str) -> str:
    """The part of a generated solution that states its answer: the first line after its last '####', else all of it.

    Only the first line, because math-verify reads the last number of what it is given, and models often keep
    talking after '#### N'. Without '####', math-verify finds the answer itself ('the answer is 9', or the last number).
    """
    if "####" not in sample:
        return sample
    tail = sample.rsplit("####", 1)[1].strip()
    return tail.splitlines()[0] if tail else ""


def _in_main_thread() -> bool:
    """math-verify's time limits work by signal.alarm, which only the main thread may set: elsewhere (a Ray Train
    worker runs the training function in a thread) it runs without them."""
    import threading

    return threading.current_thread() is threading.main_thread()


def parse(text: str) -> list:
    """math-verify's parse of ``text``: [sympy value, its text], or [] when no answer is found."""
    import math_verify

    return math_verify.parse(text, **({} if _in_main_thread() else {"parsing_timeout": None}))


def check(sample: str, gold: list) -> tuple[str, bool]:
    """The answer math-verify reads in ``sample`` ('' if none) and whether it equals ``gold`` (a parsed answer)."""
    import math_verify

    parsed = parse(answer_text(sample))
    if not parsed:
        return "", False
    return str(parsed[-1]), bool(math_verify.verify(gold, parsed, **({} if _in_main_thread() else {"timeout_seconds": None})))


def answers_match(prediction: str, reference: str) -> bool:
    """Whether a generated solution's final answer equals a GSM8K reference's ('#### 0.5' matches '#### 1/2')."""
    return check(prediction, parse(gold_answer(reference)))[1]


def auc(scores: list[float], labels: list[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for telling ``labels`` True from False: the probability that a random
    positive scores above a random negative, ties counting half (Mann-Whitney U / (n_pos * n_neg)). None without
    both classes."""
    positives = [s for s, y in zip(scores, labels, strict=True) if y]
    negatives = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not positives or not negatives:
        return None
    ordered = sorted(scores)
    # Mid-ranks (1-based) handle ties: a value's rank is the mean of the positions it occupies.
    first, last = {}, {}
    for position, value in enumerate(ordered, start=1):
        first.setdefault(value, position)
        last[value] = position
    rank_sum = sum((first[s] + last[s]) / 2 for s in positives)
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
