"""Batched generation on the CPU (``sampling.generate_from_prompts``, what validation, inference.py, DPO pairs and
Best-of-N call): the shared-prefix sampler path against transformers' ``generate`` (``sampling.transformers_generate``).

Each line answers P synthetic-math prompts (levels 1-2, seed --seed's stream, which no config trains on) with up to
--max-new-tokens tokens: greedy (one answer each, as validation and evaluate_math.py ask), or K samples each at
temperature 1 with no top-k (as inference.py --n K, generate_dpo_pairs.py and Best-of-N ask). Both paths run in
this process, one right after the other on the same prompts, with a warm-up of each first. Reported per line and
path: answer tokens, seconds, tokens/s; for greedy lines also how many answers are the same text (the sampler
computes the output head as ``weight @ hidden.T``, so a near-tie can in principle go the other way).

Run (about 5 minutes on 2 idle CPU cores, after the main job has trained the SFT model):
    .venv/bin/python bench/generation.py --model-name runs/sft-smollm2-math/final_model
"""

from __future__ import annotations

import argparse
import os
import time

for var, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(var, value)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-name", default="runs/sft-smollm2-math/final_model", help="Model (as train.py).")
    parser.add_argument("--lines", default="16x1,4x8,16x8",
                        help="PxK per line, comma separated: P prompts, K answers each (K = 1: greedy, else sampled).")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="Token budget of each answer.")
    parser.add_argument("--seed", type=int, default=7, help="Synthetic-math stream of the prompts; seeds the sampling.")
    parser.add_argument("--out", default=None, help="Also write the lines as JSON to this file.")
    args = parser.parse_args(argv)

    import torch

    from bench.sampler_decode import math_prompts, save, versions
    from models import load_causal_lm, load_tokenizer
    from sampling import generate_from_prompts, transformers_generate

    shapes = [tuple(int(x) for x in line.split("x")) for line in args.lines.split(",")]
    model, tokenizer = load_causal_lm(args.model_name).eval(), load_tokenizer(args.model_name)
    prompts = math_prompts(tokenizer, max(p for p, _ in shapes), args.seed)
    paths = {"sampler": generate_from_prompts, "generate": transformers_generate}
    for run in paths.values():  # warm-up
        run(model, tokenizer, prompts[:2], 4, do_sample=False)
    print(versions())

    class Count:  # a progress bar that only counts the tokens
        n = 0

        def update(self, k: int) -> None:
            self.n += k

    lines = []
    for count, k in shapes:
        settings = {"do_sample": False} if k == 1 else {"do_sample": True, "temperature": 1.0, "top_k": 0,
                                                        "num_return_sequences": k}
        line: dict = {"prompts": count, "answers_each": k, "mode": "greedy" if k == 1 else "sampled"}
        answers = {}
        for name, run in paths.items():
            torch.manual_seed(args.seed)
            tokens = Count()
            start = time.perf_counter()
            answers[name] = run(model, tokenizer, prompts[:count], args.max_new_tokens, progress=tokens, **settings)
            seconds = time.perf_counter() - start
            line[name] = {"tokens": tokens.n, "seconds": round(seconds, 2), "tokens_per_s": round(tokens.n / seconds, 1)}
        line["speedup"] = round(line["sampler"]["tokens_per_s"] / line["generate"]["tokens_per_s"], 2)
        if k == 1:
            line["same_answers"] = sum(a == b for a, b in zip(answers["sampler"], answers["generate"], strict=True))
        lines.append(line)
        print(f"P={count} K={k} ({line['mode']}): sampler {line['sampler']['tokens_per_s']} tokens/s, generate "
              f"{line['generate']['tokens_per_s']} tokens/s, {line['speedup']}x"
              + (f", {line['same_answers']}/{count} answers the same" if k == 1 else ""), flush=True)
    save(lines, args.out)
    return lines


if __name__ == "__main__":
    main()
