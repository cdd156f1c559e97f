"""Online RL (--training-type rloo / grpo): reward sources and how they combine (scripted, no model), the shared-prefix
sampler, the policy-gradient loss's gradient against a hand-derived REINFORCE gradient on a scripted batch, KL 0
when the policy is the reference, the config's per-type defaults and refusals; and, marked slow, a toy task whose
reward climbs far above chance, a resume that reproduces the rollouts and losses of an uninterrupted run, and a Ray
run with 2 CPU workers. The estimators themselves are checked by hand in test_rl_losses.py."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import Recorder, write_jsonl

import online_rl
import rewards
import train
from config import ConfigError, resolve
from losses.logprobs import token_logprobs
from online_rl import Rollout, answer_batch, rl_objective_loss
from rewards import RewardError, Rewards, RolloutBatch

TOY_REWARD = "python:test_online_rl:sevens"


def sevens(prompts, completions, **columns) -> list[float]:
    """The toy task's reward: the share of the answer's characters that are '7' (chance: about 1 in 100)."""
    return [sum(ch == "7" for ch in text) / max(1, len(text)) for text in completions]


def batch_of(completions: list[str], references: list[str] | None = None, **columns) -> RolloutBatch:
    n = len(completions)
    return RolloutBatch([[{"role": "user", "content": f"q{i}"}] for i in range(n)], completions,
                        references or [""] * n, {k: list(v) for k, v in columns.items()})


# ---- rewards: combined as documented ----------------------------------------------------------------------

def test_sources_combine_as_the_weighted_sum_of_the_values_given():
    """r = sum of w_s * r_s over the sources that gave a value; none given -> 0.
    a: [1, None, 0.5, None], b: [0.2, 0.4, None, None], weights 1 and 0.5:
    r = [1 + 0.1, 0.2, 0.5, 0] = [1.1, 0.2, 0.5, 0.0]."""
    combined, values = Rewards({"a": lambda b: [1, None, 0.5, None], "b": lambda b: [0.2, 0.4, None, None]},
                               [1.0, 0.5])(batch_of(["w", "x", "y", "z"]))
    assert combined == pytest.approx([1.1, 0.2, 0.5, 0.0])
    assert values == {"a": [1.0, None, 0.5, None], "b": [0.2, 0.4, None, None]}


def test_a_source_of_weight_0_is_logged_but_does_not_train():
    """The label-free config's watch on math: weights 1 (verifier) and 0 (math). verifier [0.9, 0.2], math [0, 1]:
    r = [0.9, 0.2], the verifier's alone, while math's values still come back for the logs."""
    combined, values = Rewards({"genrm": lambda b: [0.9, 0.2], "math": lambda b: [0.0, 1.0]},
                               rewards.parse_weights("1,0", 2))(batch_of(["p", "q"]))
    assert combined == pytest.approx([0.9, 0.2])
    assert values["math"] == [0.0, 1.0]


def test_a_gated_source_is_asked_only_where_the_gate_did_not_say_right():
    """genrm gated by math: asked about the answers math scored 0 or None (1, 2, 3), never about answer 0."""
    asked = []

    def verifier(batch):
        asked.extend(batch.completions)
        return [0.25] * len(batch.completions)

    combined, values = Rewards({"genrm": verifier, "math": lambda b: [1.0, 0.0, None, 0.0]}, [0.5, 1.0],
                               gates={"genrm": "math"})(batch_of(["a", "b", "c", "d"]))
    assert asked == ["b", "c", "d"]
    assert values["genrm"] == [None, 0.25, 0.25, 0.25]
    assert combined == pytest.approx([1.0, 0.125, 0.125, 0.125])  # 1*math + 0.5*genrm where given


def test_a_source_returning_a_non_number_or_the_wrong_count_is_an_error_naming_it():
    with pytest.raises(RewardError, match="source a returned 'x' for completion 1"):
        Rewards({"a": lambda b: [1.0, "x"]}, [1.0])(batch_of(["p", "q"]))
    with pytest.raises(RewardError, match="source a returned 1 values for 2"):
        Rewards({"a": lambda b: [1.0]}, [1.0])(batch_of(["p", "q"]))
    with pytest.raises(RewardError, match="returned nan"):
        Rewards({"a": lambda b: [float("nan"), 1.0]}, [1.0])(batch_of(["p", "q"]))


def test_math_and_format_rewards_read_the_final_answer():
    refs = ["2 + 2 = 4\n#### 4", "#### 4", "no final answer here", "#### 10"]
    batch = batch_of(["So 4.\n#### 4", "#### 5", "#### 4", "The answer is \\boxed{10}"], refs)
    assert rewards.math_reward(batch) == [1.0, 0.0, None, 1.0]
    assert rewards.format_reward(batch) == [1.0, 1.0, 1.0, 1.0]
    assert rewards.format_reward(batch_of(["four", "#### ", "it is 4"])) == [0.0, 0.0, 0.0]


def test_a_python_source_gets_prompts_completions_references_and_columns():
    source = rewards.python_reward("test_online_rl:echo_columns")
    out = source(batch_of(["a", "bb"], ["r1", "r2"], level=[1, 3]))
    assert out == [1 + 1 + 2, 2 + 3 + 2]


def echo_columns(prompts, completions, reference, level):
    return [len(c) + lv + len(r) for c, lv, r in zip(completions, level, reference)]


@pytest.mark.parametrize(("specs", "weights", "message"), [
    ([], None, "at least one --reward"),
    (["mathh"], None, "unknown source 'mathh'"),
    (["bt"], None, "give the model folder, as bt:PATH"),
    (["math:x"], None, "math takes no argument"),
    (["math", "math"], None, "names a source twice"),
    (["math", "format"], "1", "1 weights for 2"),
    (["math"], "one", "comma-separated numbers"),
    (["math", "format"], "0,0", "all weights are 0"),
])
def test_bad_reward_settings_are_refused_naming_the_flag(specs, weights, message):
    assert any(message in p for p in rewards.spec_problems(specs, weights))


def test_a_python_source_that_cannot_be_loaded_names_the_spec():
    with pytest.raises(RewardError, match="--reward python:no_such_module:f: cannot load f"):
        rewards.python_reward("no_such_module:f")



def test_reward_models_and_verifiers_load_onto_the_device_they_are_given(tiny_model_dir, tmp_path):
    """A GPU run passes the policy's device: its bt: reward model and genrm: verifier must sit there (``meta`` stands
    in for the GPU here), and without a device they stay on the CPU."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(genrm_gate=False)
    specs = [f"bt:{tiny_model_dir}", f"genrm:{tiny_model_dir}"]
    placed = rewards.build(specs, None, cfg, tmp_path, device="meta")
    default = rewards.build(specs, None, cfg, tmp_path)
    for built, device in [(placed, "meta"), (default, "cpu")]:
        for name in ("bt", "genrm"):
            assert {p.device.type for p in built.sources[name].model.parameters()} == {device}, (name, device)

# ---- the sampler ------------------------------------------------------------------------------------------

def test_top_p_keeps_the_smallest_set_reaching_p():
    """probs [0.5, 0.3, 0.15, 0.05]: top_p 0.7 keeps {0, 1} (0.5 < 0.7 <= 0.8), so token 2 and 3 never come; top_p
    near 0 keeps only the most likely token (greedy)."""
    from sampling import sample_tokens

    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(4000, 1)
    drawn = sample_tokens(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1}
    assert (drawn == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)
    assert set(sample_tokens(logits, 1.0, 1e-6, torch.Generator().manual_seed(0)).tolist()) == {0}


def assert_draws_follow_their_probabilities(device: str) -> torch.Tensor:
    """Inverse-CDF sampling on ``device``: over 200,000 rows of probs [0.5, 0.3, 0.15, 0.05, 0], each token comes at
    its probability (within 4 standard errors) and the token of probability 0 never; a fixed generator of that device
    gives the same draws. Returns the probs (on the CPU)."""
    from sampling import sample_tokens

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0], device=device)
    logits = probs.log().repeat(200_000, 1)  # log 0 = -inf
    drawn = sample_tokens(logits, 1.0, 1.0, torch.Generator(device).manual_seed(1))
    assert drawn.device == probs.device
    probs = probs.cpu()
    shares = torch.bincount(drawn, minlength=5).double().cpu() / len(drawn)
    tolerance = 4 * (probs * (1 - probs) / len(drawn)).sqrt().double()
    assert ((shares - probs.double()).abs() <= tolerance).all(), shares
    assert shares[4] == 0
    assert torch.equal(drawn, sample_tokens(logits, 1.0, 1.0, torch.Generator(device).manual_seed(1)))
    return probs


def test_sampling_draws_each_token_with_its_probability():
    """On the CPU (``assert_draws_follow_their_probabilities``), and at temperature 2 too."""
    from sampling import sample_tokens

    probs = assert_draws_follow_their_probabilities("cpu")
    # temperature 2 flattens [0.5, 0.3, 0.15, 0.05] to sqrt(p) / sum(sqrt(p))
    flat = probs[:4].sqrt() / probs[:4].sqrt().sum()
    drawn = sample_tokens(probs[:4].log().repeat(200_000, 1), 2.0, 1.0, torch.Generator().manual_seed(2))
    shares = torch.bincount(drawn, minlength=4).double() / len(drawn)
    assert ((shares - flat.double()).abs() <= 4 * (flat * (1 - flat) / len(drawn)).sqrt().double()).all(), shares


def test_the_growing_cache_holds_what_concatenation_holds():
    """``sampling.growing_cache``: a prefill of 5 positions, 70 one-token steps (past the 64 positions of room, so the
    buffers grow) and a row selection in between give exactly the keys and values of transformers' DynamicCache."""
    from transformers import DynamicCache

    from sampling import growing_cache

    grown, concatenated = growing_cache(), DynamicCache()
    rng = torch.Generator().manual_seed(0)
    states = [(torch.randn(4, 2, 5, 8, generator=rng), torch.randn(4, 2, 5, 8, generator=rng))]
    for step in range(70):
        rows = 4 if step + 1 < 30 else 2  # states[30] is the first after the selection
        states.append((torch.randn(rows, 2, 1, 8, generator=rng), torch.randn(rows, 2, 1, 8, generator=rng)))
    for step, (keys, values) in enumerate(states):
        if step == 30:  # rows 1 and 3 stay
            for cache in (grown, concatenated):
                cache.batch_select_indices(torch.tensor([1, 3]))
        for layer in (0, 1):
            got = grown.update(keys + layer, values - layer, layer)
            want = concatenated.update(keys + layer, values - layer, layer)
            assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert grown.get_seq_length() == concatenated.get_seq_length() == 75
    assert grown.layers[0].buffers[0].shape[-2] > 64 + 5  # it grew past its first buffer


def test_the_samplers_own_output_head_gives_the_models_logits(tiny_model_dir):
    """On the CPU the sampler runs the decoder, then ``head.weight @ hidden.T``: the model's logits up to float
    rounding. A head with a bias, or a config that transforms the logits, keeps the model's own forward pass."""
    from models import load_causal_lm
    from sampling import PrefixSampler, plain_head

    model = load_causal_lm(str(tiny_model_dir)).eval()
    sampler = PrefixSampler(model, [[5, 6, 7], [8, 9]], pad_id=0)
    assert sampler.cpu_head is model.get_output_embeddings()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        torch.testing.assert_close(sampler._last_logits(input_ids=ids), model(input_ids=ids).logits[:, -1],
                                   rtol=1e-5, atol=1e-5)
    model.config.final_logit_softcapping = 30.0
    assert plain_head(model) is None
    del model.config.final_logit_softcapping
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    assert plain_head(model) is None


def test_the_sampler_bench_counts_what_it_sampled(tiny_model_dir):
    """bench/sampler_decode.py on the tiny model: one line per P, P * K rows, at most K * budget tokens per prompt."""
    from bench import sampler_decode

    lines = sampler_decode.main(["--model-name", str(tiny_model_dir), "--prompts", "1,3", "--num-generations", "2",
                                 "--max-new-tokens", "3"])
    assert [(line["prompts"], line["rows"]) for line in lines] == [(1, 2), (3, 6)]
    assert all(0 < line["tokens"] <= line["rows"] * 3 and line["tokens_per_s"] > 0 for line in lines)


def test_the_int8_sampler_bench_quantises_what_it_says_and_measures_the_gap(tiny_model_dir):
    """bench/int8_sampler.py on the tiny model: int8-decoder keeps the fp32 output head (the sampler's fast head path)
    and quantises every decoder linear layer; the log-prob gap of a model against itself is 0; each variant reports."""
    import torch

    from bench import int8_sampler
    from models import load_causal_lm
    from sampling import plain_head

    model = load_causal_lm(str(tiny_model_dir)).eval()
    decoder_only = int8_sampler.quantized(model, "int8-decoder")
    assert plain_head(decoder_only) is not None and not any(
        type(m) is torch.nn.Linear for m in decoder_only.get_decoder().modules())
    assert plain_head(int8_sampler.quantized(model, "int8-all")) is None
    assert int8_sampler.quantized(model, "fp32") is model and type(model.get_decoder().layers[0].mlp.up_proj) is torch.nn.Linear
    prompts, answers = [[5, 6, 7], [8, 9]], [[10, 11], [12], [13, 14, 15], [16]]
    same = int8_sampler.answer_logprobs(model, prompts, answers, 2, 0)
    assert same.shape == (7,) and torch.equal(same - int8_sampler.answer_logprobs(model, prompts, answers, 2, 0),
                                              torch.zeros(7))
    lines = int8_sampler.main(["--model-name", str(tiny_model_dir), "--prompts", "2", "--num-generations", "2",
                               "--max-new-tokens", "3"])
    assert [line["variant"] for line in lines] == ["fp32", "int8-all", "int8-decoder"]
    assert all(0 < line["tokens"] <= 2 * 2 * 3 and 0 <= line["right"] <= 1 for line in lines)
    assert all(line["mean_abs_logprob_gap"] >= 0 and 0 <= line["ratio_outside_half_to_2"] <= 1 for line in lines[1:])


def test_answers_stop_at_a_stop_token_or_the_budget_and_share_one_prefill(tiny_model_dir, char_tokenizer):
    from models import load_causal_lm
    from sampling import PrefixSampler

    model = load_causal_lm(str(tiny_model_dir))
    prompts = [char_tokenizer("ab")["input_ids"], char_tokenizer("hello")["input_ids"]]
    sampler = PrefixSampler(model, prompts, char_tokenizer.pad_token_id, temperature=1.0, seed=0)
    stop = {char_tokenizer.convert_tokens_to_ids(ch) for ch in "aeiou"}  # a random model draws these often enough
    groups = sampler.sample([0, 1], 3, stop_ids=stop, max_new_tokens=5)
    assert sampler.prompt_tokens_run == 1 + 4  # each prompt once, without its last token
    finishes = []
    for group in groups:
        assert len(group) == 3
        for answer in group:
            finishes.append(answer.finish)
            if answer.finish == "stop":  # the stop token is kept, as the last
                assert answer.tokens[-1] in stop and not stop & set(answer.tokens[:-1]) and len(answer.tokens) <= 5
            else:
                assert answer.finish == "length" and len(answer.tokens) == 5 and not stop & set(answer.tokens)
            assert answer.entropy > 0
    # Greedy from a shared prefill gives what a prefill per sample gives.
    shared = PrefixSampler(model, prompts, char_tokenizer.pad_token_id, temperature=0.0)
    naive = PrefixSampler(model, prompts, char_tokenizer.pad_token_id, temperature=0.0, share_prefix=False)
    a = shared.sample([0, 1], 2, set(), 6)
    b = naive.sample([0, 1], 2, set(), 6)
    assert [[x.tokens for x in g] for g in a] == [[x.tokens for x in g] for g in b]
    assert all(x.finish == "length" and len(x.tokens) == 6 for g in a for x in g)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_static_cache_decoding_gives_the_dynamic_paths_answers(tiny_model_dir, char_tokenizer, share_prefix):
    """The static-cache path (the one a GPU replays as a CUDA graph) keeps finished rows in the batch; the answers,
    their ends and entropies, and the random stream after them, must be the dynamic path's, which drops them."""
    from models import load_causal_lm
    from sampling import PrefixSampler

    model = load_causal_lm(str(tiny_model_dir))
    prompts = [char_tokenizer(text)["input_ids"] for text in ("ab", "hello", "xyz")]  # left padding differs per row
    stop = {char_tokenizer.convert_tokens_to_ids(ch) for ch in "aeiou"}
    for temperature in (1.0, 0.0):
        runs = []
        for static in (False, True):
            sampler = PrefixSampler(model, prompts, char_tokenizer.pad_token_id, temperature=temperature, seed=3,
                                    share_prefix=share_prefix, static_cache=static)
            groups = sampler.sample([2, 0, 1], 4, stop_ids=stop, max_new_tokens=9)
            runs.append(([[(a.tokens, a.finish) for a in g] for g in groups],
                         [a.entropy for g in groups for a in g], sampler.generator.get_state()))
            assert not sampler.graphed  # no CUDA graph on the CPU
        (dynamic, h_dynamic, state_dynamic), (static, h_static, state_static) = runs
        assert static == dynamic
        assert h_static == pytest.approx(h_dynamic, rel=1e-4, abs=1e-5)
        assert torch.equal(state_static, state_dynamic)
        if temperature > 0:  # rows ended at different times, so the static path kept finished rows
            assert {finish for g in dynamic for _, finish in g} == {"stop", "length"}
            assert len({len(tokens) for g in dynamic for tokens, _ in g}) > 2


def test_answer_batch_labels_exactly_the_answer_tokens():
    """Prompts [5, 6] and [7]; K = 2 answers each: [1, 2], [3], [4], [8, 9, 10]."""
    ids, attention, labels = answer_batch([[5, 6], [7]], [[1, 2], [3], [4], [8, 9, 10]], 2, pad_id=0)
    assert ids.tolist() == [[5, 6, 1, 2], [5, 6, 3, 0], [7, 4, 0, 0], [7, 8, 9, 10]]
    assert attention.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert labels.tolist() == [[-100, -100, 1, 2], [-100, -100, 3, -100], [-100, 4, -100, -100], [-100, 8, 9, 10]]


def test_windows_repeat_for_several_updates_per_rollout():
    """8 rows, batch 2, accumulation 2: windows (b0 b1) (b2 b3); with repeat 2 each window comes twice in a row."""
    from collate_functions import LengthGroupedBatchSampler

    once = LengthGroupedBatchSampler([1] * 8, [1] * 8, batch_size=2, accumulate=2, seed=0)
    twice = LengthGroupedBatchSampler([1] * 8, [1] * 8, batch_size=2, accumulate=2, seed=0, repeat=2)
    b = [plan.indices for plan in once]
    assert [plan.indices for plan in twice] == [b[0], b[1], b[0], b[1], b[2], b[3], b[2], b[3]]
    assert len(twice) == 8
    short = LengthGroupedBatchSampler([1] * 6, [1] * 6, batch_size=2, accumulate=2, seed=0, repeat=2)
    assert len(list(short)) == len(short) == 4  # the last, short window (one batch) is left out


# ---- the loss: gradient against REINFORCE by hand ---------------------------------------------------------

def scripted_rollout(tokenizer, answers: list[str], rewards_: list[list[float]], k: int = 2, shared: bool = False
                     ) -> Rollout:
    """Two prompts of different lengths, K = ``k`` answers each; ``shared``: the loss runs each prompt once
    (``prompt_lengths`` set, as ``Rollouts`` does under --share-prompt-pass)."""
    prompts = [tokenizer("Q: 1+1?")["input_ids"], tokenizer("Q: 2?")["input_ids"]]
    tokens = [tokenizer(a)["input_ids"] for a in answers]
    ids, attention, labels = answer_batch(prompts, tokens, k, tokenizer.pad_token_id)
    n = len(answers)
    return Rollout(ids, attention, labels, torch.tensor(rewards_), {"toy": [0.0] * n}, answers,
                   torch.zeros(n, dtype=torch.bool), torch.zeros(n), torch.tensor([len(t) for t in tokens]),
                   prompt_lengths=torch.tensor([len(prompts[i // k]) for i in range(n)]) if shared else None)


def naive_sequence_logps(model, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """sum_t log pi(y_t | prefix) of each answer, from the full logits (an independent path from token_logprobs), at
    ``temperature``: log softmax(logits / temperature)."""
    logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1] / temperature, -1)
    targets = rollout.input_ids[:, 1:]
    picked = logp.gather(-1, targets[..., None]).squeeze(-1)
    return (picked * (rollout.labels[:, 1:] != -100)).sum(-1)


def loss_of(model, rollout: Rollout, ref=None, **kw) -> tuple[torch.Tensor, dict]:
    args = {"estimator": "rloo", "kl_coef": 0.0, "kl_estimator": "k1", "kl_placement": "reward",
            "normalization": "sequence", "clip_eps": 0.2, "truncated": "reward", "max_new_tokens": 8, **kw}
    loss_sum, units, metrics = rl_objective_loss(model, {}, ref, lambda m, b: rollout, **args)
    return loss_sum / units, metrics


def grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("shared", [False, True], ids=["whole", "shared-prompt"])
@pytest.mark.parametrize("normalization", ["sequence", "token", "constant"])
def test_policy_gradient_equals_reinforce_by_hand(tiny_model_dir, char_tokenizer, normalization, shared):
    """P = 2 prompts, K = 2 answers. Rewards [[1, 0], [0.5, 0.5]]; RLOO by hand: A = r_i - r_other =
    [1, -1, 0, 0]. REINFORCE: grad of -(1/4) sum_i A_i log pi(y_i) (sequence), of -(1/N_tokens) sum_i A_i log pi(y_i)
    (token: one micro-batch), of -(1/(4 * 8)) sum_i A_i log pi(y_i) (constant, T_max = 8). The second prompt's equal
    rewards give no gradient and are counted. The same with each prompt run once (``shared``)."""
    from models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    answers = ["2", "3!", "yes", "no"]
    rollout = scripted_rollout(char_tokenizer, answers, [[1.0, 0.0], [0.5, 0.5]], shared=shared)
    loss, metrics = loss_of(model, rollout, normalization=normalization)
    ours = grads(model, loss)
    assert rollout.advantages.tolist() == [1.0, -1.0, 0.0, 0.0]
    assert metrics["zero_gradient_share"].item() == 0.5
    a = torch.tensor([1.0, -1.0, 0.0, 0.0])
    scale = {"sequence": 4, "token": sum(len(x) for x in answers), "constant": 4 * 8}[normalization]
    by_hand = grads(model, -(a * naive_sequence_logps(model, rollout)).sum() / scale)
    assert ours.keys() == by_hand.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], by_hand[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("shared", [False, True], ids=["whole", "shared-prompt"])
def test_the_loss_reads_the_policy_at_the_sampling_temperature(tiny_model_dir, char_tokenizer, shared):
    """Answers sampled at --temperature 0.5 are samples of softmax(logits / 0.5): by default the loss differentiates
    that policy, -(1/4) sum_i A_i log softmax(logits / 0.5)(y_i) with the RLOO advantages [1, -1, -1, 1];
    --loss-temperature 1 reads the untempered policy instead, and the two gradients differ."""
    from models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    a = torch.tensor([1.0, -1.0, -1.0, 1.0])
    for loss_temperature, tau, other_tau in [(None, 0.5, 1.0), (1.0, 1.0, 0.5)]:
        rollout = scripted_rollout(char_tokenizer, ["2", "3!", "yes", "no"], [[1.0, 0.0], [0.0, 1.0]], shared=shared)
        loss, _ = loss_of(model, rollout, temperature=0.5, loss_temperature=loss_temperature)
        ours = grads(model, loss)
        by_hand = grads(model, -(a * naive_sequence_logps(model, rollout, tau)).sum() / 4)
        other = grads(model, -(a * naive_sequence_logps(model, rollout, other_tau)).sum() / 4)
        assert ours.keys() == by_hand.keys()
        for name in ours:
            torch.testing.assert_close(ours[name], by_hand[name], rtol=1e-4, atol=1e-7, msg=name)
        assert any(not torch.allclose(ours[name], other[name], rtol=1e-3, atol=1e-6) for name in ours)


def test_the_loss_temperature_is_the_sampling_temperature_unless_set():
    assert online_rl.logprob_temperature(0.7, None) == 0.7
    assert online_rl.logprob_temperature(0.0, None) == 1.0  # greedy answers: the untempered policy
    assert online_rl.logprob_temperature(0.7, 1.0) == 1.0


def test_tempered_logprobs_are_the_same_through_the_head_and_the_full_forward(tiny_model_dir):
    """token_logprobs at temperature 0.7 through the output head alone and through the model's forward pass (taken
    for models that transform their logits) both give log softmax(logits / 0.7) at the labels."""
    from models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    ids = torch.tensor([[5, 9, 3, 7, 2, 8], [4, 6, 1, 1, 9, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, 3, 7, 2, 8], [-100, -100, -100, 1, 9, -100]])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        expected = torch.log_softmax(logits / 0.7, -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * (labels[:, 1:] != -100)
        head, mask = token_logprobs(model, ids, attention, labels, temperature=0.7)
        model.config.logit_scale = 2.0  # marks the logits as transformed: token_logprobs takes the full forward pass
        full, _ = token_logprobs(model, ids, attention, labels, temperature=0.7)
    assert mask.sum() == 6
    torch.testing.assert_close(head, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-6)


def test_each_prompt_run_once_gives_each_sequences_logprobs_and_gradients(tiny_model_dir):
    """3 prompts of 3, 6 and 4 tokens; answers of 1, 4, 2 and 3 tokens to prompts 1, 0, 1, 2 (prompt 0 has one answer,
    prompt 1 two, out of order). Each prompt runs once, its cache copied to its answers; against each prompt + answer
    run alone, unpadded, through the full forward pass: the same log-probs, and the same gradient of
    sum_i w_i log pi(answer token) for random weights w."""
    from losses.logprobs import shared_prompt_logprobs
    from models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 90, (n,), generator=g).tolist() for n in (3, 6, 4)]
    answers = [torch.randint(4, 90, (n,), generator=g).tolist() for n in (1, 4, 2, 3)]
    group = torch.tensor([1, 0, 1, 2])
    prompt_ids = torch.tensor([p + [0] * (6 - len(p)) for p in prompts])
    prompt_mask = torch.tensor([[1] * len(p) + [0] * (6 - len(p)) for p in prompts])
    answer_ids = torch.tensor([a + [0] * (4 - len(a)) for a in answers])
    answer_mask = torch.tensor([[1] * len(a) + [0] * (4 - len(a)) for a in answers])
    weights = torch.rand(4, 4, generator=g) * answer_mask

    logps = shared_prompt_logprobs(model, prompt_ids, prompt_mask, answer_ids, answer_mask, group)
    ours = grads(model, (weights * logps).sum())
    naive = torch.zeros(4, 4)
    for i, answer in enumerate(answers):
        prompt = prompts[group[i]]
        ids = torch.tensor([prompt + answer])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)  # (T, V)
        for j, token in enumerate(answer):
            naive[i, j] = logp[len(prompt) - 1 + j, token]
    by_hand = grads(model, (weights * naive).sum())
    torch.testing.assert_close(logps.detach(), naive.detach(), rtol=1e-5, atol=1e-5)
    assert (logps[answer_mask == 0] == 0).all()
    assert ours.keys() == by_hand.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], by_hand[name], rtol=1e-4, atol=1e-6, msg=name)


def test_answer_logprobs_of_rows_of_several_prompts_match_each_row_run_whole(tiny_model_dir, char_tokenizer):
    """K = 3 answers to 3 prompts of different lengths; rows 1, 3, 4 and 8 train (prompt 0 with one answer, prompt 1
    with two, prompt 2 with one of length 1), narrower than the rollout. Each prompt run once gives the log-probs,
    mask and gradient of each row run whole, in the rollout's (n, L-1) layout."""
    from models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    prompts = [char_tokenizer(q)["input_ids"] for q in ("Q: 1+1?", "Q: 2?", "Q: what is 3+4?")]
    answers = ["2", "two!", "3", "no", "yes", "7", "a longer answer", "77", "7"]
    tokens = [char_tokenizer(a)["input_ids"] for a in answers]
    ids, attention, labels = answer_batch(prompts, tokens, 3, char_tokenizer.pad_token_id)
    rollout = Rollout(ids, attention, labels, torch.zeros(3, 3), {}, answers, torch.zeros(9, dtype=torch.bool),
                      torch.zeros(9), torch.tensor([len(t) for t in tokens]),
                      prompt_lengths=torch.tensor([len(prompts[i // 3]) for i in range(9)]))
    rows = torch.tensor([1, 3, 4, 8])
    weights = torch.rand(4, ids.shape[1] - 1, generator=torch.Generator().manual_seed(0))
    shared, shared_mask = online_rl.answer_logprobs(model, rollout, rows, 3)
    shared_grads = grads(model, (weights * shared).sum())
    whole, whole_mask = online_rl.answer_logprobs(model, rollout, rows, 3, share=False)
    whole_grads = grads(model, (weights * whole).sum())
    assert shared.shape == whole.shape == (4, ids.shape[1] - 1)
    assert torch.equal(shared_mask, whole_mask) and torch.equal(shared_mask, labels[rows, 1:] != -100)
    torch.testing.assert_close(shared.detach(), whole.detach(), rtol=1e-5, atol=1e-5)
    assert (shared[~shared_mask] == 0).all()
    for name in whole_grads:
        torch.testing.assert_close(shared_grads[name], whole_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_only_models_read_exactly_share_the_prompt_pass(tiny_model_dir):
    """Full attention: any width. A sliding window counts the padding between prompt and answer as distance: exact
    only where it covers the width. Chunked attention and other layer kinds: never."""
    from losses.logprobs import shared_prompt_exact
    from models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    assert shared_prompt_exact(model) and shared_prompt_exact(model, 10_000)
    model.config.sliding_window = 64  # a Mistral-style window on every layer
    assert shared_prompt_exact(model, 64) and not shared_prompt_exact(model, 65) and not shared_prompt_exact(model)
    model.config.use_sliding_window = False  # Qwen2's switch: the window is not used
    assert shared_prompt_exact(model, 10_000)
    model.config.sliding_window, model.config.use_sliding_window = None, True
    model.config.layer_types = ["full_attention", "sliding_attention"]
    assert not shared_prompt_exact(model, 8)  # a sliding layer without a window size
    model.config.sliding_window = 16
    assert shared_prompt_exact(model, 16) and not shared_prompt_exact(model, 17)
    model.config.layer_types = ["full_attention", "linear_attention"]
    assert not shared_prompt_exact(model, 8)
    model.config.layer_types, model.config.attention_chunk_size = ["full_attention"] * 2, 8
    assert not shared_prompt_exact(model, 8)


def test_a_decoder_that_keeps_no_cache_is_a_clear_error(tiny_model_dir):
    """Activation checkpointing turns transformers' KV cache off in training: the shared pass would run the answers
    without their prompt, so it stops and names the flag instead."""
    from losses.logprobs import shared_prompt_logprobs
    from models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ones = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="--no-share-prompt-pass"):
        shared_prompt_logprobs(model, ones * 5, ones, ones * 6, ones, torch.tensor([0]))


def test_the_prompt_pass_is_shared_only_where_it_can_be(tiny_model_dir):
    """On by default for a plain decoder; off with --no-share-prompt-pass, under FSDP or DeepSpeed, with activation
    checkpointing or Transformer Engine FP8, and for a model the shared pass would not read exactly."""
    from types import SimpleNamespace

    from models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    plain = {"share_prompt_pass": True, "strategy": "auto", "activation_checkpointing": False, "precision": "32",
             "max_length": 256, "max_new_tokens": 96}
    assert online_rl.shares_prompt_pass(SimpleNamespace(**plain), model)
    for change in [{"share_prompt_pass": False}, {"strategy": "fsdp"}, {"strategy": "deepspeed"},
                   {"activation_checkpointing": True}, {"precision": "transformer-engine"}]:
        assert not online_rl.shares_prompt_pass(SimpleNamespace(**{**plain, **change}), model), change
    model.config.sliding_window = 256  # a window shorter than a prompt of --max-length plus its answer
    assert not online_rl.shares_prompt_pass(SimpleNamespace(**plain), model)


@pytest.mark.parametrize("shared", [False, True], ids=["whole", "shared-prompt"])
def test_kl_is_zero_when_the_policy_is_the_reference(tiny_model_dir, char_tokenizer, shared):
    """Reference = a copy of the policy: k1, k2 and k3 are 0 at every token, and the KL term changes neither the
    advantages (in the reward) nor the gradient (k3 in the loss: d/dtheta [(r - 1) - log r] = 0 at r = 1)."""
    from models import load_causal_lm

    model, ref = load_causal_lm(str(tiny_model_dir)), load_causal_lm(str(tiny_model_dir)).eval()
    plain_loss, _ = loss_of(model, scripted_rollout(char_tokenizer, ["2", "3", "4", "5"], [[1.0, 0.0], [0.0, 1.0]]))
    plain = grads(model, plain_loss)
    for estimator, placement in [("k1", "reward"), ("k2", "reward"), ("k3", "loss")]:
        rollout = scripted_rollout(char_tokenizer, ["2", "3", "4", "5"], [[1.0, 0.0], [0.0, 1.0]], shared=shared)
        loss, metrics = loss_of(model, rollout, ref, kl_coef=0.5, kl_estimator=estimator, kl_placement=placement)
        assert metrics["kl"].item() == pytest.approx(0.0, abs=1e-6)
        assert rollout.advantages.tolist() == [1.0, -1.0, -1.0, 1.0]
        for name, grad in grads(model, loss).items():
            torch.testing.assert_close(grad, plain[name], rtol=1e-4, atol=1e-7, msg=name)


def test_a_kl_penalty_in_the_reward_lowers_the_advantage_of_the_answer_that_drifted(tiny_model_dir, char_tokenizer):
    """A reference that differs: the k1 sum of each answer is subtracted from its reward before the baseline, so the
    advantages become RLOO of (r_i - beta * KL_i), worked out from the logged per-answer KL."""
    from models import load_causal_lm

    model, ref = load_causal_lm(str(tiny_model_dir)), load_causal_lm(str(tiny_model_dir)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(1)))
    rollout = scripted_rollout(char_tokenizer, ["2", "33", "4", "5"], [[1.0, 0.0], [0.0, 0.0]], shared=True)
    loss_of(model, rollout, ref, kl_coef=0.1, kl_estimator="k1", kl_placement="reward")
    kl = (naive_sequence_logps(model, rollout) - naive_sequence_logps(ref, rollout)).detach().view(2, 2)
    shaped = torch.tensor([[1.0, 0.0], [0.0, 0.0]]) - 0.1 * kl
    by_hand = torch.stack([shaped[:, 0] - shaped[:, 1], shaped[:, 1] - shaped[:, 0]], 1).reshape(-1)
    torch.testing.assert_close(rollout.advantages, by_hand, rtol=1e-4, atol=1e-6)


def test_masked_truncated_answers_add_no_gradient(tiny_model_dir, char_tokenizer):
    """--truncated-answers mask: answer 0 (truncated) drops out; the gradient is REINFORCE's over answers 1-3."""
    from models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    rollout = scripted_rollout(char_tokenizer, ["2", "3", "4", "5"], [[1.0, 0.0], [0.0, 1.0]])
    rollout.truncated = torch.tensor([True, False, False, False])
    loss, metrics = loss_of(model, rollout, truncated="mask")
    assert metrics["truncated_share"].item() == 0.25
    a = torch.tensor([0.0, -1.0, -1.0, 1.0])  # advantages unchanged, answer 0's tokens masked
    by_hand = grads(model, -(a * naive_sequence_logps(model, rollout)).sum() / 4)
    for name, grad in grads(model, loss).items():
        torch.testing.assert_close(grad, by_hand[name], rtol=1e-4, atol=1e-7, msg=name)


# ---- config -----------------------------------------------------------------------------------------------

def test_each_type_fills_its_own_defaults_and_flags_win(tmp_path):
    rloo, _ = resolve(["--training-type", "rloo", "--storage-path", str(tmp_path)])
    assert (rloo.advantage_estimator, rloo.kl_coef, rloo.kl_estimator, rloo.kl_placement, rloo.loss_normalization) == \
        ("rloo", 0.05, "k1", "reward", "sequence")
    grpo, _ = resolve(["--training-type", "grpo", "--storage-path", str(tmp_path)])
    assert (grpo.advantage_estimator, grpo.kl_coef, grpo.kl_estimator, grpo.kl_placement, grpo.loss_normalization) == \
        ("grpo", 0.0, "k3", "loss", "token")
    dr, _ = resolve(["--training-type", "grpo", "--advantage-estimator", "dr_grpo", "--reward", "math", "--reward",
                     "format", "--reward-weights", "1,0.2", "--storage-path", str(tmp_path)])
    assert dr.advantage_estimator == "dr_grpo" and dr.reward == ["math", "format"]
    from objectives import get_objective

    assert get_objective("rloo").needs_reference(rloo) and not get_objective("grpo").needs_reference(grpo)


def test_yaml_takes_a_list_of_rewards_or_one(tmp_path):
    for value, expected in [("[math, 'bt:runs/bt/final_model']", ["math", "bt:runs/bt/final_model"]),
                            ("format", ["format"])]:
        path = tmp_path / "rl.yaml"
        path.write_text(f"training_type: rloo\nreward: {value}\n")
        cfg, _ = resolve(["--config", str(path), "--storage-path", str(tmp_path)])
        assert cfg.reward == expected


@pytest.mark.parametrize(("flags", "message"), [
    (["--training-type", "rloo", "--num-generations", "1"], "--num-generations must be at least 2"),
    (["--training-type", "rloo", "--loss-temperature", "0"], "--loss-temperature must be above 0"),
    (["--training-type", "grpo", "--reward", "nope"], "unknown source 'nope'"),
    (["--training-type", "rloo", "--precompute-ref-logps"], "--precompute-ref-logps cannot work for online RL"),
    (["--training-type", "rloo", "--genrm-gate"], "--genrm-gate asks the verifier only"),
    (["--training-type", "sft", "--updates-per-rollout", "2"], "--updates-per-rollout is for online RL"),
    (["--training-type", "grpo", "--ref-model-name", "x"], "--ref-model-name is for a run with a reference model"),
    (["--training-type", "rloo", "--strategy", "deepspeed", "--zero-stage", "3", "--use-ray"],
     "--zero-stage 3 cannot sample rollouts"),
])
def test_settings_that_cannot_work_are_refused_before_anything_loads(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        resolve([*flags, "--storage-path", str(tmp_path)])


# ---- training runs ----------------------------------------------------------------------------------------

def toy_args(model: Path, folder: Path, name: str, *extra: str) -> list[str]:
    """64 prompts 'digit i', rewarded by the share of '7's in a 4-character answer; 8 answers per prompt."""
    data = write_jsonl(folder / "toy.jsonl", [{"messages": [{"role": "user", "content": f"digit {i}"},
                                                            {"role": "assistant", "content": "7"}]} for i in range(64)])
    return ["--training-type", "rloo", "--model-name", str(model), "--dataset-name", str(data), "--reward", TOY_REWARD,
            "--num-generations", "8", "--batch-size", "8", "--lr", "1e-2", "--max-new-tokens", "4", "--test-size",
            "0.1", "--val-generate-samples", "0", "--num-sanity-val-steps", "0", "--log-every-n-steps", "1",
            "--storage-path", str(folder / "runs"), "--name", name, "--no-verbose", "--seed", "0", *extra]


def logged(run_dir: Path, key: str) -> list[float]:
    rows = csv.DictReader(next((run_dir / "csv").glob("version_*/metrics.csv")).open())
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.mark.slow
def test_rloo_raises_a_toy_reward_far_above_chance(tiny_model_dir, tmp_path):
    """From a random tiny model (reward about 0.01: '7' is one of ~100 characters) to a mean reward above 0.5 over
    the last 5 of 30 steps; every rollout is on disk with its rewards."""
    result = train.main(toy_args(tiny_model_dir, tmp_path, "toy", "--max-steps", "30", "--max-epochs", "100"))
    run_dir = Path(result["run_dir"])
    reward = logged(run_dir, "train/reward")
    assert len(reward) == 30 and sum(reward[:3]) / 3 < 0.05
    assert sum(reward[-5:]) / 5 > 0.5, reward
    rows = [json.loads(line) for line in (run_dir / "rollouts" / "step-29.jsonl").read_text().splitlines()]
    prompts = {r["row"] for r in rows}
    assert len(rows) == 8 * len(prompts) and {r["sample"] for r in rows} == set(range(8))  # K = 8 per prompt
    assert all(r["rewards"]["python.sevens"] == pytest.approx(sevens([], [r["completion"]])[0]) for r in rows)
    assert result["after"]["val/reward"] > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_rloo_learns_the_toy_task_in_bf16(tiny_model_dir, tmp_path, precision):
    """--precision bf16-*: sampling runs the model as the precision leaves it (bf16 weights under bf16-true, autocast
    under bf16-mixed), log-probs are upcast to float32; the toy reward still climbs from about 0.01 to above 0.3."""
    result = train.main(toy_args(tiny_model_dir, tmp_path, precision, "--max-steps", "30", "--max-epochs", "100",
                                 "--precision", precision))
    reward = logged(Path(result["run_dir"]), "train/reward")
    assert len(reward) == 30 and sum(reward[:3]) / 3 < 0.05
    assert sum(reward[-5:]) / 5 > 0.3, reward


def scripted_engine(monkeypatch, answer) -> tuple[list, list]:
    """Rollouts from a stand-in for vllm.LLM (run with --rollout-engine vllm; vLLM needs a GPU): the answer of sample
    ``i`` in the engine's ``call``-th generate call is ``answer(call, i)``, a (token ids, finish reason) pair. Returns
    the generate calls (prompts, sampling settings) and the weights pushed to the engine, as they come."""
    from types import SimpleNamespace

    pushed, calls = [], []

    class EngineModel:
        def load_weights(self, weights):
            pushed.append({name: w.clone() for name, w in weights})

    class FakeLLM:
        llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
            model_runner=SimpleNamespace(model=EngineModel()))))

        def generate(self, prompts, params, use_tqdm):
            call = len(calls)
            calls.append((prompts, params))
            outputs = [SimpleNamespace(**dict(zip(("token_ids", "finish_reason"), answer(call, i))))
                       for i in range(params["n"])]
            return [SimpleNamespace(outputs=outputs) for _ in prompts]

    monkeypatch.setattr(online_rl, "vllm_usable", lambda: True)
    monkeypatch.setattr(online_rl.VLLMEngine, "load", classmethod(lambda cls, cfg: cls(FakeLLM(), dict)))
    return calls, pushed


def test_a_step_logs_all_of_its_micro_batches(tiny_model_dir, char_tokenizer, tmp_path, monkeypatch):
    """With --accumulate-grad-batches 2 an optimizer step's logged rollout numbers are those of both micro-batches
    (the step's rollout file holds both): the reward's mean over all its answers (micro-batches weighted by their
    prompts) and the longest answer, not the last micro-batch's; validation's are those of the whole split. Scripted
    answers make every sampling call's reward and longest answer differ from the next one's."""
    seven, a, end = (char_tokenizer.convert_tokens_to_ids(t) for t in ("7", "a", "<|im_end|>"))

    def answer(call: int, i: int) -> tuple[list[int], str]:  # call % 3 + 1 characters; half or a third of them 7s
        return [seven if i % (2 + call % 2) == 0 else a] * (call % 3 + 1) + [end], "stop"

    scripted_engine(monkeypatch, answer)
    result = train.main(toy_args(tiny_model_dir, tmp_path, "acc", "--max-steps", "3", "--max-epochs", "100",
                                 "--batch-size", "2", "--accumulate-grad-batches", "2", "--rollout-engine", "vllm"))
    run_dir = Path(result["run_dir"])
    reward, longest = logged(run_dir, "train/reward"), logged(run_dir, "train/completion_length_max")
    assert len(reward) == len(longest) == 3
    last_micro_batch = []
    for step in range(3):
        rows = [json.loads(line) for line in (run_dir / "rollouts" / f"step-{step}.jsonl").read_text().splitlines()]
        assert len(rows) in (3 * 8, 4 * 8)  # two micro-batches of 2 prompts (57 rows: one batch has 1) x K = 8
        assert reward[step] == pytest.approx(sum(r["reward"] for r in rows) / len(rows), abs=1e-3)
        assert longest[step] == max(r["tokens"] for r in rows)
        last = [r for r in rows if r["tokens"] == rows[-1]["tokens"]]  # one sampling call's answers: one length
        assert len(last) < len(rows)
        last_micro_batch.append((sum(r["reward"] for r in last) / len(last), last[0]["tokens"]))
    # The last micro-batch alone would not do: its reward differs at every step, its longest answer at some.
    assert all(mean != logged_mean for (mean, _), logged_mean in zip(last_micro_batch, reward))
    assert any(tokens != logged_max for (_, tokens), logged_max in zip(last_micro_batch, longest))
    # The final validation, after step 3: 7 prompts (--test-size 0.1 of 64) in 4 batches of 2 and 1.
    val = [json.loads(line) for line in (run_dir / "rollouts" / "val-step-3.jsonl").read_text().splitlines()]
    # Each sampling call's answers have one length, so more than one length means the batches' longest differ.
    assert len(val) == 7 * 8 and len({r["tokens"] for r in val}) > 1
    assert result["after"]["val/reward"] == pytest.approx(sum(r["reward"] for r in val) / len(val), abs=1e-3)
    assert result["after"]["val/completion_length_max"] == max(r["tokens"] for r in val)


class LinearDtypes(pl.Callback):
    """The output dtype of the policy's first linear layer in every forward pass, split by whether gradient is on
    (the training pass) or off (sampling, which runs under ``torch.no_grad``)."""

    def __init__(self):
        self.seen = {"sampling": set(), "training": set()}

    def on_train_start(self, trainer, pl_module) -> None:
        layer = next(m for m in pl_module.model.modules() if isinstance(m, torch.nn.Linear))
        layer.register_forward_hook(lambda module, args, out: self.seen[
            "training" if torch.is_grad_enabled() else "sampling"].add(out.dtype))


@pytest.mark.parametrize(("precision", "dtype"), [("32", torch.float32), ("bf16-mixed", torch.bfloat16)])
def test_rollouts_are_sampled_in_the_training_passs_precision(tiny_model_dir, tmp_path, precision, dtype):
    """Rollouts are drawn at batch start, outside the training step's autocast; under --precision bf16-mixed the
    sampler runs under the same bf16 autocast as the training pass (the policy it samples is the one it trains; on a
    CPU with AVX-512 BF16 it is also faster), and in float32 under --precision 32."""
    seen = LinearDtypes()
    train.run(resolve(toy_args(tiny_model_dir, tmp_path, precision, "--max-steps", "1", "--max-epochs", "100",
                               "--precision", precision))[0], callbacks=[seen])
    assert seen.seen == {"sampling": {dtype}, "training": {dtype}}


@pytest.mark.slow
def test_fsdp_samples_outside_the_training_forward_and_matches_a_plain_run(tiny_model_dir, tmp_path):
    """--strategy fsdp: FSDP cannot gather its weights inside the strategy's forward, where the training step runs,
    so the rollout is drawn at batch start. Same seed, one process: the same rollouts and losses as without FSDP."""
    base = ["--max-steps", "3", "--max-epochs", "100"]
    plain, sharded = Recorder(), Recorder()
    train.run(resolve(toy_args(tiny_model_dir, tmp_path, "plain", *base))[0], callbacks=[plain])
    train.run(resolve(toy_args(tiny_model_dir, tmp_path, "fsdp", *base, "--strategy", "fsdp"))[0], callbacks=[sharded])
    assert len(plain.losses) == 3
    torch.testing.assert_close(torch.tensor(sharded.losses), torch.tensor(plain.losses), rtol=1e-4, atol=1e-6)
    for step in range(3):
        a = (tmp_path / "runs" / "plain" / "rollouts" / f"step-{step}.jsonl").read_text()
        assert a == (tmp_path / "runs" / "fsdp" / "rollouts" / f"step-{step}.jsonl").read_text(), step


def whole_and_resumed(model: Path, folder: Path, base: list[str], crash_at: int) -> tuple[Recorder, Recorder, Recorder]:
    """The toy run ``base`` straight (run "whole"), and again (run "split") crashing at global step ``crash_at``
    (before that step's checkpoint) and resumed from its last checkpoint: the three runs' recorded losses."""
    from test_training import Crash

    whole, first, second = Recorder(), Recorder(), Recorder()
    train.run(resolve(toy_args(model, folder, "whole", *base))[0], callbacks=[whole])
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.run(resolve(toy_args(model, folder, "split", *base))[0], callbacks=[first, Crash(at_step=crash_at)])
    train.run(resolve(toy_args(model, folder, "split", *base, "--resume-from-checkpoint", "last"))[0],
              callbacks=[second])
    return whole, first, second


def same_rollout_files(folder: Path, steps) -> None:
    for step in steps:
        a = (folder / "runs" / "whole" / "rollouts" / f"step-{step}.jsonl").read_text()
        assert a == (folder / "runs" / "split" / "rollouts" / f"step-{step}.jsonl").read_text(), step


@pytest.mark.slow
def test_resume_draws_the_same_rollouts_and_losses_as_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """6 steps straight, against a run that crashes after step 4 (before its checkpoint: it resumes from step 3's)
    and is resumed: the losses of steps 3-5 and their rollout files match (the sampler's random state comes back
    from the checkpoint; the crashed run's step-3 file is written anew, not appended to)."""
    base = ["--max-steps", "6", "--max-epochs", "100", "--checkpoint-every-n-steps", "1"]
    whole, first, second = whole_and_resumed(tiny_model_dir, tmp_path, base, crash_at=4)
    assert len(whole.losses) == 6 and len(first.losses) == 4 and len(second.losses) == 3
    torch.testing.assert_close(torch.tensor(first.losses[:3] + second.losses), torch.tensor(whole.losses), rtol=1e-5,
                               atol=1e-6)
    same_rollout_files(tmp_path, range(6))


@pytest.mark.slow
def test_several_updates_per_rollout_reuse_it_and_clip_the_ratio(tiny_model_dir, tmp_path):
    """--updates-per-rollout 2: rollouts are drawn every other step (one file per pair) and the second update of a
    pair, away from the sampling policy, clips some ratios at lr 1e-2."""
    result = train.main(toy_args(tiny_model_dir, tmp_path, "ppo", "--max-steps", "6", "--max-epochs", "100",
                                 "--updates-per-rollout", "2", "--clip-eps", "0.05"))
    run_dir = Path(result["run_dir"])
    names = sorted(p.name for p in (run_dir / "rollouts").iterdir())
    assert names == ["step-0.jsonl", "step-2.jsonl", "step-4.jsonl", "val-step-6.jsonl"]
    clipped = logged(run_dir, "train/clipped_share")
    assert clipped[0] == clipped[2] == clipped[4] == 0.0  # first use: the ratio is 1
    assert max(clipped[1], clipped[3], clipped[5]) > 0


def test_the_toy_reward_module_is_importable_by_its_spec():
    assert rewards.python_reward(TOY_REWARD.removeprefix("python:"))(batch_of(["77", "a7"])) == [1.0, 0.5]
    assert "test_online_rl" in sys.modules and online_rl.RLOO.online


@pytest.mark.slow
def test_vllm_rollouts_get_the_policy_weights_after_every_update(tiny_model_dir, char_tokenizer, tmp_path, monkeypatch):
    """--rollout-engine vllm with a stand-in for vllm.LLM (vLLM needs a GPU): the engine is asked for K answers per
    prompt with the run's sampling settings, gets the policy's weights before the rollouts of every step (changed by
    each update), and its answers are trained on and saved like the HF sampler's."""
    seven, a, end = (char_tokenizer.convert_tokens_to_ids(t) for t in ("7", "a", "<|im_end|>"))
    answers = [([seven, end], "stop"), ([seven, a, a, a], "length")]  # reward 1; reward 0.25, truncated
    calls, pushed = scripted_engine(monkeypatch, lambda call, i: answers[i % 2])
    result = train.main(toy_args(tiny_model_dir, tmp_path, "vllm", "--rollout-engine", "vllm", "--max-steps", "2",
                                 "--max-epochs", "100", "--top-p", "0.9"))
    run_dir = Path(result["run_dir"])
    prompts, params = calls[0]
    assert len(prompts) == 8 and all(set(p) == {"prompt_token_ids"} for p in prompts)
    assert {k: params[k] for k in ("n", "temperature", "top_p", "max_tokens")} == \
        {"n": 8, "temperature": 1.0, "top_p": 0.9, "max_tokens": 4}
    assert end in params["stop_token_ids"]
    assert len(pushed) == 3  # before the rollouts of step 0, step 1 and the final validation
    first, second = pushed[0], pushed[1]
    assert any(not torch.equal(first[n], second[n]) for n in first)  # the update of step 0 reached the engine
    final = torch.load(next((run_dir / "checkpoints").glob("last.ckpt")), weights_only=False)["state_dict"]
    torch.testing.assert_close(pushed[2]["model.embed_tokens.weight"], final["model.model.embed_tokens.weight"])
    rows = [json.loads(x) for x in (run_dir / "rollouts" / "step-0.jsonl").read_text().splitlines()]
    assert {(r["completion"], r["reward"], r["truncated"]) for r in rows} == {("7", 1.0, False), ("7aaa", 0.25, True)}
    assert logged(run_dir, "train/truncated_share") == [0.5, 0.5]


def test_the_verifier_reward_scores_each_answer_the_same_way_twice(tiny_model_dir, tmp_path):
    """genrm:PATH on a real (tiny) verifier: one p("Yes") in [0, 1] per answer, and the same values when the same
    rollout is scored again (seeded by the answers: a resumed run gets the rewards the crashed one got)."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(genrm_gate=False, cuda_graphs=True, verifier_k_min=2, verifier_k_max=3, verifier_tau=0.05,
                          verifier_temperature=1.0, verifier_max_new_tokens=6)
    built = rewards.build([f"genrm:{tiny_model_dir}"], None, cfg, tmp_path)
    batch = batch_of(["2 + 2 = 4. #### 4", "2 + 2 = 5. #### 5", "#### 7"])
    first, values = built(batch)
    again, _ = built(batch)
    assert len(first) == 3 and all(0.0 <= v <= 1.0 for v in first)
    assert values["genrm"] == first and again == first


def _on_two_gloo_ranks(worker, *args) -> None:
    """``worker(rank, *args)`` in 2 processes joined by a gloo process group (60 s timeout). They meet through a file
    store, not a TCP port: a free port picked here and released before the ranks bind it can be taken meanwhile."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as store:
        mp.spawn(_gloo_rank, args=(f"file://{store}/rendezvous", worker, args), nprocs=2, join=True)


def _gloo_rank(rank: int, init_method: str, worker, args: tuple) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def _fsdp_sampling_worker(rank: int, model_dir: str, out: str) -> None:
    """One of 2 gloo ranks: the tiny model FSDP-sharded by decoder layer, weights gathered as for a rollout, then
    rank 0 decodes up to 6 tokens and rank 1 up to 2 (their forward passes are collectives)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from sampling import PrefixSampler

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    root = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), device_id=torch.device("cpu"),
                use_orig_params=True)

    def sync(more: bool) -> bool:
        flag = torch.tensor(int(more))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    with torch.no_grad(), FSDP.summon_full_params(root, writeback=False):
        sampler = PrefixSampler(model, [[3, 4, 5], [6, 7]], 0, seed=rank, sync=sync)
        groups = sampler.sample([0, 1], 2, set(), 6 if rank == 0 else 2)
    Path(out, f"rank-{rank}.json").write_text(json.dumps([[a.tokens for a in g] for g in groups]))


@pytest.mark.slow
def test_fsdp_ranks_that_decode_different_lengths_stay_in_step(tiny_model_dir, tmp_path):
    """Under FSDP every forward pass gathers weights from all ranks, so a rank whose answers are done must keep
    stepping while another decodes (without ``sync`` rank 0's third token waits for ever). Both finish, and each
    rank's answers are the ones the unsharded model draws with the same seed."""
    from transformers import AutoModelForCausalLM

    from sampling import PrefixSampler

    _on_two_gloo_ranks(_fsdp_sampling_worker, str(tiny_model_dir), str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for rank, budget in [(0, 6), (1, 2)]:
        expected = PrefixSampler(model, [[3, 4, 5], [6, 7]], 0, seed=rank).sample([0, 1], 2, set(), budget)
        got = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert got == [[a.tokens for a in g] for g in expected]
        assert {len(t) for g in got for t in g} == {budget}


class _StateRecorder:
    def __init__(self):
        self.loaded = []

    def load_state_dict(self, state):
        self.loaded.append(state)


def _fake_module(world: int, rank: int):
    from types import SimpleNamespace

    return SimpleNamespace(rollouts=_StateRecorder(), _trainer=object(),
                           trainer=SimpleNamespace(world_size=world, global_rank=rank))


def test_each_rank_resumes_its_own_sampler_state():
    """A checkpoint keeps every rank's sampler state (rank 0 writes the file); rank 1 of 2 takes the second. A
    checkpoint from before (one state) still loads on one worker; with another worker count nothing loads, and a
    warning says the rollouts will differ."""
    from module import PostTrainingModule

    fake = _fake_module(2, 1)
    PostTrainingModule.on_load_checkpoint(fake, {"rollouts": {"ranks": [{"generator": "r0"}, {"generator": "r1"}]}})
    assert fake.rollouts.loaded == [{"generator": "r1"}]
    single = _fake_module(1, 0)
    PostTrainingModule.on_load_checkpoint(single, {"rollouts": {"generator": "old", "kept": {}}})
    assert single.rollouts.loaded == [{"generator": "old", "kept": {}}]
    other = _fake_module(3, 0)
    with pytest.warns(UserWarning, match="from 2 workers and this run has 3"):
        PostTrainingModule.on_load_checkpoint(other, {"rollouts": {"ranks": [{}, {}]}})
    assert other.rollouts.loaded == []


def test_kept_rollouts_go_into_the_checkpoint_on_the_cpu_and_come_back_whole():
    """--updates-per-rollout > 1 keeps rollouts between steps; the checkpoint holds them on the CPU (Lightning loads
    checkpoints there) and ``Rollout.to`` moves a reused one to the policy's device."""
    from types import SimpleNamespace

    rollout = Rollout(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long),
                      torch.full((2, 3), -100), torch.tensor([[1.0, 0.0]]), {"math": [1.0, 0.0]}, ["a", "b"],
                      torch.tensor([False, True]), torch.tensor([0.5, 0.25]), torch.tensor([2, 3]),
                      prompt_lengths=torch.tensor([1, 1]), uses=1)
    state = {"generator": torch.Generator().manual_seed(3).get_state(), "kept": {(0,): vars(rollout.to("cpu"))}}
    owner = SimpleNamespace(cfg=SimpleNamespace(rollout_engine="hf"), tokenizer=None)
    rollouts = online_rl.Rollouts.__new__(online_rl.Rollouts)
    rollouts.module, rollouts.cfg, rollouts.generator = owner, owner.cfg, None
    rollouts.load_state_dict(state)
    back = rollouts.state_dict()
    assert torch.equal(back["generator"], state["generator"])
    again = Rollout(**back["kept"][(0,)]).to(torch.device("cpu"))
    for name, value in vars(rollout).items():
        assert (torch.equal(value, getattr(again, name)) if isinstance(value, torch.Tensor)
                else value == getattr(again, name)), name


def _gather_worker(rank: int, out: str) -> None:
    from module import PostTrainingModule

    states = PostTrainingModule._every_rank(_fake_module(2, rank), {"generator": torch.full((4,), rank)})
    Path(out, f"rank-{rank}.json").write_text(json.dumps([s["generator"].tolist() for s in states]))


@pytest.mark.slow
def test_the_checkpoint_gathers_every_ranks_sampler_state(tmp_path):
    """Every rank saves (Lightning's checkpoint hooks run on all of them), and each gets every rank's state in rank
    order, so the file rank 0 writes holds rank 1's stream too."""
    _on_two_gloo_ranks(_gather_worker, str(tmp_path))
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank-{rank}.json").read_text()) == [[0, 0, 0, 0], [1, 1, 1, 1]]
