"""FP8 layer selection (precision.fp8_plan) on CPU: which linear layers FP8 can take, and why the others stay.
The FP8 step itself needs a GPU: tests/test_gpu.py."""

from __future__ import annotations

import contextlib

import pytest

from precision import FP8_BACKENDS, convert_to_fp8, fp8_context, fp8_plan


def tiny_llama(hidden: int, intermediate: int, tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


def test_plan_converts_aligned_layers_and_reports_the_rest():
    """Hidden 64, MLP 88: q/o are 64x64, k/v 32x64 (2 key-value heads of 16), all multiples of 16 -> converted;
    gate/up are 88x64 and down 64x88, 88 = 5.5 x 16 -> kept, with the shape named; the tied head -> kept."""
    plan = fp8_plan(tiny_llama(64, 88))
    attention = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    assert sorted(plan.convert) == sorted(attention)
    mlp = [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]
    assert sorted(plan.skipped) == sorted(mlp + ["lm_head"])
    assert "88x64" in plan.skipped["model.layers.0.mlp.gate_proj"]
    assert "64x88" in plan.skipped["model.layers.0.mlp.down_proj"]
    assert "output head" in plan.skipped["lm_head"]
    summary = plan.summary()
    assert summary.startswith("FP8: 8 linear layers converted, 7 kept in high precision")
    assert "model.layers.1.mlp.up_proj: shape 88x64" in summary


def test_plan_keeps_an_untied_head_too():
    plan = fp8_plan(tiny_llama(64, 128, tied=False))
    assert len(plan.convert) == 2 * 7 and list(plan.skipped) == ["lm_head"]


def test_unknown_backend_is_refused_before_anything_changes():
    model = tiny_llama(64, 128)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="unknown FP8 backend 'fp8'; choose one of te, torchao"):
        convert_to_fp8(model, "fp8")
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert FP8_BACKENDS == ("te", "torchao")


def test_only_transformer_engine_needs_a_forward_context():
    """torchao's float8 layers cast by themselves, and bf16 needs nothing: both get a no-op context."""
    for backend in (None, "torchao"):
        assert isinstance(fp8_context(backend), contextlib.nullcontext)
