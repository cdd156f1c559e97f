"""Direct Preference Optimization against a frozen reference model."""

from __future__ import annotations

import torch

from losses.bt import bt_loss


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the response tokens' log-probabilities: log pi(y | x).

    Args:
        token_logps: (N, T) per-token log-probabilities (any value where masked).
        mask: (N, T) bool, True on response tokens (prompt, template and padding masked, as in SFT).

    Returns:
        (N,) per-sequence log-probabilities.
    """
    return (token_logps * mask).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, reduction: str = "mean"
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO loss, Rafailov et al. 2023, eq. 7:

        L = -E[ log sigmoid( beta * (log pi(y_w|x) - log pi_ref(y_w|x)) - beta * (log pi(y_l|x) - log pi_ref(y_l|x)) ) ]

    The implicit rewards are r_w = beta * (log pi(y_w|x) - log pi_ref(y_w|x)) and likewise r_l; with
    pi == pi_ref both are 0 and L = log 2.

    Args:
        policy_chosen, policy_rejected: (B,) log pi of the chosen (y_w) and rejected (y_l) responses.
        ref_chosen, ref_rejected: (B,) the same under the frozen reference (no gradient flows into them).
        beta: the temperature; larger beta keeps the policy closer to the reference.
        reduction: "mean" (L above) or "sum" over the pairs, as in ``bt_loss``.

    Returns:
        The loss, and metrics: ``rewards/chosen``, ``rewards/rejected`` (means), ``rewards/margin``
        (mean r_w - r_l) and ``rewards/accuracy`` (share of pairs with r_w > r_l).
    """
    # DPO is the Bradley-Terry loss on the implicit rewards.
    return bt_loss(beta * (policy_chosen - ref_chosen.detach()), beta * (policy_rejected - ref_rejected.detach()),
                   reduction)
