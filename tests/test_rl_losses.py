"""losses/rl.py against numbers worked out by hand: RLOO, GRPO and Dr. GRPO advantages (equal rewards give 0 and
are counted), the k1/k2/k3 KL estimators (0 when policy == reference), the clipped ratio case by case, and the
policy-gradient loss's gradient equal to the hand-derived REINFORCE gradient -A / n on each completion token."""

from __future__ import annotations

import math

import pytest
import torch

from losses.rl import (
    advantages,
    grpo_advantages,
    kl_estimate,
    policy_gradient_loss,
    rloo_advantages,
    zero_gradient_share,
)

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])


def test_rloo_by_hand():
    """Prompt 0: a 1 is compared with the others' mean (0 + 0 + 1) / 3 = 1/3 -> 2/3; a 0 with 2/3 -> -2/3.
    Prompt 1: equal rewards -> 0. Prompt 2: 3 - 0 = 3; each 0 against (3 + 0 + 0) / 3 = 1 -> -1."""
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0.0, 0.0, 0.0, 0.0], [3.0, -1.0, -1.0, -1.0]])
    torch.testing.assert_close(rloo_advantages(REWARDS), expected)
    naive = torch.tensor([[r[i] - (sum(r) - r[i]) / (len(r) - 1) for i in range(len(r))] for r in REWARDS.tolist()])
    torch.testing.assert_close(rloo_advantages(REWARDS), naive)


def test_grpo_and_dr_grpo_by_hand():
    """Prompt 0: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.5 / (0.57735 + 1e-4) = +-0.86588;
    Dr. GRPO keeps +-0.5. Prompt 2: mean 0.75, std sqrt((2.25^2 + 3 * 0.75^2) / 3) = 1.5 -> 2.25 / 1.5001, -0.75 / 1.5001."""
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    b = 1.5 + 1e-4
    torch.testing.assert_close(grpo_advantages(REWARDS), torch.tensor(
        [[a, -a, -a, a], [0.0, 0.0, 0.0, 0.0], [2.25 / b, -0.75 / b, -0.75 / b, -0.75 / b]]))
    torch.testing.assert_close(grpo_advantages(REWARDS, scale=False), torch.tensor(
        [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [2.25, -0.75, -0.75, -0.75]]))
    torch.testing.assert_close(advantages(REWARDS, "dr_grpo"), grpo_advantages(REWARDS, scale=False))
    torch.testing.assert_close(advantages(REWARDS, "rloo"), rloo_advantages(REWARDS))


def test_equal_rewards_give_zero_advantage_and_are_counted():
    for estimator in ("rloo", "grpo", "dr_grpo"):
        assert advantages(REWARDS, estimator)[1].abs().max() == 0
    assert float(zero_gradient_share(REWARDS)) == pytest.approx(1 / 3)


def test_one_completion_per_prompt_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        advantages(REWARDS, "ppo")


def test_kl_estimators_by_hand():
    """pi = 0.5, pi_ref = 0.25: log r = log(0.25 / 0.5) = -0.693147. k1 = 0.693147, k2 = 0.693147^2 / 2 = 0.240227,
    k3 = (0.5 - 1) + 0.693147 = 0.193147. And all three are 0 where pi == pi_ref."""
    logps, ref = torch.log(torch.tensor([[0.5, 0.3]])), torch.log(torch.tensor([[0.25, 0.3]]))
    for estimator, value in (("k1", 0.693147), ("k2", 0.240227), ("k3", 0.193147)):
        torch.testing.assert_close(kl_estimate(logps, ref, estimator), torch.tensor([[value, 0.0]]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logps, ref, "k4")


def test_clipped_ratio_case_by_case():
    """clip 0.2. A = +1, ratio 1.5: min(1.5, 1.2) -> loss -1.2, clipped. A = -1, ratio 1.5: -min(-1.5, -1.2) = 1.5,
    not clipped. A = +1, ratio 0.5: -min(0.5, 0.8) = -0.5, not clipped. A = -1, ratio 0.5: 0.8, clipped."""
    old = torch.zeros(4, 1)
    logps = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    mask = torch.ones(4, 1, dtype=torch.bool)
    loss, share = policy_gradient_loss(logps, old, adv, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2], [1.5], [-0.5], [0.8]]))
    assert float(share) == 0.5
    unclipped, share = policy_gradient_loss(logps, old, adv, mask)
    torch.testing.assert_close(unclipped, torch.tensor([[-1.5], [1.5], [-0.5], [0.5]]))
    assert float(share) == 0.0


def test_on_policy_gradient_is_reinforce():
    """One update per batch of rollouts (old = detached current): the ratio is 1 and the gradient of the token-mean
    loss with respect to each completion token's log-prob is -A / n (n = 5 completion tokens), 0 where masked."""
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv = torch.tensor([2.0, -1.0])
    loss, _ = policy_gradient_loss(logps, logps.detach(), adv, mask)
    (loss.sum() / mask.sum()).backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.4, -0.4, -0.4], [0.2, 0.2, 0.0]]))
