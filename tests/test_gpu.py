"""GPU-only checks: FP8 training tracks bf16 (skipped without a CUDA GPU of compute capability 8.9+ (Ada, Hopper) or
without an FP8 backend, Transformer Engine or torchao), and online RL runs on the GPU (skipped without CUDA): its
reward models sit there, a resumed run brings its kept rollouts back to it, and its CUDA-graph decoding gives the
dynamic path's answers, and its sampler draws tokens at their probabilities there. Run with ``pytest -m gpu``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from losses.logprobs import IGNORE_INDEX, token_logprobs
from losses.sft import sft_loss
from precision import convert_to_fp8, fp8_context, te_recipe

pytestmark = pytest.mark.gpu

HAS_FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
BACKEND_MODULES = {"te": "transformer_engine", "torchao": "torchao"}
STEPS, WINDOW = 300, 25


def copy_task_curve(backend: str | None, scaling: str = "delayed", steps: int = STEPS) -> list[float]:
    """SFT losses of a 4-layer Llama learning to copy a random 64-token prefix, bf16 weights, FP8 if ``backend``
    (Transformer Engine with the ``scaling`` recipe). Same initial weights and batches for every backend."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    model = LlamaForCausalLM(config).cuda().to(torch.bfloat16)
    if backend:
        plan = convert_to_fp8(model, backend)
        assert len(plan.convert) == 4 * 7 and list(plan.skipped) == ["lm_head"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    recipe = te_recipe(scaling=scaling) if backend == "te" else None
    generator = torch.Generator(device="cuda").manual_seed(1)
    losses = []
    for _ in range(steps):
        prefix = torch.randint(0, 256, (32, 64), generator=generator, device="cuda")
        ids = torch.cat([prefix, prefix], dim=1)
        labels = ids.clone()
        labels[:, :64] = IGNORE_INDEX  # the loss is on the copy only
        with fp8_context(backend, recipe):
            logps, mask = token_logprobs(model, ids, None, labels)
        loss = sft_loss(logps, mask)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def window_means(losses: list[float]) -> list[float]:
    return [sum(losses[i:i + WINDOW]) / WINDOW for i in range(0, len(losses), WINDOW)]


def tracking_problems(bf16: list[float], fp8: list[float], scaling: str | None) -> list[str]:
    """How an FP8 curve of 25-step window means fails to track bf16's (empty: it tracks). Dynamic scaling (torchao,
    TE's current scaling) must be within 15% + 0.05 of bf16 in every window. TE's delayed scaling takes each scale
    from earlier steps, so while the loss collapses (the activations change fastest) it may trail: it must collapse
    (fall below half its first window) in the same window as bf16 or the next, and match bf16 in every other window
    (the one before the collapse and the collapse itself are excused)."""
    windows = list(enumerate(zip(bf16, fp8)))
    problems = []
    if scaling == "delayed":
        collapsed = [next((i for i, x in enumerate(curve) if x < 0.5 * curve[0]), len(curve)) for curve in (bf16, fp8)]
        if collapsed[1] - collapsed[0] not in (0, 1):
            problems.append(f"FP8 collapsed in window {collapsed[1]}, bf16 in {collapsed[0]}")
        windows = [w for w in windows if not min(collapsed) - 1 <= w[0] <= max(collapsed)]
    problems += [f"window {i * WINDOW}-{(i + 1) * WINDOW}: bf16 {a:.3f}, fp8 {b:.3f}"
                 for i, (a, b) in windows if abs(a - b) > 0.15 * a + 0.05]
    return problems


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a CUDA GPU with FP8 (compute capability 8.9+)")
@pytest.mark.parametrize("backend,scaling", [("torchao", None), ("te", "current"), ("te", "delayed")])
def test_fp8_loss_tracks_bf16(backend, scaling):
    if importlib.util.find_spec(BACKEND_MODULES[backend]) is None:
        pytest.skip(f"{BACKEND_MODULES[backend]} is not installed")
    bf16, fp8 = window_means(copy_task_curve(None)), window_means(copy_task_curve(backend, scaling or "delayed"))
    print(f"\n25-step mean losses, bf16: {[round(x, 3) for x in bf16]}\n{backend} {scaling or ''} fp8: "
          f"{[round(x, 3) for x in fp8]}")
    assert bf16[-1] < 0.5 * bf16[0], "the bf16 run itself did not learn the copy task"
    assert tracking_problems(bf16, fp8, scaling) == []


# ---- online RL on the GPU ---------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class RewardDevices(pl.Callback):
    """Records, at every batch, the device types of the bt: and genrm: reward models' parameters."""

    def __init__(self):
        self.seen: dict[str, set[str]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name in ("bt", "genrm"):
            model = pl_module.rollouts.rewards.sources[name].model
            self.seen.setdefault(name, set()).update(p.device.type for p in model.parameters())


@pytest.mark.slow
@needs_cuda
def test_online_rl_learns_on_the_gpu_with_its_reward_models_there(tiny_model_dir, tmp_path):
    """--use-gpu --precision bf16-true: the toy reward climbs as on the CPU; a bt: reward model and a genrm: verifier
    (weight 0: scored and logged, not trained on) sit on the GPU with the policy."""
    from test_online_rl import logged, toy_args

    import train
    from config import resolve

    devices = RewardDevices()
    cfg = resolve(toy_args(tiny_model_dir, tmp_path, "cuda", "--max-steps", "30", "--max-epochs", "100", "--use-gpu",
                           "--precision", "bf16-true", "--reward", f"bt:{tiny_model_dir}", "--reward",
                           f"genrm:{tiny_model_dir}", "--reward-weights", "1,0,0", "--verifier-k-min", "1",
                           "--verifier-k-max", "2", "--verifier-max-new-tokens", "8"))[0]
    run_dir = train.run(cfg, callbacks=[devices])["run_dir"]
    reward = logged(Path(run_dir), "train/reward")
    assert len(reward) == 30 and sum(reward[-5:]) / 5 > 0.3, reward
    assert devices.seen == {"bt": {"cuda"}, "genrm": {"cuda"}}
    assert len(logged(Path(run_dir), "train/reward_genrm")) == 30


@pytest.mark.slow
@needs_cuda
def test_a_resumed_gpu_run_reuses_its_kept_rollout_on_the_gpu(tiny_model_dir, tmp_path):
    """--updates-per-rollout 2 on the GPU: the run crashes after step 1 and resumes from step 0's checkpoint, which
    holds the rollout drawn at step 0 (saved on the CPU). Step 1 reuses it on the GPU; losses and rollout files
    match an uninterrupted run."""
    from test_online_rl import same_rollout_files, whole_and_resumed

    base = ["--max-steps", "4", "--max-epochs", "100", "--checkpoint-every-n-steps", "1", "--use-gpu",
            "--updates-per-rollout", "2"]
    whole, first, second = whole_and_resumed(tiny_model_dir, tmp_path, base, crash_at=2)
    assert len(whole.losses) == 4 and len(first.losses) == 2 and len(second.losses) == 3
    torch.testing.assert_close(torch.tensor(first.losses[:1] + second.losses), torch.tensor(whole.losses),
                               rtol=1e-4, atol=1e-6)
    same_rollout_files(tmp_path, (0, 2))


@needs_cuda
def test_sampling_on_the_gpu_draws_each_token_with_its_probability():
    """The inverse-CDF draw on CUDA (float64 cumulative sums and searchsorted there, the generator on the GPU): the
    CPU test's draws (``assert_draws_follow_their_probabilities``), and top-p 0.7 keeps the first two tokens."""
    from test_online_rl import assert_draws_follow_their_probabilities

    from sampling import sample_tokens

    probs = assert_draws_follow_their_probabilities("cuda")
    logits = probs.cuda().log().repeat(200_000, 1)
    kept = sample_tokens(logits, 1.0, 0.7, torch.Generator("cuda").manual_seed(2))
    assert set(kept.tolist()) == {0, 1}
    assert (kept == 0).double().mean().item() == pytest.approx(0.5 / 0.8, abs=0.01)


@needs_cuda
def test_cuda_graph_decoding_gives_the_dynamic_paths_answers(tiny_model_dir, char_tokenizer):
    """On the GPU the static-cache decoding step is captured as a CUDA graph and replayed; greedy and sampled answers
    (rows ending at different tokens) are the dynamic path's, and the graph did run."""
    from models import load_causal_lm
    from sampling import PrefixSampler

    model = load_causal_lm(str(tiny_model_dir)).cuda()
    prompts = [char_tokenizer(text)["input_ids"] for text in ("ab", "hello", "xyz")]
    stop = {char_tokenizer.convert_tokens_to_ids(ch) for ch in "aeiou"}
    for temperature in (0.0, 1.0):
        answers = {}
        for static in (False, True):
            sampler = PrefixSampler(model, prompts, char_tokenizer.pad_token_id, temperature=temperature, seed=3,
                                    static_cache=static)
            groups = sampler.sample([2, 0, 1], 4, stop_ids=stop, max_new_tokens=12)
            answers[static] = [[(a.tokens, a.finish) for a in g] for g in groups]
            assert sampler.graphed == static
        assert answers[True] == answers[False]


@needs_cuda
def test_cuda_graph_rationales_are_the_dynamic_paths(tiny_model_dir):
    """The verifier's rationales decoded as a CUDA graph: the same rationales and verdicts, and the graph did run."""
    from extension.verifier import RationaleSampler, verification_prompt_ids
    from models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(str(tiny_model_dir)).cuda(), load_tokenizer(str(tiny_model_dir))
    prompts = [verification_prompt_ids(tokenizer, "What is 7 * 3?", "7 * 3 = 21.\n#### 21"),
               verification_prompt_ids(tokenizer, "What is 9 - 4?", "9 - 4 = 6.\n#### 6")]
    for temperature in (0.0, 1.0):
        runs = {}
        for static in (False, True):
            sampler = RationaleSampler(model, tokenizer, prompts, max_new_tokens=10, temperature=temperature, seed=3,
                                       static_cache=static)
            sampler.stop_ids = set(range(0, model.config.vocab_size, 4))  # rows end at different steps
            results = sampler([0, 1], 4)
            runs[static] = (sampler.last_generated, [[p for p, _, _ in row] for row in results])
            assert sampler.graphed == static
        assert runs[True][0] == runs[False][0]
        for got, want in zip(runs[True][1], runs[False][1], strict=True):
            assert got == pytest.approx(want, rel=1e-3, abs=1e-5)


class FP8Layers(pl.Callback):
    """Counts, at the start of training, the policy's Transformer Engine layers."""

    count = 0

    def on_train_start(self, trainer, pl_module):
        self.count = sum(type(m).__module__.startswith("transformer_engine") for m in pl_module.model.modules())


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FP8_GPU or importlib.util.find_spec("transformer_engine") is None,
                    reason="needs a CUDA GPU with FP8 and Transformer Engine")
def test_online_rl_learns_under_transformer_engine_fp8(tiny_model_dir, tmp_path):
    """--precision transformer-engine --fp8-recipe current: the policy's linear layers run in FP8 in the training
    passes (answer batches padded to a width of a multiple of 8), sampling runs them outside the FP8 context, and
    the toy reward climbs as under bf16."""
    from test_online_rl import logged, toy_args

    import train
    from config import resolve

    layers = FP8Layers()
    cfg = resolve(toy_args(tiny_model_dir, tmp_path, "fp8", "--max-steps", "30", "--max-epochs", "100", "--use-gpu",
                           "--precision", "transformer-engine", "--fp8-recipe", "current"))[0]
    run_dir = train.run(cfg, callbacks=[layers])["run_dir"]
    reward = logged(Path(run_dir), "train/reward")
    assert layers.count == 2 * 7  # 2 decoder layers of 7 linear layers each; the output head stays in bf16
    assert len(reward) == 30 and sum(reward[-5:]) / 5 > 0.3, reward
