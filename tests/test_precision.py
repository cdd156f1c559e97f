"""FP8 layer selection (precision.fp8_plan) and conversion (convert_to_fp8) on CPU: which linear layers FP8 can
take, why the others stay, and that exactly those are swapped with their weights. Transformer Engine and torchao are
faked here; the FP8 step itself needs a GPU: tests/test_gpu.py."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import types

import pytest
import torch

import precision
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


def test_transformer_engine_is_imported_after_pytorchs_cudnn(tmp_path, monkeypatch):
    """import_te loads every library of PyTorch's nvidia-cudnn wheel (RTLD_GLOBAL) and points $CUDNN_HOME at it
    before importing Transformer Engine, so TE cannot pick a system cuDNN of another version. Fake packages stand in
    for the wheel and for TE."""
    lib = tmp_path / "cudnn" / "lib"
    lib.mkdir(parents=True)
    for name in ("libcudnn_graph.so.9", "libcudnn.so.9", "libcudnn_cnn.so.9", "libcudnn.so"):  # the last has no version
        (lib / name).write_bytes(b"")
    cudnn = types.ModuleType("nvidia.cudnn")
    cudnn.__path__ = [str(tmp_path / "cudnn")]
    te = types.ModuleType("transformer_engine.pytorch")
    loaded = []
    nvidia = types.ModuleType("nvidia")
    nvidia.cudnn = cudnn
    monkeypatch.setitem(sys.modules, "nvidia", nvidia)
    monkeypatch.setitem(sys.modules, "nvidia.cudnn", cudnn)
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te)
    monkeypatch.setattr(ctypes, "CDLL", lambda path, mode=0: loaded.append((os.path.basename(path), mode)))
    monkeypatch.setenv("CUDNN_HOME", "")  # empty counts as unset; setenv restores the original value afterwards
    monkeypatch.setenv("CUDNN_PATH", "")
    assert precision.import_te() is te
    assert loaded == [(name, ctypes.RTLD_GLOBAL) for name in ("libcudnn.so.9", "libcudnn_cnn.so.9", "libcudnn_graph.so.9")]
    assert os.environ["CUDNN_HOME"] == str(tmp_path / "cudnn")


def test_an_explicit_cudnn_home_is_left_alone(monkeypatch):
    monkeypatch.setenv("CUDNN_HOME", "/opt/my-cudnn")
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", types.ModuleType("transformer_engine.pytorch"))
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: pytest.fail("no library may be loaded"))
    precision.import_te()
    assert os.environ["CUDNN_HOME"] == "/opt/my-cudnn"


class FakeTeLinear(torch.nn.Module):
    """Stands in for ``transformer_engine.pytorch.Linear``: its constructor, NaN weights until copied, a plain forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, params_dtype=None, device=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((out_features, in_features), float("nan"), dtype=params_dtype,
                                                    device=device))
        self.bias = torch.nn.Parameter(torch.full((out_features,), float("nan"), dtype=params_dtype,
                                                  device=device)) if bias else None

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


@pytest.fixture
def fake_te(monkeypatch):
    te = types.ModuleType("transformer_engine.pytorch")
    te.Linear = FakeTeLinear
    monkeypatch.setenv("CUDNN_HOME", "/opt/my-cudnn")  # import_te loads no library
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te)
    return te


def test_te_conversion_swaps_exactly_the_planned_layers_and_keeps_their_weights(fake_te, caplog):
    """bf16 Llama, hidden 64, MLP 88, biased attention: the 8 attention projections become TE layers holding the same
    weights and biases in bf16 (the logits do not change; a weight left uncopied would make them NaN), the MLP and the
    tied head are the same modules as before, and the plan is logged."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                         tie_word_embeddings=True)).bfloat16()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    kept = {name: model.get_submodule(name) for name in fp8_plan(model).skipped}
    caplog.set_level(logging.INFO, logger="precision")
    plan = convert_to_fp8(model, "te")
    converted = {name: m for name, m in model.named_modules() if isinstance(m, FakeTeLinear)}
    assert sorted(converted) == sorted(plan.convert) == sorted(f"model.layers.{i}.self_attn.{p}_proj"
                                                               for i in range(2) for p in "qkvo")
    assert all(m.weight.dtype == m.bias.dtype == torch.bfloat16 for m in converted.values())
    assert all(model.get_submodule(name) is module for name, module in kept.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert plan.summary() in caplog.text


def test_a_plain_torch_model_has_no_head_to_keep(fake_te):
    """Without ``get_output_embeddings`` only shapes decide: the top-level 32 -> 48 layer (no bias) converts, the
    nested 48 -> 8 one (8 < 16) stays."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 48, bias=False), torch.nn.Sequential(torch.nn.ReLU(),
                                                                                         torch.nn.Linear(48, 8)))
    plan = convert_to_fp8(model, "te")
    assert plan.convert == ["0"] and list(plan.skipped) == ["1.1"] and "shape 8x48" in plan.skipped["1.1"]
    assert plan.summary().startswith("FP8: 1 linear layers converted, 1 kept in high precision")
    assert isinstance(model[0], FakeTeLinear) and model[0].bias is None and type(model[1][1]) is torch.nn.Linear


def test_torchao_is_asked_to_convert_only_the_planned_layers(monkeypatch):
    """torchao's convert_to_float8_training (faked) gets the tensorwise recipe and a filter that admits the plan's
    layers and no other: not the misaligned MLP, not the head."""
    seen = {}

    class Float8LinearConfig:
        from_recipe_name = staticmethod(lambda name: f"recipe {name}")

    def convert_to_float8_training(model, config, module_filter_fn):
        seen["config"] = config
        seen["admitted"] = sorted(name for name, m in model.named_modules()
                                  if isinstance(m, torch.nn.Linear) and module_filter_fn(m, name))

    float8 = types.ModuleType("torchao.float8")
    float8.Float8LinearConfig, float8.convert_to_float8_training = Float8LinearConfig, convert_to_float8_training
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.float8", float8)
    plan = convert_to_fp8(tiny_llama(64, 88), "torchao")
    assert len(plan.convert) == 8
    assert seen == {"config": "recipe tensorwise", "admitted": sorted(plan.convert)}
