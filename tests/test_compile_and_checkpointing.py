"""--compile-head and --activation-checkpointing on CPU: the same losses and gradients as the eager, fully stored
step (the speed and memory they buy are GPU measurements: docs/benchmarks.md), through the objectives' losses and
through train.py; and under Transformer Engine (faked here) the recompute goes through TE's own checkpoint."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import Recorder
from transformers import AutoModelForCausalLM

import precision
import train
from collate_functions import SFTCollator, tokenize_sft
from config import resolve
from losses.logprobs import compile_head, head_logprobs, token_logprobs
from objectives import SFT


def _batch(tokenizer) -> dict:
    rows = [{"messages": [{"role": "user", "content": "Q" * (3 + i)}, {"role": "assistant", "content": "ab" * (i + 2)}]}
            for i in range(3)]
    return SFTCollator(tokenizer.pad_token_id)([tokenize_sft(tokenizer, r, 200, "drop")[0] for r in rows])


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss_sum, units, _ = SFT.loss(model, batch, None)
    (loss_sum / units).backward()
    return loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_compiled_head_gives_the_eager_losses_and_gradients(tiny_model_dir, char_tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    batch = _batch(char_tokenizer)
    eager_loss, eager_grads = _loss_and_grads(model, batch)
    compile_head(model)
    assert model.logprob_head is not head_logprobs
    for rows in (slice(None), slice(0, 2)):  # a second shape reuses the dynamic graph
        sub = {k: v[rows] for k, v in batch.items()}
        compiled_loss, compiled_grads = _loss_and_grads(model, sub)
        model.__dict__.pop("logprob_head", None)
        reference_loss, reference_grads = _loss_and_grads(model, sub)
        compile_head(model)
        torch.testing.assert_close(compiled_loss, reference_loss, rtol=1e-5, atol=1e-5)
        for name, grad in reference_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(_loss_and_grads(model, batch)[0], eager_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_the_compiled_head_reads_a_tempered_policy_as_the_eager_one(tiny_model_dir, char_tokenizer):
    """Online RL's loss at a sampling temperature through --compile-head: the same log-probs as the eager head, which
    differ from the untempered ones."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = _batch(char_tokenizer)
    args = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        eager, mask = token_logprobs(model, *args, temperature=0.7)
        plain, _ = token_logprobs(model, *args)
        compile_head(model)
        compiled, _ = token_logprobs(model, *args, temperature=0.7)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(eager[mask], plain[mask], rtol=1e-3, atol=1e-4)


def test_activation_checkpointing_gives_the_same_losses_and_gradients(tiny_model_dir, char_tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    batch = _batch(char_tokenizer)
    stored_loss, stored_grads = _loss_and_grads(model, batch)
    calls = []
    checkpointed = precision.enable_activation_checkpointing(model)
    assert checkpointed >= 2  # both decoder layers
    for layer in model.model.layers:  # count the recomputes: each layer's forward runs again in backward
        inner = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda fn, *a, _inner=inner, **k: calls.append(1) or _inner(fn, *a, **k)
    loss, grads = _loss_and_grads(model, batch)
    assert len(calls) == len(model.model.layers)
    torch.testing.assert_close(loss, stored_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == stored_grads.keys()
    for name, grad in stored_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    model.eval()  # generation is not checkpointed
    with torch.no_grad():
        token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert len(calls) == len(model.model.layers)


def test_under_transformer_engine_layers_recompute_through_te_checkpoint(tiny_model_dir, char_tokenizer, monkeypatch):
    """Transformer Engine's checkpoint re-enters the FP8 context for the recompute; torch's would not. The fake TE
    checkpoint here records each call and delegates to torch's, so the numbers must still match."""
    recorded = []

    def te_checkpoint(function, *args, **kwargs):
        recorded.append(function)
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)

    monkeypatch.setattr(precision, "import_te", lambda: types.SimpleNamespace(checkpoint=te_checkpoint))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    batch = _batch(char_tokenizer)
    stored_loss, stored_grads = _loss_and_grads(model, batch)
    precision.enable_activation_checkpointing(model, fp8_backend="te")
    assert all(layer._gradient_checkpointing_func is te_checkpoint for layer in model.model.layers)
    loss, grads = _loss_and_grads(model, batch)
    assert len(recorded) == len(model.model.layers)
    torch.testing.assert_close(loss, stored_loss, rtol=1e-6, atol=1e-6)
    for name, grad in stored_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_train_py_with_both_flags_follows_the_plain_loss_curve(tiny_run_args):
    """6 optimizer steps through train.run with --activation-checkpointing --compile-head: the same training losses
    and the same validation loss as a plain run."""
    base = [*tiny_run_args, "--train-dataset-length", "24", "--val-generate-samples", "0", "--max-steps", "6"]
    plain, both = Recorder(), Recorder()
    plain_results = train.run(resolve([*base, "--name", "plain"])[0], callbacks=[plain])
    both_results = train.run(resolve([*base, "--name", "both", "--activation-checkpointing", "--compile-head"])[0],
                             callbacks=[both])
    assert len(plain.losses) == len(both.losses) == 6
    torch.testing.assert_close(torch.tensor(both.losses), torch.tensor(plain.losses), rtol=1e-4, atol=1e-5)
    assert both_results["after"]["val/loss"] == pytest.approx(plain_results["after"]["val/loss"], abs=1e-3)
