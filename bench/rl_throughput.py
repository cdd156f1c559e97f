"""Online-RL training throughput of our trainer (``--training-type rloo``) against TRL's ``RLOOTrainer`` and
``GRPOTrainer``, on the same prompts, model and rollout budget.

Each optimizer step of every run samples K = --num-generations answers to each of P = --prompts-per-step
synthetic-math prompts (temperature 1.0, top-p 1, no top-k, up to --max-new-tokens), rewards each answer with
math-verify against the row's reference (ours ``--reward math``; TRL a reward function calling our
``rewards.math_reward``, so the same code scores both; ``--reward coin``: a 0/1 checksum of the answer's text, the
same function for all, for policies that solve nothing, such as random weights on a GPU), and takes one AdamW step on
the policy gradient of those P*K answers: fp32 (--precision bf16-mixed: bf16 autocast in both), no KL term and no
reference model (ours ``--kl-coef 0``, TRL ``beta=0.0``), one update per batch of rollouts (ours
``--updates-per-rollout 1``; TRL ``num_iterations=1``, ``steps_per_generation=1``, ``gradient_accumulation_steps=1``,
``per_device_train_batch_size`` = P*K, as TRL counts completions), the same lr, cosine schedule without warm-up,
clipping and weight decay; TRL with activation checkpointing off and bf16 as --precision says (both on by its
defaults). The prompts of every step are the same for all runs: TRL gets the rows our length-grouped sampler plans, in
its order, unshuffled (``shuffle_dataset=False``); each run records the rows of every step and the summary says
whether they agree. Each run is its own subprocess (peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA, read
at the end of the last timed step); the first --warmup-steps steps are not timed.

Measured over the timed steps: steps/s; rollout tokens/s (answer tokens sampled, stop token included, per second of
whole step: sampling, rewards, forward, backward, optimizer); decode tokens/s (the same tokens per second of
generation alone); the share of step time spent generating (ours: ``sampling.PrefixSampler``'s prefill and decoding;
TRL: ``_generate_single_turn``, i.e. padding, ``model.generate`` and the cut after the stop token) and rewarding (ours
``rewards.Rewards``, TRL ``_calculate_rewards``); answers in backward (rows of the pass with gradient, of all sampled).

What differs (each is how the framework works, not a setting left unequal):
  - Sampling engine. Ours runs each prompt once and copies its KV cache to its K rows, and finished rows leave the
    batch; on a GPU (--cuda-graphs on, train.py's default) it decodes over a static KV cache instead, every row kept
    until all are done, each token's forward pass replayed as one CUDA graph. TRL calls ``generate`` on P*K rows
    (each prompt K times, so K prefills) and rows that finished keep decoding padding until the longest answer of the
    batch ends.
  - Training pass. Ours runs each prompt once and its answers over copies of its KV cache (train.py's
    --share-prompt-pass, the default; --share-prompt-pass off here runs each answer whole); TRL runs prompt +
    completion for every answer.
  - Answers with no gradient. Without a KL term ours skips the forward and backward pass of answers whose advantage is
    0 (all K rewards of their prompt equal; exact, their gradient is 0); TRL trains every answer. "answers in
    backward" shows the difference (ours keeps one row when no answer has a gradient); it depends on the policy's
    accuracy.
  - TRL's RLOOTrainer runs one more no-grad forward pass over all P*K answers per step (the old log-probs of its
    clipped ratio, computed even with one update per rollout); GRPOTrainer skips it in this setting.
  - Loss arithmetic. Ours (rloo) and TRL RLOO: leave-one-out advantages, mean over answers of the summed token losses.
    TRL GRPO: group-normalised advantages, DAPO token mean (its defaults ``scale_rewards="group"``,
    ``loss_type="dapo"``; ours ``--training-type grpo``). Its row is compared with ours rloo: ours grpo samples alike and,
    with 0/1 rewards, trains the same rows; only a few operations on the advantages and the mean differ.
  - Random streams. Each framework draws its own samples, so answers and their lengths differ: steps/s moves with the
    length of what was sampled; rollout tokens/s largely corrects for that. "mean answer" shows the lengths.
  - Bookkeeping. Ours writes every rollout to ``<run>/rollouts/step-N.jsonl`` (timed); TRL computes per-token entropy
    in its fused LM head and gathers its metrics (timed). Both project only answer positions through the LM head.

Run (the real measurement; about 15-20 minutes on 2 idle CPU cores, an estimate; nothing is downloaded; needs
pip install -r bench/requirements.txt):
    HF_HUB_OFFLINE=1 .venv/bin/python bench/rl_throughput.py --out runs/bench/rl_throughput.json
Small (a local model folder; about a minute):
    .venv/bin/python bench/rl_throughput.py --model-name <folder> --steps 2 --num-generations 2 --max-new-tokens 8 \
        --prompts-per-step 2

Reading the result: one row per run, then ours / TRL for each TRL trainer (above 1x in steps/s and tokens/s: ours is
faster; below 1x in peak memory: ours uses less). Record the ratios and the machine in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

from bench.sft_throughput import ROOT, StepClock, save_result  # also sets the offline env
from config import flag_name
from secrets_guard import redact_output

TRL_TRAINERS = ("rloo", "grpo")
TEMPERATURE = 1.0  # the loss reads the policy at temperature 1: sampling at 1 keeps both frameworks on-policy
TEST_ROWS = 2  # our trainer needs a validation split; it is only used after the timed steps


class RLClock(StepClock):
    """``StepClock`` (its CUDA sync and peak memory) for RL steps: a --warmup-steps count of its own, the time of the
    steps' parts (generation, rewards) and what they sampled and trained. Parts and counts only count while a step is
    timed."""

    def __init__(self, cuda: bool, warmup: int):
        super().__init__(cuda, warmup)
        self.parts = {"generate": 0.0, "reward": 0.0}
        self.generated_tokens = self.answers = self.backward_rows = self.prompt_tokens = 0
        self.rows: list[list[int]] = []  # every step's dataset rows (warm-up included), sorted

    @property
    def timing(self) -> bool:
        return self.started is not None

    def end(self, batch: dict | None = None) -> None:
        self.stop()  # what a step sampled and trained is counted as it happens

    @contextlib.contextmanager
    def part(self, name: str):
        """Time the block as part ``name`` of the step."""
        if not self.timing:
            yield
            return
        self._sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.parts[name] += time.perf_counter() - started

    def sampled(self, prompts: list[list[int]], answer_lengths: list[int]) -> None:
        """Count one rollout: the token ids of its distinct prompts and the length of every answer."""
        if self.timing:
            self.prompt_tokens += sum(len(p) for p in prompts)
            self.generated_tokens += sum(answer_lengths)
            self.answers += len(answer_lengths)

    def backward(self, n: int) -> None:
        """Count the answers one pass with gradient (forward and backward) runs on."""
        if self.timing:
            self.backward_rows += n

    def result(self) -> dict[str, Any]:
        s = self.seconds
        return {
            "steps_timed": self.steps, "seconds": round(s, 3), "steps_per_s": self.steps / s,
            "generated_tokens": self.generated_tokens, "answers": self.answers, "answers_backward": self.backward_rows,
            "mean_answer_tokens": self.generated_tokens / max(1, self.answers), "prompt_tokens": self.prompt_tokens,
            "rollout_tokens_per_s": self.generated_tokens / s,
            "decode_tokens_per_s": self.generated_tokens / max(self.parts["generate"], 1e-9),
            "generate_seconds": round(self.parts["generate"], 3), "reward_seconds": round(self.parts["reward"], 3),
            "generate_share": self.parts["generate"] / s, "reward_share": self.parts["reward"] / s,
            "peak_memory_mib": round(self.peak_mib), "rows_per_step": self.rows,
        }


def rl_config(args: argparse.Namespace, storage: str):
    """The config of our run; its data flags also select the rows TRL gets."""
    from config import resolve

    flags = [
        "--training-type", "rloo", "--model-name", args.model_name, "--dataset-name", "synthetic-math",
        "--synthetic-levels", args.levels, "--train-dataset-length", str(total_steps(args) * args.prompts_per_step),
        "--test-dataset-length", str(TEST_ROWS), "--batch-size", str(args.prompts_per_step), "--max-epochs", "1",
        "--max-steps", str(total_steps(args)), "--max-length", str(args.max_length), "--lr", str(args.lr),
        "--warmup-steps", "0", "--precision", args.precision, "--num-generations", str(args.num_generations),
        "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(TEMPERATURE), "--top-p", "1.0",
        "--reward", "math" if args.reward == "math" else "python:bench.rl_throughput:coin",
        "--kl-coef", "0", "--updates-per-rollout", "1", "--cuda-graphs" if args.cuda_graphs == "on" else "--no-cuda-graphs",
        "--share-prompt-pass" if args.share_prompt_pass == "on" else "--no-share-prompt-pass",
        "--val-generate-samples", "0", "--num-sanity-val-steps", "0", "--no-verbose",
        "--storage-path", storage, "--name", "bench",
    ]
    return resolve(flags + (["--use-gpu"] if args.device == "cuda" else []))[0]


def total_steps(args: argparse.Namespace) -> int:
    return args.warmup_steps + args.steps


def measure_ours(args: argparse.Namespace) -> dict[str, Any]:
    import pytorch_lightning as pl
    import torch

    import online_rl
    import rewards
    import sampling
    import train
    from models import load_tokenizer, stop_token_ids

    clock = RLClock(args.device == "cuda", args.warmup_steps)
    # Timers around what Rollouts.sample calls (looked up at call time, so patching the class or module is enough).
    prefill, decode, score = sampling.PrefixSampler.__init__, sampling.PrefixSampler.sample, rewards.Rewards.__call__
    logprobs = online_rl.answer_logprobs

    def timed_prefill(self, model, prompts, *rest, **kwargs):
        with clock.part("generate"):
            prefill(self, model, prompts, *rest, **kwargs)
        self.bench_prompts = prompts

    graphed = []  # per rollout: whether its decoding ran as a CUDA graph

    def timed_decode(self, indices, n, *rest, **kwargs):
        with clock.part("generate"):
            groups = decode(self, indices, n, *rest, **kwargs)
        graphed.append(self.graphed)
        clock.sampled([self.bench_prompts[i] for i in indices], [len(a.tokens) for group in groups for a in group])
        return groups

    def timed_score(self, batch):
        with clock.part("reward"):
            return score(self, batch)

    def counted_logprobs(model, rollout, rows, *rest, **kwargs):
        if torch.is_grad_enabled():  # the policy's pass with gradient (one row stays when no answer has a gradient)
            clock.backward(len(rows))
        return logprobs(model, rollout, rows, *rest, **kwargs)

    sampling.PrefixSampler.__init__, sampling.PrefixSampler.sample = timed_prefill, timed_decode
    rewards.Rewards.__call__, online_rl.answer_logprobs = timed_score, counted_logprobs

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            clock.rows.append(sorted(batch["rows"]))
            clock.begin(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            clock.end()

    with tempfile.TemporaryDirectory(prefix="rl-bench-ours-") as storage:  # rollouts, checkpoint, final model
        cfg = rl_config(args, storage)
        train.run(cfg, callbacks=[Timer()])
    name = "ours (rloo, Lightning)" if args.device != "cuda" else \
        f"ours (rloo, Lightning, {'CUDA graphs' if all(graphed) else 'no CUDA graphs' if not any(graphed) else 'CUDA graphs in part'})"
    return {"run": name, "stop_token_ids": sorted(stop_token_ids(load_tokenizer(cfg.model_name))),
            "cuda_graph_rollouts": f"{sum(graphed)}/{len(graphed)}", **clock.result()}


def planned_rows(cfg, train_set) -> list[int]:
    """The training rows in the order our trainer takes them in its first epoch (``module._loader``'s sampler)."""
    from collate_functions import LengthGroupedBatchSampler, feature_length

    sampler = LengthGroupedBatchSampler(lengths=[feature_length(f) for f in train_set.features],
                                        targets=[1] * len(train_set.features), batch_size=cfg.batch_size,
                                        shuffle=True, seed=cfg.seed)
    return [i for batch in sampler.plan(0) for i in batch]


def math_correctness(prompts, completions, reference, **_) -> list[float | None]:
    """TRL's reward function: our ``--reward math`` (math-verify against the reference), None where it has none."""
    from rewards import RolloutBatch, math_reward

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]  # conversational: one message
    return math_reward(RolloutBatch(prompts, texts, list(reference)))


def coin(prompts, completions, **_) -> list[float]:
    """``--reward coin``: 0 or 1 from a checksum of the answer's text (the same function for every run). Each answer
    is a fair coin, whatever the policy knows, so about 1 - 2/2**K of the prompts have rewards that differ and every
    framework trains nearly all answers: the comparison for a policy whose K answers disagree (a random-weight model
    on a GPU answers no math problem, and ``math`` would leave ours almost nothing to train)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(zlib.crc32(t.encode()) % 2) for t in texts]


def measure_trl(args: argparse.Namespace, algorithm: str) -> dict[str, Any]:
    import transformers
    import trl
    from datasets import Dataset

    import train
    from models import load_causal_lm, load_tokenizer

    transformers.logging.set_verbosity_warning()
    clock, cuda, k = RLClock(args.device == "cuda", args.warmup_steps), args.device == "cuda", args.num_generations
    base, config_class = {"rloo": (trl.RLOOTrainer, trl.RLOOConfig), "grpo": (trl.GRPOTrainer, trl.GRPOConfig)}[algorithm]

    class TimedTrainer(base):
        """Times generation and rewards and records each step's rows; what TRL computes is unchanged."""

        def _generate_and_score_completions(self, inputs):
            if self.model.training:  # P distinct prompts, each repeated K times by TRL's sampler
                clock.rows.append(sorted({x["row"] for x in inputs}))
            return super()._generate_and_score_completions(inputs)

        def _generate_single_turn(self, prompt_ids, *rest, **kwargs):
            with clock.part("generate"):
                out = super()._generate_single_turn(prompt_ids, *rest, **kwargs)
            completion_ids = out[0] if isinstance(out, tuple) else out  # GRPO also returns log-probs
            clock.sampled(prompt_ids[::k], [len(c) for c in completion_ids])
            return out

        def _calculate_rewards(self, *args, **kwargs):
            with clock.part("reward"):
                return super()._calculate_rewards(*args, **kwargs)

        def compute_loss(self, model, inputs, *rest, **kwargs):
            clock.backward(inputs["completion_ids"].shape[0])
            return super().compute_loss(model, inputs, *rest, **kwargs)

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, targs, state, control, **kwargs) -> None:
            clock.begin(state.global_step)

        def on_step_end(self, targs, state, control, **kwargs) -> None:
            clock.end()

    with tempfile.TemporaryDirectory(prefix=f"rl-bench-trl-{algorithm}-") as storage:
        cfg = rl_config(args, storage)
        tokenizer = load_tokenizer(cfg.model_name)
        train_set, _ = train.prepare_data(cfg, tokenizer)  # the rows ours keeps
        rows = [{"prompt": r["messages"][:-1], "reference": r["reference"], "row": r["row"]}
                for r in (train_set.rows[i] for i in planned_rows(cfg, train_set))]
        specific = {"rloo": {"normalize_advantages": False},  # RLOO's defaults, spelled out
                    "grpo": {"loss_type": "dapo", "scale_rewards": "group"}}[algorithm]
        # transformers renamed gradient_checkpointing to activation_checkpointing (5.17 has the old name, 5.24 the new)
        checkpointing = next(f.name for f in dataclasses.fields(config_class)
                             if f.name in ("activation_checkpointing", "gradient_checkpointing"))
        config = config_class(
            output_dir=storage, per_device_train_batch_size=args.prompts_per_step * k, gradient_accumulation_steps=1,
            steps_per_generation=1, num_iterations=1, num_generations=k, max_completion_length=args.max_new_tokens,
            temperature=TEMPERATURE, top_p=1.0, top_k=0, beta=0.0, mask_truncated_completions=False,
            shuffle_dataset=False,  # the rows come in our sampler's order: the same prompts every step
            max_steps=total_steps(args), num_train_epochs=1, learning_rate=args.lr, lr_scheduler_type="cosine",
            warmup_steps=0, weight_decay=cfg.weight_decay, max_grad_norm=cfg.gradient_clip_val, seed=cfg.seed,
            # TRL defaults to bf16 and checkpointing; ours to neither (--precision sets both frameworks' bf16)
            bf16=args.precision == "bf16-mixed", fp16=False, **{checkpointing: False},
            use_cpu=not cuda, dataloader_num_workers=0, report_to=[], save_strategy="no", eval_strategy="no",
            logging_strategy="no", disable_tqdm=True, log_completions=False, **specific,
        )
        reward = math_correctness if args.reward == "math" else coin
        trainer = TimedTrainer(model=load_causal_lm(cfg.model_name), reward_funcs=[reward], args=config,
                               train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[Timer()])
        trainer.train()
    return {"run": f"TRL {trl.__version__} {base.__name__}", "stop_token_ids": sorted(trainer.eos_token_ids),
            "mixed_precision": trainer.accelerator.mixed_precision, "activation_checkpointing": getattr(config, checkpointing),
            **clock.result()}


def run_all(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each run in a fresh subprocess, one after the other (so they never share the cores)."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="rl-bench-") as folder:
        settings = [f"{flag_name(k)}={v}" for k, v in vars(args).items() if k not in ("only", "out")]
        for only in ("ours", *(f"trl-{t}" for t in trl_trainers(args))):
            out = Path(folder) / f"{only}.json"
            command = [sys.executable, __file__, *settings, "--only", only, "--out", str(out)]
            print(f"running {only}: {' '.join(command)}", flush=True)
            subprocess.run(command, check=True, cwd=ROOT)
            results[only] = json.loads(out.read_text())
    return results


def summary(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ours / each TRL trainer, and whether every run got the same prompts (rows per step, and their tokens)."""
    ours = results["ours"]
    ratios = {
        name: {key: ours[key] / r[key] for key in ("steps_per_s", "rollout_tokens_per_s", "decode_tokens_per_s",
                                                   "peak_memory_mib")}
        for name, r in results.items() if name != "ours"
    }
    return {"ratios_ours_over": ratios,
            "same_prompts": all(r["rows_per_step"] == ours["rows_per_step"] for r in results.values()),
            "same_prompt_tokens": len({r["prompt_tokens"] for r in results.values()}) == 1,
            "same_stop_tokens": len({tuple(r["stop_token_ids"]) for r in results.values()}) == 1}


def table(results: dict[str, dict[str, Any]], s: dict[str, Any]) -> str:
    lines = ["| run | steps timed | steps/s | rollout tokens/s | decode tokens/s | generating | rewarding | "
             "answers in backward | mean answer (tokens) | peak memory (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results.values():
        lines.append(f"| {r['run']} | {r['steps_timed']} | {r['steps_per_s']:.4f} | {r['rollout_tokens_per_s']:.1f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['generate_share']:.1%} | {r['reward_share']:.1%} | "
                     f"{r['answers_backward']}/{r['answers']} | {r['mean_answer_tokens']:.1f} | {r['peak_memory_mib']} |")
    for name, ratio in s["ratios_ours_over"].items():
        lines.append(f"| ours / {results[name]['run']} | | {ratio['steps_per_s']:.2f}x | "
                     f"{ratio['rollout_tokens_per_s']:.2f}x | {ratio['decode_tokens_per_s']:.2f}x | | | | | "
                     f"{ratio['peak_memory_mib']:.2f}x |")

    def yes(ok: bool) -> str:
        return "yes" if ok else "NO"

    lines += [
        "",
        f"- same prompts every step: {yes(s['same_prompts'])}; same prompt tokens (timed steps): "
        f"{yes(s['same_prompt_tokens'])} ({', '.join(str(r['prompt_tokens']) for r in results.values())}); "
        f"same stop tokens: {yes(s['same_stop_tokens'])}",
        "- rollout tokens/s: answer tokens sampled per second of whole step; decode tokens/s: per second of generation",
    ]
    return "\n".join(lines)


def trl_trainers(args: argparse.Namespace) -> list[str]:
    return [t for t in args.trl.split(",") if t]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-name", default="smollm2-135m-instruct", help="Policy of every run (as train.py).")
    parser.add_argument("--steps", type=int, default=6, help="Timed optimizer steps (after the warm-up ones).")
    parser.add_argument("--warmup-steps", type=int, default=1, help="Optimizer steps run before the clock starts.")
    parser.add_argument("--prompts-per-step", type=int, default=8, help="Prompts per optimizer step (P).")
    parser.add_argument("--num-generations", type=int, default=4, help="Answers sampled per prompt (K).")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="Token budget of each answer.")
    parser.add_argument("--max-length", type=int, default=256, help="Prompts this long or longer are dropped (ours).")
    parser.add_argument("--levels", default="1,2", help="Synthetic-math difficulty levels.")
    parser.add_argument("--lr", type=float, default=1e-5, help="Learning rate of every run.")
    parser.add_argument("--precision", choices=("32", "bf16-mixed"), default="32",
                        help="Ours: train.py's --precision; TRL: bf16=True under bf16-mixed (accelerate's autocast).")
    parser.add_argument("--reward", choices=("math", "coin"), default="math",
                        help="math: math-verify against the reference; coin: 0/1 from a checksum of the answer (see coin).")
    parser.add_argument("--trl", default=",".join(TRL_TRAINERS), help="TRL trainers to run, comma separated: rloo, grpo.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="Default: cuda when available.")
    parser.add_argument("--cuda-graphs", choices=("on", "off"), default="on",
                        help="Ours on a GPU: decode rollouts as CUDA graphs or not (train.py's --[no-]cuda-graphs).")
    parser.add_argument("--share-prompt-pass", choices=("on", "off"), default="on",
                        help="Ours: the training pass runs each prompt once (train.py's --[no-]share-prompt-pass).")
    parser.add_argument("--out", default=None, help="Write the results as JSON to this file.")
    parser.add_argument("--only", choices=("ours", *(f"trl-{t}" for t in TRL_TRAINERS)), default=None,
                        help=argparse.SUPPRESS)  # the subprocesses
    args = parser.parse_args(argv)
    problems = []
    if args.steps < 1 or args.warmup_steps < 0:
        problems.append(f"--steps must be at least 1 and --warmup-steps at least 0, got {args.steps} and "
                        f"{args.warmup_steps}")
    if args.num_generations < 2:
        problems.append(f"--num-generations must be at least 2, got {args.num_generations}")
    if args.prompts_per_step < 1 or args.max_new_tokens < 1:
        problems.append(f"--prompts-per-step and --max-new-tokens must be at least 1, got {args.prompts_per_step} and "
                        f"{args.max_new_tokens}")
    if unknown := set(trl_trainers(args)) - set(TRL_TRAINERS):
        problems.append(f"--trl {args.trl}: unknown {', '.join(sorted(unknown))}; choose among {', '.join(TRL_TRAINERS)}")
    if problems:
        parser.error("; ".join(problems))
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    from models import resolve_model_path

    args.model_name = resolve_model_path(args.model_name)  # TRL needs a folder, not our alias
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    redact_output()  # everything printed or logged from here on passes through secrets_guard.redact
    args = parse_args(argv)
    if args.only == "ours":
        result = measure_ours(args)
    elif args.only:
        result = measure_trl(args, args.only.removeprefix("trl-"))
    else:
        results = run_all(args)
        s = summary(results)
        print(table(results, s))
        result = {"settings": {k: v for k, v in vars(args).items() if k not in ("only", "out")}, **results, **s}
    save_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
