"""bench/gpu_throughput.py's built-in architectures are the real ones: their parameter counts (built on the meta
device, no memory) match the published sizes of Qwen2.5-0.5B, -1.5B and -3B, and each GEMM shape it lists is a
linear layer of that model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from bench import gpu_throughput

# Qwen2.5 model cards: 0.49B, 1.54B and 3.09B parameters (embeddings tied, so counted once).
PUBLISHED = {"qwen2.5-0.5b": 0.49e9, "qwen2.5-1.5b": 1.54e9, "qwen2.5-3b": 3.09e9}


@pytest.mark.parametrize("name", sorted(gpu_throughput.MODELS))
def test_architecture_has_the_published_size_and_gemm_shapes(name):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**gpu_throughput.MODELS[name]))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(PUBLISHED[name], rel=0.01)
    shapes = {(m.in_features, m.out_features) for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear)}
    listed = {(fan_in, fan_out) for _, fan_in, fan_out in gpu_throughput.GEMM_SHAPES[name.replace("qwen", "Qwen").replace("b", "B")]}
    assert listed == shapes
