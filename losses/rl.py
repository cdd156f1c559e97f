"""Online RL from sampled completions: advantage estimators (RLOO, GRPO, Dr. GRPO), KL estimators and the
policy-gradient loss with an optional PPO-style clipped ratio. Pure functions of tensors; the rollout loop that
feeds them (sampling K completions per prompt, rewarding them) is not part of this file.

Shapes: P prompts, K completions each (N = P * K rows, prompt-major: rows p*K .. p*K + K-1 answer prompt p),
T completion positions.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
ADVANTAGE_ESTIMATORS = ("rloo", "grpo", "dr_grpo")


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics", eq. 6; Kool et al. 2019): each completion's
    baseline is the mean reward of the other K-1 completions of its prompt,

        A_i = r_i - 1/(K-1) * sum_{j != i} r_j  =  K/(K-1) * (r_i - mean_j r_j)

    Args:
        rewards: (P, K) rewards, K >= 2.

    Returns:
        (P, K) advantages; 0 for every completion of a prompt whose K rewards are equal.
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 completions per prompt, got {k}")
    others = (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)
    return rewards - others


def grpo_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, "DeepSeekMath", sec. 4.1.2, outcome supervision):

        A_i = (r_i - mean_j r_j) / (std_j r_j + eps)      (std: the sample standard deviation over the K)

    With ``scale=False``, Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", sec. 3.2): A_i = r_i -
    mean_j r_j, without the division that up-weights prompts whose rewards barely differ.

    Args:
        rewards: (P, K) rewards, K >= 2.
        scale: divide by the group's standard deviation (GRPO) or not (Dr. GRPO).
        eps: added to the standard deviation.

    Returns:
        (P, K) advantages; 0 for every completion of a prompt whose K rewards are equal.
    """
    if rewards.shape[-1] < 2:
        raise ValueError(f"GRPO needs at least 2 completions per prompt, got {rewards.shape[-1]}")
    centred = rewards - rewards.mean(-1, keepdim=True)
    return centred / (rewards.std(-1, keepdim=True) + eps) if scale else centred


def advantages(rewards: torch.Tensor, estimator: str) -> torch.Tensor:
    """The advantages of ``estimator`` ("rloo", "grpo" or "dr_grpo"), (P, K) -> (P, K)."""
    if estimator == "rloo":
        return rloo_advantages(rewards)
    if estimator in ("grpo", "dr_grpo"):
        return grpo_advantages(rewards, scale=estimator == "grpo")
    raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {', '.join(ADVANTAGE_ESTIMATORS)}")


def zero_gradient_share(rewards: torch.Tensor) -> torch.Tensor:
    """The share of prompts whose K rewards are all equal: their advantages are 0, so they add no gradient.

    Args:
        rewards: (P, K).

    Returns:
        A scalar in [0, 1].
    """
    return (rewards == rewards[..., :1]).all(-1).float().mean()


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimates of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020, "Approximating KL
    Divergence"), with log r = log pi_ref(y_t) - log pi(y_t):

        k1 = -log r                  unbiased, high variance, can be negative (RLOO's sequence-level penalty)
        k2 = (log r)^2 / 2           biased, low variance, >= 0
        k3 = (r - 1) - log r         unbiased, low variance, >= 0 (GRPO's per-token term, DeepSeekMath eq. 4)

    All three are 0 where pi == pi_ref.

    Args:
        logps, ref_logps: (N, T) log-probabilities of the sampled tokens under the policy and the reference.
        estimator: "k1", "k2" or "k3".

    Returns:
        (N, T) per-token estimates (mask them before summing).
    """
    log_ratio = ref_logps - logps
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def policy_gradient_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                         clip_eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token policy-gradient loss with an optional PPO clipped ratio (Schulman et al. 2017, eq. 7):

        ratio_t = exp(log pi(y_t) - log pi_old(y_t))
        l_t = -A * ratio_t                                                      (clip_eps None: REINFORCE)
        l_t = max(-A * ratio_t, -A * clip(ratio_t, 1 - clip_eps, 1 + clip_eps)) (clipped)

    With ``old_logps`` the detached log-probs of the same policy (one update per batch of rollouts) the ratio is 1
    and the gradient is exactly REINFORCE's: d l_t / d log pi(y_t) = -A. The caller reduces the masked tokens
    (sequence mean, or a token sum over a constant or over the window's tokens: no length bias).

    Args:
        logps: (N, T) log pi of the sampled tokens (with gradient).
        old_logps: (N, T) log pi_old of the same tokens (no gradient flows into them).
        advantages: (N,) one advantage per completion.
        mask: (N, T) bool, True on completion tokens.
        clip_eps: the PPO clip range, or None for no clipping.

    Returns:
        per-token losses (N, T), 0 where masked; and the share of masked tokens whose ratio was clipped.
    """
    ratio = torch.exp(logps - old_logps.detach())
    adv = advantages[:, None].to(logps.dtype)
    loss = -adv * ratio
    clipped = torch.zeros_like(mask)
    if clip_eps is not None:
        clipped_loss = -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)
        clipped = clipped_loss > loss
        loss = torch.maximum(loss, clipped_loss)
    share = (clipped & mask).sum() / mask.sum().clamp(min=1)
    return loss * mask, share.detach()
