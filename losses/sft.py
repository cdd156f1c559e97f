"""Supervised fine-tuning: masked next-token negative log-likelihood, and the GenRM-CoT verifier's two-part SFT
loss built on it. (The verifier's score, p("Yes") over adaptive-K rationales, is served by ``extension/verifier.py``.)"""

from __future__ import annotations

import torch


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor, reduction: str = "mean"
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked NLL of the answer tokens, averaged over them:

        L = -(1 / N) * sum_{b, t} m[b, t] * log p(y[b, t] | y[b, <t]),   N = sum_{b, t} m[b, t]

    where m masks prompt, template and padding positions. Training takes the sum (``reduction="sum"``) and
    divides it by the answer tokens of the whole accumulation window (``module.training_step``), so every answer
    token weighs the same whatever the batch size, accumulation or worker count.

    Args:
        token_logps: (B, T) log-probabilities of the target tokens (any value where masked).
        mask: (B, T) bool, True where the loss is taken.
        reduction: "mean" (L above) or "sum" (N * L).

    Returns:
        The loss, and metrics: ``tokens`` (N).
    """
    tokens = mask.sum()
    total = -(token_logps * mask).sum()
    return (total if reduction == "sum" else total / tokens.clamp(min=1)), {"tokens": tokens.detach()}


# ---- GenRM-CoT: the verifier's training loss ------------------------------------------------

VERIFIER_PARTS = ("verify", "correct")  # part 0: verification rationales, part 1: correct solutions


def genrm_part_sums(token_logps: torch.Tensor, mask: torch.Tensor, part: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed NLL of each GenRM-CoT part over its own target tokens, and those tokens' counts:

        S_p = -sum_{b in part p, t} m[b, t] * log p(y[b, t] | y[b, <t]),   N_p = sum_{b in part p, t} m[b, t]

    Args:
        token_logps: (B, T) log-probabilities of the target tokens.
        mask: (B, T) bool, True where the loss is taken.
        part: (B,) 0 for verification rows, 1 for correct-solution rows.

    Returns:
        sums S (2,) and token counts N (2,).
    """
    rows = torch.stack([part == p for p in range(len(VERIFIER_PARTS))])  # (2, B)
    part_mask = rows[:, :, None] & mask[None]  # (2, B, T)
    return -(token_logps[None] * part_mask).sum(dim=(1, 2)), part_mask.sum(dim=(1, 2))


def genrm_loss(part_sums: torch.Tensor, part_tokens: torch.Tensor, lam: float) -> torch.Tensor:
    """GenRM-CoT loss, eq. 7 of our users' report (Zhang et al., "Generative Verifiers", ICLR 2025, sec. 3):

        L = L_SFT(D_verify) + lambda * L_SFT(D_correct),   L_SFT(D_p) = S_p / N_p   (0 for a part with N_p = 0)

    Each part's SFT loss is the mean over its own target tokens (the rationale of a verification row, the
    solution of a correct-solution row), so lambda alone sets their balance whatever the mix of a batch. Training
    calls it with the sums of a micro-batch and the token counts of its whole accumulation window (so a part's
    mean runs over the window, see ``module.training_step``); validation with the sums and counts of the split.

    Args:
        part_sums: (2,) S_p of ``genrm_part_sums``.
        part_tokens: (2,) N_p (any positive scale: training divides counts by the number of micro-batches).
        lam: lambda, the weight of the correct-solution part.

    Returns:
        The scalar loss.
    """
    means = part_sums / torch.where(part_tokens > 0, part_tokens, 1)
    return means[0] + lam * means[1]
