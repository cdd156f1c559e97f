"""Supervised fine-tuning: masked next-token negative log-likelihood, and the GenRM-CoT verifier built on it
(its two-part SFT loss, and its score: p("Yes") averaged over an adaptive number of sampled rationales)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked NLL of the answer tokens, averaged over them:

        L = -(1 / N) * sum_{b, t} m[b, t] * log p(y[b, t] | y[b, <t]),   N = sum_{b, t} m[b, t]

    where m masks prompt, template and padding positions. (Training rescales this batch mean so that the
    average runs over the answer tokens of the whole accumulation window: see module.training_step.)

    Args:
        token_logps: (B, T) log-probabilities of the target tokens (any value where masked).
        mask: (B, T) bool, True where the loss is taken.

    Returns:
        The loss, and metrics: ``tokens`` (N).
    """
    tokens = mask.sum()
    loss = -(token_logps * mask).sum() / tokens.clamp(min=1)
    return loss, {"tokens": tokens.detach()}


# ---- GenRM-CoT: the verifier's training loss and its score ------------------------------------------------

VERIFIER_PARTS = ("verify", "correct")  # part 0: verification rationales, part 1: correct solutions


def genrm_combine(part_losses: torch.Tensor, lam: float) -> torch.Tensor:
    """L_GenRM = L_SFT(D_verify) + lambda * L_SFT(D_correct): ``part_losses`` (2,) holds the two SFT losses.

    The one place the two parts are weighed, used for the per-batch loss (``genrm_loss``) and for the
    accumulation-window objective (``module.training_step``)."""
    return part_losses[0] + lam * part_losses[1]


def genrm_part_losses(token_logps: torch.Tensor, mask: torch.Tensor, part: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The SFT loss of each GenRM-CoT part, over its own target tokens (0 for a part absent from the batch):

        L_SFT(D_p) = -(1 / N_p) * sum_{b in part p, t} m[b, t] * log p(y[b, t] | y[b, <t])

    Args:
        token_logps: (B, T) log-probabilities of the target tokens.
        mask: (B, T) bool, True where the loss is taken.
        part: (B,) 0 for verification rows, 1 for correct-solution rows.

    Returns:
        losses (2,) and token counts N (2,).
    """
    rows = torch.stack([part == p for p in range(len(VERIFIER_PARTS))])  # (2, B)
    part_mask = rows[:, :, None] & mask[None]  # (2, B, T)
    tokens = part_mask.sum(dim=(1, 2))  # (2,)
    return -(token_logps[None] * part_mask).sum(dim=(1, 2)) / tokens.clamp(min=1), tokens


def genrm_loss(token_logps: torch.Tensor, mask: torch.Tensor, part: torch.Tensor, lam: float
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GenRM-CoT loss, eq. 7 of our users' report (Zhang et al., "Generative Verifiers", ICLR 2025, sec. 3):

        L = L_SFT(D_verify) + lambda * L_SFT(D_correct)

    Each part's SFT loss is the mean over its own target tokens (``genrm_part_losses``: the rationale of a
    verification row, the solution of a correct-solution row), so lambda alone sets their balance whatever the
    mix of a batch. Shapes as in ``genrm_part_losses``; ``lam`` is lambda.

    Returns:
        The loss, and metrics: ``verify_loss``, ``correct_loss`` and ``verify_tokens``, ``correct_tokens``.
    """
    losses, tokens = genrm_part_losses(token_logps, mask, part)
    metrics = {f"{name}_loss": losses[p].detach() for p, name in enumerate(VERIFIER_PARTS)}
    metrics |= {f"{name}_tokens": tokens[p] for p, name in enumerate(VERIFIER_PARTS)}
    return genrm_combine(losses, lam), metrics


def yes_probabilities(logits: torch.Tensor, yes_id: int, no_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The verifier's verdict at the position after "Is the answer correct (Yes/No)?":

        p_yes = softmax(logits)[Yes]                  (r_CoT of the paper, eq. 5: the score used everywhere)
        p_normalized = p_yes / (p_yes + p_no)          (reported beside it; ignores mass on other tokens)

    Args:
        logits: (N, V) next-token logits, upcast to float32.

    Returns:
        p_yes (N,), p_normalized (N,).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    p_yes, p_no = probs[:, yes_id], probs[:, no_id]
    return p_yes, p_yes / (p_yes + p_no).clamp(min=torch.finfo(torch.float32).tiny)


@dataclass
class VerifierScore:
    """The verdicts of K sampled rationales on one (problem, solution) and their mean (r_MajV@K, eq. 6)."""

    p_yes: list[float]
    p_normalized: list[float]
    rationales: list[str] = field(default_factory=list)

    @property
    def k(self) -> int:
        return len(self.p_yes)

    @property
    def score(self) -> float:
        """r_MajV@K = (1 / K) * sum_k p_yes_k: the verifier's score."""
        return sum(self.p_yes) / len(self.p_yes)

    @property
    def normalized(self) -> float:
        """The mean of Yes / (Yes + No), for comparison."""
        return sum(self.p_normalized) / len(self.p_normalized)

    @property
    def variance(self) -> float:
        return p_yes_variance(self.p_yes)


def p_yes_variance(values: list[float]) -> float:
    """Population variance (1 / K) * sum (p_k - mean)^2 of the p("Yes") values so far (0 for one value)."""
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


def should_stop(values: list[float], k_min: int, k_max: int, tau: float) -> bool:
    """Adaptive K's rule: stop at K_max, or from K_min on as soon as the variance of p("Yes") is below tau."""
    return len(values) >= k_max or (len(values) >= k_min and p_yes_variance(values) < tau)


def adaptive_k(values: list[float], k_min: int, k_max: int, tau: float) -> int:
    """How many of ``values`` (a stream of p("Yes") samples) the adaptive loop of ``compute_verifier_scores``
    would have used: the first group boundary (K_min, 2 K_min, ..., K_max) at which ``should_stop`` holds.
    Lets one run of K_max samples tell what adaptive K would have decided on the same samples."""
    k = 0
    while True:
        k = min(k + k_min, k_max, len(values))
        if should_stop(values[:k], k_min, k_max, tau) or k == len(values):
            return k


# A sampler draws ``n`` more rationales for each of the given prompt indices and returns, per index, their
# (p_yes, p_normalized, rationale text) triples.
Sampler = Callable[[list[int], int], list[list[tuple[float, float, str]]]]


def compute_verifier_scores(sample: Sampler, n_prompts: int, k_min: int = 8, k_max: int = 32, tau: float = 0.05
                            ) -> list[VerifierScore]:
    """r_MajV@K with adaptive K for ``n_prompts`` verification prompts.

    Rationales are drawn in groups of K_min for every prompt still undecided; a prompt stops as soon as the
    variance of its p("Yes") values is below tau, or at K_max (the last group is cut to fit). Prompts are
    sampled together, so a group is one batched call of ``sample`` (``extension.verifier.RationaleSampler``
    decodes the group from one shared prefill of each prompt).

    Args:
        sample: draws rationales; tests script it.
        n_prompts: prompts are the indices 0..n_prompts-1 of ``sample``.
        k_min: group size and the fewest rationales per prompt (8 in our users' runs).
        k_max: the most rationales per prompt (32).
        tau: the variance threshold (0.05).

    Returns:
        One ``VerifierScore`` per prompt, with every sampled verdict.
    """
    if not 1 <= k_min <= k_max:
        raise ValueError(f"need 1 <= K_min <= K_max, got K_min={k_min}, K_max={k_max}")
    if tau < 0:
        raise ValueError(f"tau must be 0 or more, got {tau}")
    scores = [VerifierScore([], []) for _ in range(n_prompts)]
    active = list(range(n_prompts))
    while active:
        n = min(k_min, k_max - scores[active[0]].k)  # active prompts advance in step: all have the same K
        drawn = sample(active, n)
        for index, samples in zip(active, drawn, strict=True):
            if len(samples) != n:
                raise ValueError(f"the sampler returned {len(samples)} rationales for prompt {index}, not {n}")
            for p_yes, p_normalized, text in samples:
                scores[index].p_yes.append(float(p_yes))
                scores[index].p_normalized.append(float(p_normalized))
                scores[index].rationales.append(text)
        active = [i for i in active if not should_stop(scores[i].p_yes, k_min, k_max, tau)]
    return scores
