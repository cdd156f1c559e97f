"""Would an int8 copy of the policy make a faster rollout sampler on a CPU? Speed and fidelity of PyTorch's dynamic
int8 quantisation (``torch.ao.quantization.quantize_dynamic``: int8 weights, each matmul's input quantised to int8
at run time, VNNI kernels) against the fp32 policy, in ``sampling.PrefixSampler``.

A sampler that differs from the trained policy makes online RL off-policy: the answers come from the int8 model,
the gradient is the fp32 model's, and each token's ratio p_fp32 / p_int8 must correct for it (truncated importance
sampling, as RL frameworks do for a vLLM sampler in bf16). The correction is cheap where the ratios stay near 1 and
useless where they do not. So each variant reports:
  - speed: answer tokens/s of K = --num-generations answers to each of P = --prompts synthetic-math prompts (levels
    1-2, seed --seed's stream), temperature 1, up to --max-new-tokens (the RLOO config's rollout), prefill included,
    the quantisation itself (done again after every optimizer step in training) reported apart;
  - quality: the share of those answers math-verify marks right;
  - fidelity: for the int8 model's own answers, |log p_fp32 - log p_int8| per answer token (mean, median) and the
    share of tokens whose ratio p_fp32 / p_int8 lies outside [0.5, 2].

Variants: ``fp32`` (the policy as trained), ``int8-all`` (every ``nn.Linear``, output head included, one scale per
weight matrix: quantize_dynamic's default), ``int8-decoder`` (the decoder's linear layers only, one scale per output
channel; the head stays fp32, so the sampler keeps its fp32 ``weight @ hidden.T`` head).

Run (about 3 minutes on 2 idle CPU cores, after the main job has trained the SFT model):
    .venv/bin/python bench/int8_sampler.py --out runs/bench/int8_sampler.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: ``bench`` from the repository

from bench.sampler_decode import math_prompts, save, versions  # noqa: E402

for var, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(var, value)

VARIANTS = ("fp32", "int8-all", "int8-decoder")


def quantized(model, variant: str):
    """A quantised copy of ``model`` (``variant`` as in the module docstring); ``model`` itself for fp32."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if variant == "fp32":
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        if variant == "int8-all":
            return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        out = copy.deepcopy(model)
        decoder = out.get_decoder()
        quantize_dynamic(decoder, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
        return out


def answer_logprobs(model, prompts: list[list[int]], answers: list[list[int]], k: int, pad_id: int):
    """Per-token log-probabilities (flat, answer tokens only) of ``answers`` (answer i answers prompt i // k)."""
    import torch

    from losses.logprobs import token_logprobs
    from online_rl import answer_batch

    ids, mask, labels = answer_batch(prompts, answers, k, pad_id)
    with torch.no_grad():
        logps, where = token_logprobs(model, ids, mask, labels)
    return logps[where]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-name", default="runs/sft-smollm2-math/final_model", help="Policy (as train.py).")
    parser.add_argument("--prompts", type=int, default=8, help="Prompts P of the rollout.")
    parser.add_argument("--num-generations", type=int, default=8, help="Answers per prompt (K).")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="Token budget of each answer.")
    parser.add_argument("--seed", type=int, default=7, help="Synthetic-math stream of the prompts; seeds the sampling.")
    parser.add_argument("--out", default=None, help="Also write the lines as JSON to this file.")
    args = parser.parse_args(argv)

    import torch

    import synthetic_math
    from models import load_causal_lm, load_tokenizer, stop_token_ids
    from rewards import RolloutBatch, math_reward
    from sampling import PrefixSampler

    model, tokenizer = load_causal_lm(args.model_name).eval(), load_tokenizer(args.model_name)
    problems = synthetic_math.generate_problems(args.prompts, args.seed, (1, 2))
    prompts = math_prompts(tokenizer, args.prompts, args.seed)
    stop, k = stop_token_ids(tokenizer), args.num_generations
    print(versions())
    lines = []
    for variant in VARIANTS:
        start = time.perf_counter()
        sampler_model = quantized(model, variant)
        quantize_seconds = time.perf_counter() - start
        PrefixSampler(sampler_model, prompts[:1], tokenizer.pad_token_id, seed=args.seed).sample([0], 2, stop, 4)  # warm-up
        start = time.perf_counter()
        sampler = PrefixSampler(sampler_model, prompts, tokenizer.pad_token_id, temperature=1.0, seed=args.seed)
        groups = sampler.sample(list(range(len(prompts))), k, stop, args.max_new_tokens)
        seconds = time.perf_counter() - start
        answers = [a.tokens for g in groups for a in g]
        texts = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
        rewards = math_reward(RolloutBatch([[]] * len(texts), texts,
                                           [synthetic_math.correct_solution(problems[i // k]) for i in range(len(texts))]))
        tokens = sum(len(a) for a in answers)
        line = {"variant": variant, "prompts": len(prompts), "rows": len(answers), "tokens": tokens,
                "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
                "quantize_seconds": round(quantize_seconds, 2), "right": sum(r or 0 for r in rewards) / len(rewards)}
        if variant != "fp32":
            gap = answer_logprobs(model, prompts, answers, k, tokenizer.pad_token_id) - answer_logprobs(
                sampler_model, prompts, answers, k, tokenizer.pad_token_id)  # log p_fp32 - log p_int8
            line |= {"mean_abs_logprob_gap": round(float(gap.abs().mean()), 4),
                     "median_abs_logprob_gap": round(float(gap.abs().median()), 4),
                     "ratio_outside_half_to_2": round(float((gap.abs() > torch.log(torch.tensor(2.0))).float().mean()), 4)}
        lines.append(line)
        print(line, flush=True)
    save(lines, args.out)
    return lines


if __name__ == "__main__":
    main()
