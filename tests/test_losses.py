"""The SFT loss and log-prob extraction against hand-worked numbers and naive references."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM

from losses.logprobs import gather_logprobs, shift_labels, token_logprobs
from losses.sft import sft_loss


def test_gather_logprobs_matches_manual_log_softmax():
    """logits [0, ln 2, ln 5] -> softmax [1/8, 2/8, 5/8]; target 2 -> log(5/8), target 0 -> log(1/8)."""
    logits = torch.tensor([[0.0, math.log(2), math.log(5)], [0.0, math.log(2), math.log(5)]])
    got = gather_logprobs(logits, torch.tensor([2, 0]))
    torch.testing.assert_close(got, torch.tensor([math.log(5 / 8), math.log(1 / 8)]))


def test_sft_loss_is_the_masked_mean_nll():
    """Tokens with log-probs log(1/2), log(1/4) are learned, log(1/8) is masked:
    L = -(log 1/2 + log 1/4) / 2 = (ln 2 + 2 ln 2) / 2 = 1.5 ln 2."""
    logps = torch.tensor([[math.log(1 / 2), math.log(1 / 8)], [math.log(1 / 4), 0.0]])
    mask = torch.tensor([[True, False], [True, False]])
    loss, metrics = sft_loss(logps, mask)
    torch.testing.assert_close(loss, torch.tensor(1.5 * math.log(2)))
    assert int(metrics["tokens"]) == 2


def test_shift_labels():
    targets, mask = shift_labels(torch.tensor([[-100, 4, 5, -100]]))
    torch.testing.assert_close(targets, torch.tensor([[4, 5, 0]]))
    torch.testing.assert_close(mask, torch.tensor([[True, True, False]]))


def test_token_logprobs_equals_naive_full_vocabulary_computation(tiny_model_dir):
    """Projecting only the answer positions onto the vocabulary gives the same numbers as the full forward pass."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    ids = torch.randint(4, 90, (2, 9))
    attention = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 6:] = -100
    logps, mask = token_logprobs(model, ids, attention, labels)
    full = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits.float(), -1)  # (B, T, V)
    naive = torch.zeros(2, 8)
    for b in range(2):
        for t in range(8):
            if labels[b, t + 1] != -100:
                naive[b, t] = full[b, t, labels[b, t + 1]]
    torch.testing.assert_close(logps, naive, rtol=1e-5, atol=1e-5)
    assert mask.sum() == 5 + 2

    loss, _ = sft_loss(logps, mask)
    torch.testing.assert_close(loss, -naive.sum() / 7, rtol=1e-5, atol=1e-6)
