"""``sampling.generate_from_prompts``, the batched generation of validation, inference.py, DPO pairs and Best-of-N:
on the CPU it decodes with the shared-prefix sampler where that does what transformers' ``generate`` would, and
leaves everything else to ``generate``."""

from __future__ import annotations

import pytest
import torch

import models
from sampling import generate_from_prompts, sampler_settings, transformers_generate


@pytest.fixture()
def tiny(tiny_model_dir):
    return models.load_causal_lm(str(tiny_model_dir)), models.load_tokenizer(str(tiny_model_dir))


def _no_generate(**kwargs):
    raise AssertionError("transformers' generate ran where the sampler should have")


def test_greedy_answers_on_the_cpu_are_generates_and_stop_where_it_stops(tiny, monkeypatch):
    model, tokenizer = tiny
    prompts = [tokenizer(text)["input_ids"] for text in ("what is 2+2?", "hi", "count: 1 2 3")]  # padded to one width
    # A stop token the first answer produces at its third token, so rows end at different steps in both paths.
    first = transformers_generate(model, tokenizer, prompts[:1], 8, do_sample=False)[0]
    stop_token = tokenizer(first[2], add_special_tokens=False)["input_ids"][-1]
    monkeypatch.setattr(models, "stop_token_ids", lambda tok: {stop_token})
    expected = transformers_generate(model, tokenizer, prompts, 12, do_sample=False)
    assert len(expected[0]) < 12 and any(len(answer) == 12 for answer in expected)  # one stopped, one ran the budget
    monkeypatch.setattr(model, "generate", _no_generate)
    assert generate_from_prompts(model, tokenizer, prompts, 12, do_sample=False) == expected


def test_sampled_answers_come_n_per_prompt_and_follow_torchs_seed(tiny, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr(model, "generate", _no_generate)
    prompts = [tokenizer(text)["input_ids"] for text in ("abc", "hello there")]

    def draw(seed: int) -> list[str]:
        torch.manual_seed(seed)
        return generate_from_prompts(model, tokenizer, prompts, 10, do_sample=True, temperature=1.0, top_k=0,
                                     num_return_sequences=3)

    answers = draw(0)
    assert len(answers) == 6 and len(set(answers)) > 1  # a random model at temperature 1: the samples differ
    assert draw(0) == answers and draw(1) != answers


def test_a_one_token_prompt_or_another_setting_goes_to_generate(tiny):
    model, tokenizer = tiny
    calls = []
    real = model.generate
    model.generate = lambda **kwargs: calls.append(kwargs) or real(**kwargs)
    generate_from_prompts(model, tokenizer, [[5]], 3, do_sample=False)  # the sampler needs 2 prompt tokens
    generate_from_prompts(model, tokenizer, [[5, 6]], 3, do_sample=False, repetition_penalty=1.3)
    assert len(calls) == 2 and calls[1]["repetition_penalty"] == 1.3


@pytest.mark.parametrize(("config", "kwargs", "expected"), [
    ({}, {}, (0.0, 1.0, 1)),  # greedy unless told to sample
    ({}, {"do_sample": True}, None),  # generate samples from the 50 likeliest tokens then
    ({}, {"do_sample": True, "top_k": 0, "temperature": 0.7, "num_return_sequences": 4}, (0.7, 1.0, 4)),
    ({"top_p": 0.8}, {"do_sample": True, "top_k": 0}, (1.0, 0.8, 1)),  # the model's own settings count
    ({"do_sample": True, "top_k": 0, "temperature": 0.6}, {}, (0.6, 1.0, 1)),
    ({"do_sample": True, "top_k": 0}, {"do_sample": False}, (0.0, 1.0, 1)),  # the caller's win
    ({"repetition_penalty": 1.2}, {"do_sample": False}, None),
    ({"repetition_penalty": 1.0}, {"do_sample": False}, (0.0, 1.0, 1)),  # a neutral value changes nothing
    ({}, {"do_sample": False, "min_new_tokens": 5}, None),
    ({}, {"num_beams": 2}, None),
])
def test_sampler_settings_read_generates_settings(tiny, config, kwargs, expected):
    model, _ = tiny
    for name, value in config.items():
        setattr(model.generation_config, name, value)
    assert sampler_settings(model, kwargs) == expected


@pytest.mark.parametrize("kwargs", [{}, {"do_sample": True}, {"do_sample": True, "top_k": 0, "top_p": 0.9},
                                    {"do_sample": True, "top_k": 0, "temperature": 0.5}, {"do_sample": False, "top_k": 0}])
def test_where_the_sampler_decodes_generate_would_only_scale_and_cut_the_nucleus(tiny, kwargs):
    """Checks ``GENERATE_DEFAULTS`` against the logits processors transformers itself builds for these settings
    (private API: skipped where this transformers lacks it)."""
    model, _ = tiny
    if not hasattr(model, "_prepare_generation_config") or not hasattr(model, "_get_logits_processor"):
        pytest.skip("this transformers builds its logits processors otherwise")
    config, _ = model._prepare_generation_config(None, **kwargs)
    processors = model._get_logits_processor(config, input_ids_seq_length=3, encoder_input_ids=None,
                                             prefix_allowed_tokens_fn=None, logits_processor=None, device="cpu")
    names = {type(p).__name__ for p in processors}
    settings = sampler_settings(model, kwargs)
    if settings is None:
        assert "TopKLogitsWarper" in names
    else:
        temperature, top_p, _ = settings
        assert bool(config.do_sample) == (temperature > 0)
        allowed = {"TemperatureLogitsWarper", "TopPLogitsWarper"} if temperature > 0 else set()
        assert names <= allowed, names
        assert ("TopPLogitsWarper" in names) == (top_p < 1)


def test_the_sampler_path_counts_into_the_bar_what_generate_counts(tiny, monkeypatch):
    model, tokenizer = tiny

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    prompts = [[5, 6, 7], [8, 9]]
    first = transformers_generate(model, tokenizer, prompts[:1], 4, do_sample=False)[0]
    monkeypatch.setattr(models, "stop_token_ids", lambda tok: {tokenizer(first[1], add_special_tokens=False)["input_ids"][-1]})
    generated, sampled = Bar(), Bar()
    transformers_generate(model, tokenizer, prompts, 7, progress=generated, do_sample=False)
    generate_from_prompts(model, tokenizer, prompts, 7, progress=sampled, do_sample=False)
    assert 7 < generated.n < 14 and sampled.n == generated.n  # one row stopped early; its stop token counts


def test_the_generation_bench_times_both_paths_on_the_same_answers(tiny_model_dir):
    """bench/generation.py on the tiny model: greedy lines give both paths the same answers and tokens; sampled lines
    count P * K answers' tokens within the budget."""
    from bench import generation

    greedy, sampled = generation.main(["--model-name", str(tiny_model_dir), "--lines", "3x1,2x3", "--max-new-tokens", "4"])
    assert greedy["same_answers"] == 3 and greedy["sampler"]["tokens"] == greedy["generate"]["tokens"] > 0
    assert all(0 < sampled[path]["tokens"] <= 2 * 3 * 4 for path in ("sampler", "generate"))
    assert sampled["speedup"] > 0 and sampled["mode"] == "sampled"


def _sharded_worker(rank: int, model_dir: str, out: str) -> None:
    from pathlib import Path

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from sampling import sharded

    plain = AutoModelForCausalLM.from_pretrained(model_dir)  # as under DDP: each rank's forward passes are its own
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    FSDP(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), device_id=torch.device("cpu"), use_orig_params=True)
    Path(out, f"rank-{rank}").write_text(f"{sharded(plain)} {sharded(model)}")


@pytest.mark.slow
def test_a_model_sharded_across_ranks_goes_to_generate(tiny_model_dir, tmp_path):
    """Under FSDP with 2 ranks every forward pass is a collective, so generation stays with ``generate`` (which keeps
    finished ranks stepping); an unsharded model on the same 2 ranks, and any model without a process group, may use
    the sampler."""
    from test_online_rl import _on_two_gloo_ranks

    from sampling import sharded

    _on_two_gloo_ranks(_sharded_worker, str(tiny_model_dir), str(tmp_path))
    assert [(tmp_path / f"rank-{r}").read_text() for r in (0, 1)] == ["False True"] * 2
    assert not sharded(models.load_causal_lm(str(tiny_model_dir)))
