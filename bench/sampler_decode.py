"""Decoding throughput of the shared-prefix sampler (``sampling.PrefixSampler``) against the number of rows.

Each line samples K = --num-generations answers to each of P synthetic-math prompts (levels 1-2, seed --seed's
stream, which no config trains on), temperature 1, up to --max-new-tokens, stopping at the model's end-of-turn
token: one prefill of the P prompts, then P*K rows decoded together, finished rows leaving the batch. Reported per
line: answer tokens sampled and their tokens/s (prefill included). Run it on the commit before and after a change
of the sampler to measure the change (the random stream may differ between them: compare tokens/s, not tokens).

Run (about 4 minutes on 2 idle CPU cores, after the main job has trained the SFT model):
    .venv/bin/python bench/sampler_decode.py --model-name runs/sft-smollm2-math/final_model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

for var, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(var, value)


def math_prompts(tokenizer, count: int, seed: int) -> list[list[int]]:
    """Token ids of the generation prompts of ``count`` synthetic-math problems (levels 1-2) of seed ``seed``'s stream."""
    import synthetic_math
    from collate_functions import generation_prompt_ids

    return [generation_prompt_ids(tokenizer, [{"role": "user", "content": p.question}, {"role": "assistant", "content": ""}])
            for p in synthetic_math.generate_problems(count, seed, (1, 2))]


def versions() -> str:
    """The line a decoding bench prints first: the library versions, the CPU and its threads."""
    import torch
    import transformers

    return (f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")


def save(lines: list[dict], out: str | None) -> None:
    """A bench's lines as JSON to ``out`` (--out), where given."""
    if out:
        with open(out, "w") as f:
            json.dump(lines, f, indent=2)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-name", default="runs/sft-smollm2-math/final_model", help="Policy (as train.py).")
    parser.add_argument("--prompts", default="4,8,16,32", help="Numbers of prompts P, one line each, comma separated.")
    parser.add_argument("--num-generations", type=int, default=8, help="Answers per prompt (K).")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="Token budget of each answer.")
    parser.add_argument("--seed", type=int, default=7, help="Synthetic-math stream of the prompts; seeds the sampling.")
    parser.add_argument("--out", default=None, help="Also write the lines as JSON to this file.")
    args = parser.parse_args(argv)

    from models import load_causal_lm, load_tokenizer, stop_token_ids
    from sampling import PrefixSampler

    counts = [int(p) for p in args.prompts.split(",")]
    model, tokenizer = load_causal_lm(args.model_name).eval(), load_tokenizer(args.model_name)
    prompts = math_prompts(tokenizer, max(counts), args.seed)
    stop = stop_token_ids(tokenizer)
    PrefixSampler(model, prompts[:1], tokenizer.pad_token_id, seed=args.seed).sample([0], 2, stop, 4)  # warm-up
    lines = []
    print(versions())
    for count in counts:
        start = time.perf_counter()
        sampler = PrefixSampler(model, prompts[:count], tokenizer.pad_token_id, temperature=1.0, seed=args.seed)
        groups = sampler.sample(list(range(count)), args.num_generations, stop, args.max_new_tokens)
        seconds = time.perf_counter() - start
        tokens = sum(len(a.tokens) for g in groups for a in g)
        line = {"prompts": count, "rows": count * args.num_generations, "tokens": tokens, "seconds": round(seconds, 2),
                "tokens_per_s": round(tokens / seconds, 1)}
        lines.append(line)
        print(f"P={count} K={args.num_generations} rows={line['rows']}: {tokens} tokens in {seconds:.1f} s, "
              f"{line['tokens_per_s']} tokens/s", flush=True)
    save(lines, args.out)
    return lines


if __name__ == "__main__":
    main()
