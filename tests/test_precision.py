"""FP8 layer selection (precision.fp8_plan) on CPU: which linear layers FP8 can take, and why the others stay.
The FP8 step itself needs a GPU: tests/test_gpu.py."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import types

import pytest

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


# 25-step window means of tests/test_gpu.py's copy task, measured on an H100 on 2026-11-24 (docs/benchmarks.md).
H100_BF16 = [5.542, 5.397, 4.153, 0.419, 0.029, 0.019, 0.018, 0.017, 0.017, 0.016, 0.016, 0.015]
H100_DYNAMIC = [5.542, 5.394, 4.17, 0.448, 0.03, 0.019, 0.018, 0.017, 0.017, 0.016, 0.016, 0.015]  # torchao, TE current
H100_DELAYED = [5.541, 5.42, 4.804, 0.943, 0.037, 0.019, 0.018, 0.017, 0.016, 0.016, 0.016, 0.015]


def test_gpu_tracking_criterion_on_the_measured_curves():
    """The GPU test's criterion (tests/test_gpu.py), checked here on the curves it was measured with: dynamic
    scaling tracks in every window; delayed scaling fails the every-window rule at the collapse and passes its own;
    a curve that collapses two windows late, or drifts after the collapse, fails."""
    from tests.test_gpu import tracking_problems

    assert tracking_problems(H100_BF16, H100_DYNAMIC, None) == []
    assert tracking_problems(H100_BF16, H100_DYNAMIC, "current") == []
    assert tracking_problems(H100_BF16, H100_DELAYED, None) == ["window 75-100: bf16 0.419, fp8 0.943"]  # as on the H100
    assert tracking_problems(H100_BF16, H100_DELAYED, "delayed") == []
    late = H100_DELAYED[:3] + [4.5, 3.0, 0.9] + H100_DELAYED[6:]
    assert tracking_problems(H100_BF16, late, "delayed")[0] == "FP8 collapsed in window 5, bf16 in 3"
    drift = H100_DELAYED[:8] + [0.2] + H100_DELAYED[9:]
    assert tracking_problems(H100_BF16, drift, "delayed") == ["window 200-225: bf16 0.017, fp8 0.200"]
