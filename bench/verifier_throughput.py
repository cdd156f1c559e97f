"""GenRM-CoT verification: rationales per second with a shared prefix vs naive generation, and adaptive K vs K = 32.

Candidates are held-out synthetic-math problems (the first --problems of the stream, which no stage of the README
chain trains on), each with its correct solution or a wrong one (one slip, ``synthetic_math.wrong_steps``),
alternately: their labels are known.

Part 1, throughput: K = --k rationales for each of --prompts candidates, drawn three ways with the same decoding
loop (``extension.verifier.RationaleSampler``), greedy so that every way does exactly the same work:

- shared prefix (ours): each prompt is run once, its KV cache copied to its K samples; all samples decode together;
- batched, no sharing: each sample runs its prompt again, all decode together (what ``generate`` does with
  ``num_return_sequences=K``);
- naive per sample: one sample at a time from scratch (batch of one).

Part 2, adaptive K: --k-max rationales (temperature --temperature) for each of --candidates candidates, then adaptive
K (``extension.verifier.adaptive_k``: groups of --k-min, stop once the variance of p("Yes") < --tau) replayed on the same
samples. Reported: mean rationales adaptive K uses, how often its decision (score >= 0.5) agrees with fixed
K = --k-max, and both AUCs. Target: at most half the rationales, at least 95% agreement.

Run (about 10 minutes on 2 idle CPU cores, after the README chain has trained the verifier):
    .venv/bin/python bench/verifier_throughput.py --verifier runs/genrm-smollm2-math/final_model \\
        --out runs/bench/verifier_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from config import VERIFIER_K_MAX, VERIFIER_K_MIN, VERIFIER_TAU, VERIFIER_TEMPERATURE
from secrets_guard import redact_output

for var, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(var, value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--verifier", default="runs/genrm-smollm2-math/final_model", help="The verifier model.")
    parser.add_argument("--levels", default="1,2", help="Synthetic-math levels of the candidates.")
    parser.add_argument("--seed", type=int, default=42, help="The problem stream's seed (the README chain's).")
    parser.add_argument("--prompts", type=int, default=8, help="Part 1: candidates.")
    parser.add_argument("--k", type=int, default=8, help="Part 1: rationales per candidate.")
    parser.add_argument("--candidates", type=int, default=48, help="Part 2: candidates.")
    parser.add_argument("--k-min", type=int, default=VERIFIER_K_MIN, help="Part 2: adaptive K's group size.")
    parser.add_argument("--k-max", type=int, default=VERIFIER_K_MAX, help="Part 2: the fixed K compared with.")
    parser.add_argument("--tau", type=float, default=VERIFIER_TAU, help="Part 2: adaptive K's variance threshold.")
    parser.add_argument("--temperature", type=float, default=VERIFIER_TEMPERATURE,
                        help="Part 2: sampling temperature of rationales.")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="Rationale budget.")
    parser.add_argument("--prompts-per-batch", type=int, default=8, help="Part 2: candidates decoded together.")
    parser.add_argument("--skip", choices=("throughput", "adaptive"), default=None, help="Leave one part out.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="Default: cuda when available.")
    parser.add_argument("--out", default=None, help="Write the results as JSON to this file.")
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def candidates(n: int, seed: int, levels: str) -> list[tuple[str, str, bool]]:
    """(question, solution, correct) of the first ``n`` held-out problems, right and wrong alternately within each
    level (``synthetic_math.verification_candidates``)."""
    import synthetic_math

    out = []
    for problem, steps in synthetic_math.verification_candidates(n, seed, tuple(int(v) for v in levels.split(","))):
        out.append((problem.question, synthetic_math.solution_text(steps, steps[-1].result), steps == problem.steps))
    return out


def timed(device: str, fn):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def throughput(args: argparse.Namespace, model, tokenizer) -> list[dict[str, Any]]:
    from extension.verifier import RationaleSampler, verification_prompt_ids

    prompts = [verification_prompt_ids(tokenizer, q, s) for q, s, _ in candidates(args.prompts, args.seed, args.levels)]
    RationaleSampler(model, tokenizer, prompts[:1], 4, 0.0)([0], 2)  # warm-up: first-call allocations
    rows = []

    def record(name: str, samplers: list, results: list, seconds: float) -> None:
        generated = sum(len(tokens) for s in samplers for per_prompt in s.last_generated for tokens in per_prompt)
        rationales = sum(len(r) for per_call in results for r in per_call)
        rows.append({"way": name, "rationales": rationales, "generated_tokens": generated,
                     "prompt_tokens_run": sum(s.prompt_tokens_run for s in samplers), "seconds": round(seconds, 2),
                     "rationales_per_s": rationales / seconds, "generated_tokens_per_s": generated / seconds})
        print(f"{name}: {rationales} rationales in {seconds:.1f} s")

    everyone = list(range(len(prompts)))

    def shared():
        sampler = RationaleSampler(model, tokenizer, prompts, args.max_new_tokens, 0.0, share_prefix=True)
        return [sampler], [sampler(everyone, args.k)]

    def unshared():
        sampler = RationaleSampler(model, tokenizer, prompts, args.max_new_tokens, 0.0, share_prefix=False)
        return [sampler], [sampler(everyone, args.k)]

    def naive():
        samplers, results = [], []
        for prompt in prompts:
            for _ in range(args.k):
                sampler = RationaleSampler(model, tokenizer, [prompt], args.max_new_tokens, 0.0, share_prefix=False)
                samplers.append(sampler)
                results.append(sampler([0], 1))
        return samplers, results

    for name, fn in (("shared prefix (ours)", shared), ("batched, no sharing", unshared), ("naive per sample", naive)):
        (samplers, results), seconds = timed(args.device, fn)
        record(name, samplers, results, seconds)
    return rows


def adaptive(args: argparse.Namespace, model, tokenizer) -> dict[str, Any]:
    from extension.verifier import score_solutions

    cands = candidates(args.candidates, args.seed, args.levels)
    scores, seconds = timed(args.device, lambda: score_solutions(
        model, tokenizer, [q for q, _, _ in cands], [s for _, s, _ in cands], k_min=args.k_max, k_max=args.k_max,
        tau=args.tau, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
        prompts_per_batch=args.prompts_per_batch, seed=args.seed, progress=True))
    labels = [c for _, _, c in cands]
    streams = [s.p_yes for s in scores]
    result = {"candidates": len(scores), "k_fixed": args.k_max, "seconds_fixed_k": round(seconds, 1),
              "rationales_per_s_fixed_k": args.k_max * len(scores) / seconds,
              **replay(streams, labels, args.k_min, args.k_max, args.tau)}
    result["target_met"] = result["mean_k_adaptive"] <= args.k_max / 2 and result["decision_agreement"] >= 0.95
    # The same samples replayed with other tau: the rationales/agreement trade-off, at no sampling cost.
    result["tau_sweep"] = {tau: {k: v for k, v in replay(streams, labels, args.k_min, args.k_max, tau).items()
                                 if k in ("mean_k_adaptive", "decision_agreement", "balanced_agreement", "auc_adaptive")}
                           for tau in (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25)}
    result["p_yes"] = [[round(v, 5) for v in stream] for stream in streams]
    result["labels"] = labels
    return result


def replay(streams: list[list[float]], labels: list[bool], k_min: int, k_max: int, tau: float) -> dict[str, Any]:
    """Adaptive K replayed on K_max-long p("Yes") streams, against fixed K = K_max. Decisions are compared at 0.5
    (``decision_agreement``) and at the threshold that best separates the labels under fixed K
    (``balanced_agreement``: a score of 0.5 means little for a verifier whose scores are all high)."""
    from extension.verifier import adaptive_k
    from metrics import auc

    ks = [adaptive_k(stream, k_min, k_max, tau) for stream in streams]
    adaptive_scores = [sum(stream[:k]) / k for stream, k in zip(streams, ks)]
    fixed_scores = [sum(stream) / len(stream) for stream in streams]
    # The threshold of best fixed-K accuracy: midway between two neighbouring fixed-K scores.
    ordered = sorted(fixed_scores)
    cuts = [(a + b) / 2 for a, b in zip(ordered, ordered[1:])] or [0.5]
    best = max(cuts, key=lambda t: sum((f >= t) == y for f, y in zip(fixed_scores, labels)))
    agree = lambda t: sum((a >= t) == (f >= t) for a, f in zip(adaptive_scores, fixed_scores)) / len(streams)  # noqa: E731
    by_label = {name: [k for k, y in zip(ks, labels) if y == value] for name, value in (("correct", True), ("wrong", False))}
    return {
        "mean_k_adaptive": sum(ks) / len(ks), "k_histogram": {k: ks.count(k) for k in sorted(set(ks))},
        "mean_k_by_label": {name: sum(v) / len(v) for name, v in by_label.items() if v},
        "decision_agreement": agree(0.5), "balanced_threshold": best, "balanced_agreement": agree(best),
        "auc_adaptive": auc(adaptive_scores, labels), "auc_fixed": auc(fixed_scores, labels),
        "accuracy_adaptive_at_0.5": sum((a >= 0.5) == y for a, y in zip(adaptive_scores, labels)) / len(labels),
        "accuracy_fixed_at_0.5": sum((f >= 0.5) == y for f, y in zip(fixed_scores, labels)) / len(labels),
        "accuracy_fixed_balanced": sum((f >= best) == y for f, y in zip(fixed_scores, labels)) / len(labels),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    redact_output()  # everything printed or logged from here on passes through secrets_guard.redact
    import torch

    from bench.sft_throughput import save_result
    from models import load_causal_lm, load_tokenizer

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = load_causal_lm(args.verifier).to(args.device).eval()
    tokenizer = load_tokenizer(args.verifier)
    result: dict[str, Any] = {"verifier": args.verifier, "device": args.device, "torch_threads": torch.get_num_threads()}
    if args.skip != "throughput":
        rows = throughput(args, model, tokenizer)
        result["throughput"] = rows
        base = rows[0]["rationales_per_s"]
        print("\n| way | rationales/s | generated tokens/s | prompt tokens run | speed-up of ours |\n|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['way']} | {row['rationales_per_s']:.2f} | {row['generated_tokens_per_s']:.1f} | "
                  f"{row['prompt_tokens_run']} | {base / row['rationales_per_s']:.2f}x |")
    if args.skip != "adaptive":
        result["adaptive"] = adaptive(args, model, tokenizer)
        print(json.dumps({k: v for k, v in result["adaptive"].items() if k not in ("p_yes", "labels")}, indent=2))
    save_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
