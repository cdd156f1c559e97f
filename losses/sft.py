"""Supervised fine-tuning: masked next-token negative log-likelihood."""

from __future__ import annotations

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
