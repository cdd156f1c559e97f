"""Supervised fine-tuning: masked next-token negative log-likelihood."""

from __future__ import annotations

import torch


def sft_loss(token_logps: torch.Tensor, mask: torch.Tensor, normalizer: torch.Tensor | int | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked NLL of the answer tokens.

        L = -(1 / N) * sum_{b, t} m[b, t] * log p(y[b, t] | y[b, <t])

    where m masks prompt, template and padding positions. N defaults to sum(m) (the token mean of
    this batch); training passes the answer-token count of the whole accumulation window (all
    workers), so that every token weighs the same whatever the batching.

    Args:
        token_logps: (B, T) log-probabilities of the target tokens (any value where masked).
        mask: (B, T) bool, True where the loss is taken.
        normalizer: N, a scalar.

    Returns:
        The loss, and metrics: ``nll`` (token mean over this batch) and ``tokens`` (sum of m).
    """
    tokens = mask.sum()
    nll_sum = -(token_logps * mask).sum()
    n = tokens if normalizer is None else normalizer
    loss = nll_sum / torch.as_tensor(n, dtype=nll_sum.dtype, device=nll_sum.device).clamp(min=1)
    return loss, {"nll": nll_sum.detach() / tokens.clamp(min=1), "tokens": tokens.detach()}
