"""Bradley-Terry reward model loss on preference pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bt_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, reduction: str = "mean"
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry negative log-likelihood (Bradley & Terry 1952; the reward model loss of Ouyang et al. 2022, eq. 1):

        L = -E[ log sigmoid( r(x, y_w) - r(x, y_l) ) ]

    Args:
        chosen_rewards, rejected_rewards: (B,) scalar rewards of the chosen and rejected responses.
        reduction: "mean" (L above) or "sum" over the B pairs (training divides the sum by the pairs of the
            accumulation window).

    Returns:
        The loss, and metrics: ``rewards/accuracy`` (share with r_w > r_l), ``rewards/margin`` (mean r_w - r_l),
        ``rewards/chosen`` and ``rewards/rejected`` (means).
    """
    margin = chosen_rewards - rejected_rewards
    per_pair = -F.logsigmoid(margin)
    loss = per_pair.sum() if reduction == "sum" else per_pair.mean()
    metrics = {
        "rewards/chosen": chosen_rewards.detach().mean(),
        "rewards/rejected": rejected_rewards.detach().mean(),
        "rewards/margin": margin.detach().mean(),
        "rewards/accuracy": (margin.detach() > 0).float().mean(),
    }
    return loss, metrics
