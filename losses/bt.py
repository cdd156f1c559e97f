"""Bradley-Terry reward model loss on preference pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bt_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry negative log-likelihood (Bradley & Terry 1952; the reward model loss of Ouyang et al. 2022, eq. 1):

        L = -E[ log sigmoid( r(x, y_w) - r(x, y_l) ) ]

    Args:
        chosen_rewards, rejected_rewards: (B,) scalar rewards of the chosen and rejected responses.

    Returns:
        The mean loss, and metrics: ``rewards/accuracy`` (share with r_w > r_l), ``rewards/margin`` (mean r_w - r_l),
        ``rewards/chosen`` and ``rewards/rejected`` (means).
    """
    margin = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(margin).mean()
    metrics = {
        "rewards/chosen": chosen_rewards.detach().mean(),
        "rewards/rejected": rejected_rewards.detach().mean(),
        "rewards/margin": margin.detach().mean(),
        "rewards/accuracy": (margin.detach() > 0).float().mean(),
    }
    return loss, metrics
