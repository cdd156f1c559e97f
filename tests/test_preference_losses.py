"""DPO and Bradley-Terry losses against hand-worked numbers and a naive per-example reference."""

from __future__ import annotations

import math

import torch

from losses.bt import bt_loss
from losses.dpo import dpo_loss, sequence_logps


def _naive_dpo(pc, pr, rc, rr, beta):
    losses = [math.log1p(math.exp(-(beta * (a - c) - beta * (b - d)))) for a, b, c, d in zip(pc, pr, rc, rr)]
    return sum(losses) / len(losses)


def test_dpo_loss_hand_worked():
    """beta = 0.5.
    Pair 1: r_w = 0.5 * (-4 - -5) = 0.5, r_l = 0.5 * (-6 - -5) = -0.5, margin 1: -log sigmoid(1) = log(1 + e^-1) = 0.313262.
    Pair 2: r_w = 0.5 * (-3 - -3) = 0,   r_l = 0.5 * (-2 - -4) = 1,    margin -1: log(1 + e) = 1.313262.
    Mean loss 0.813262; rewards chosen (0.5 + 0) / 2 = 0.25, rejected (-0.5 + 1) / 2 = 0.25, margin 0, accuracy 1/2."""
    loss, m = dpo_loss(torch.tensor([-4.0, -3.0]), torch.tensor([-6.0, -2.0]), torch.tensor([-5.0, -3.0]),
                       torch.tensor([-5.0, -4.0]), beta=0.5)
    torch.testing.assert_close(loss, torch.tensor(0.813262), atol=1e-6, rtol=0)
    torch.testing.assert_close(m["rewards/chosen"], torch.tensor(0.25))
    torch.testing.assert_close(m["rewards/rejected"], torch.tensor(0.25))
    torch.testing.assert_close(m["rewards/margin"], torch.tensor(0.0))
    torch.testing.assert_close(m["rewards/accuracy"], torch.tensor(0.5))


def test_dpo_loss_matches_naive_reference_on_random_pairs():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, dtype=torch.float64) * 20 for _ in range(4))
    for beta in (0.1, 1.0, 2.0):
        loss, _ = dpo_loss(pc, pr, rc, rr, beta)
        expected = _naive_dpo(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta)
        torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))


def test_policy_equal_to_reference_gives_log_2_and_zero_rewards():
    logps = torch.tensor([-12.0, -3.5, -40.0])
    loss, m = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    torch.testing.assert_close(loss, torch.tensor(math.log(2)))
    assert float(m["rewards/chosen"]) == float(m["rewards/rejected"]) == 0.0


def test_gradient_flows_only_into_the_policy():
    policy = torch.tensor([-4.0, -6.0], requires_grad=True)
    ref = torch.tensor([-5.0, -5.0], requires_grad=True)
    loss, _ = dpo_loss(policy[:1], policy[1:], ref[:1], ref[1:], beta=0.5)
    loss.backward()
    assert ref.grad is None
    # d/d pc of -log sigmoid(m), m = 0.5 * (pc - rc) - 0.5 * (pr - rr) = 1: -(1 - sigmoid(1)) * 0.5
    expected = -(1 - torch.sigmoid(torch.tensor(1.0))) * 0.5
    torch.testing.assert_close(policy.grad, torch.stack([expected, -expected]))


def test_sequence_logps_sums_only_response_tokens():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, -9.0]])
    mask = torch.tensor([[False, True, True], [True, True, False]])
    torch.testing.assert_close(sequence_logps(token_logps, mask), torch.tensor([-5.0, -0.75]))


def test_bt_loss_hand_worked():
    """r_w - r_l = 2 - 0 = 2: log(1 + e^-2) = 0.126928; 1 - 3 = -2: log(1 + e^2) = 2.126928; mean 1.126928.
    Accuracy 1/2, margin (2 + -2) / 2 = 0, chosen mean 1.5, rejected mean 1.5."""
    loss, m = bt_loss(torch.tensor([2.0, 1.0]), torch.tensor([0.0, 3.0]))
    torch.testing.assert_close(loss, torch.tensor(1.126928), atol=1e-6, rtol=0)
    torch.testing.assert_close(m["rewards/accuracy"], torch.tensor(0.5))
    torch.testing.assert_close(m["rewards/margin"], torch.tensor(0.0))
    torch.testing.assert_close(m["rewards/chosen"], torch.tensor(1.5))
