"""DPO training throughput of our trainer against TRL's ``DPOTrainer``, and of our live against our precomputed reference.

Measures pairs/s, real (non-padding) tokens/s through the policy, mean step time and peak memory of full fp32 DPO
steps (policy forward and backward on chosen and rejected, the reference's log-probs, clipping, AdamW). Three timed
runs, each in its own subprocess so that the peak is its own (peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on
CUDA, read at the end of the last timed step, as in bench/sft_throughput.py whose ``StepClock`` this reuses):
  - ours, live reference: a frozen copy of the model runs on every batch (train.py --training-type dpo);
  - ours, precomputed reference (--precompute-ref-logps): a separate subprocess first runs the reference pass and
    writes the cache (under a temporary $POSTTRAIN_CACHE), so the timed process only reads it and never loads the
    reference model; its peak is the training peak. The pass's own time is reported apart;
  - TRL ``DPOTrainer`` with ``ref_model=None``, i.e. its own live copy of the model (TRL's default).
All get the synthetic-math preference pairs our data path keeps (prompt = question, chosen = correct solution,
rejected = one with an arithmetic slip; TRL as conversational ``prompt``/``chosen``/``rejected`` message lists), the
same model (given to every run as its resolved folder, fp32), B pairs per micro-batch (2B sequences, one forward
pass), max length, beta, lr, cosine schedule, clipping at 1.0 and optimizer steps; sigmoid loss, one epoch, no
gradient accumulation or checkpointing, no evaluation while timed. The first 2 steps are warm-up and not timed. Real
tokens are the sum of ``attention_mask`` over the timed batches (chosen and rejected rows).

Correctness check: each run records its loss on step 1, where the policy still equals the reference, so the DPO loss
is -log sigmoid(0) = log 2 = 0.6931 for every pair; a different value means the two sides are not computed alike.

What differs: ours groups pairs of similar length, TRL pads randomly drawn pairs to the longest of the batch. Ours
projects only answer positions through the LM head (policy and reference); TRL 1.16 off CUDA/XPU (no Triton)
projects every position, prompt and padding included, and also computes per-token entropy, mean logit and top-1
for its metrics. TRL also learns the newline after the assistant's ``<|im_end|>``: one more answer token per sequence.

Run (about 9 minutes on 2 idle CPU cores; nothing is downloaded; needs pip install -r bench/requirements.txt):
    HF_HUB_OFFLINE=1 .venv/bin/python bench/dpo_throughput.py --out runs/bench/dpo_throughput.json

Reading the result: one row per run, then the ratio ours (live) / TRL in pairs/s (target: at least 1x) and the
precomputed reference's step-time speed-up over the live one (target: at least 1.25x) and its peak memory (target:
lower). Record them and the machine in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.sft_throughput import ROOT, StepClock, bench_parser, check_args, save_result, train_config  # also sets the offline env
from config import flag_name
from secrets_guard import redact_output

RUNS = ("ours-live", "precompute", "ours-precomputed", "trl")  # subprocesses, in this order; "precompute" is untimed
TARGET_VS_TRL = 1.0  # ours (live reference) / TRL, pairs/s
TARGET_PRECOMPUTED_SPEEDUP = 1.25  # live / precomputed, mean step time


class PairClock(StepClock):
    """``StepClock`` that also counts pairs (a batch holds B chosen then B rejected rows) and keeps the first loss."""

    def __init__(self, cuda: bool):
        super().__init__(cuda)
        self.pairs = 0
        self.first_loss: float | None = None

    def end(self, batch: dict, loss) -> None:
        if self.first_loss is None:  # step 1, a warm-up step: the policy still equals the reference
            self.first_loss = float(loss)
        if self.started is not None:
            self.pairs += batch["attention_mask"].shape[0] // 2
        super().end(batch)

    def result(self) -> dict[str, Any]:
        return {**super().result(), "pairs": self.pairs, "pairs_per_s": self.pairs / self.seconds,
                "step_seconds": self.seconds / self.steps, "first_loss": self.first_loss}


def dpo_config(args: argparse.Namespace, storage: str, precomputed: bool):
    """The DPO config of our runs: the SFT bench's flags (data, model, batching, schedule) with the DPO objective."""
    from config import ConfigError, validate

    cfg = dataclasses.replace(train_config(args, storage), training_type="dpo", beta=args.beta,
                              precompute_ref_logps=precomputed)
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def pair_answer_tokens(features: list[dict]) -> int:
    """Answer tokens of chosen and rejected sequences as our collator labels them (after the shift)."""
    from collate_functions import target_count

    return sum(target_count({"labels": f[f"{side}_labels"]}) for f in features for side in ("chosen", "rejected"))


def reference_files() -> dict[str, int]:
    """The cached reference log-prob files under $POSTTRAIN_CACHE, with their modification times."""
    from models import cache_dir

    return {p.name: p.stat().st_mtime_ns for p in (cache_dir() / "ref_logps").glob("*.pt")}


def measure_precompute(args: argparse.Namespace) -> dict[str, Any]:
    """train.py's reference pass alone (load the reference, score every train and validation pair, write the cache)."""
    import train
    from models import load_tokenizer
    from objectives import DPO

    with tempfile.TemporaryDirectory(prefix="dpo-bench-precompute-") as storage:
        cfg = dpo_config(args, storage, precomputed=True)
        tokenizer = load_tokenizer(cfg.model_name)
        train_set, val_set = train.prepare_data(cfg, tokenizer)
        collator = DPO.collator(tokenizer.pad_token_id)
        started = time.perf_counter()
        train.reference_model(cfg, tokenizer, [train_set, val_set], collator)
        seconds = time.perf_counter() - started
    return {"run": "precompute", "seconds": round(seconds, 3), "pairs": len(train_set.features) + len(val_set.features),
            "cache_files": sorted(reference_files())}


def measure_ours(args: argparse.Namespace, precomputed: bool) -> dict[str, Any]:
    import pytorch_lightning as pl

    import train

    clock, dataset = PairClock(args.device == "cuda"), {}
    cached = reference_files()
    if precomputed and not cached:
        raise SystemExit("no cached reference log-probs under $POSTTRAIN_CACHE: run the 'precompute' subprocess first")

    class Timer(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            dataset.update(pairs=len(pl_module.train_set.features), answer_tokens=pair_answer_tokens(pl_module.train_set.features))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            clock.begin(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            clock.end(batch, outputs["loss"])  # the step's DPO loss (no accumulation, one worker: not rescaled)

    with tempfile.TemporaryDirectory(prefix="dpo-bench-ours-") as storage:  # checkpoints and final model land here
        train.run(dpo_config(args, storage, precomputed), callbacks=[Timer()])
    if precomputed and reference_files() != cached:  # the reference pass ran in the timed process: its peak is not ours
        raise SystemExit("the precomputed run wrote reference log-probs instead of reading them: the cache key differs")
    name = "ours, precomputed reference" if precomputed else "ours, live reference"
    return {"run": name, "dataset_pairs": dataset["pairs"], "dataset_answer_tokens": dataset["answer_tokens"],
            **clock.result()}


def measure_trl(args: argparse.Namespace) -> dict[str, Any]:
    import transformers
    import trl
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    import train
    from collate_functions import IGNORE_INDEX
    from models import load_causal_lm, load_tokenizer

    transformers.logging.set_verbosity_warning()
    clock, cuda = PairClock(args.device == "cuda"), args.device == "cuda"
    with tempfile.TemporaryDirectory(prefix="dpo-bench-trl-") as storage:
        cfg = dpo_config(args, storage, precomputed=False)
        tokenizer = load_tokenizer(cfg.model_name)
        train_set, _ = train.prepare_data(cfg, tokenizer)  # the pairs ours keeps, in the same order
        rows = [{"prompt": r["messages"][:-1], "chosen": r["messages"][-1:],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in train_set.rows]

        class CountingDPOTrainer(DPOTrainer):
            """Keeps the last batch and loss for the clock; what TRL computes is unchanged."""

            def compute_loss(self, model, inputs, *rest, **kwargs):
                loss = super().compute_loss(model, inputs, *rest, **kwargs)
                labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)  # as TRL does
                self.last_batch = {"attention_mask": inputs["attention_mask"], "labels": labels}
                self.last_loss = (loss[0] if isinstance(loss, tuple) else loss).detach()
                return loss

        class Timer(transformers.TrainerCallback):
            def on_step_begin(self, targs, state, control, **kwargs) -> None:
                clock.begin(state.global_step)

            def on_step_end(self, targs, state, control, **kwargs) -> None:
                clock.end(trainer.last_batch, trainer.last_loss)  # `trainer` is created below, before training starts

        config = DPOConfig(
            output_dir=storage, max_length=args.max_length, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1, num_train_epochs=1, max_steps=args.steps, learning_rate=args.lr,
            lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=cfg.seed,
            beta=args.beta, loss_type=["sigmoid"], precompute_ref_log_probs=False, padding_free=False,
            bf16=False, fp16=False, gradient_checkpointing=False,  # TRL defaults to bf16 and checkpointing; ours to neither
            use_cpu=not cuda, dataloader_num_workers=0, report_to=[], save_strategy="no", eval_strategy="no",
            logging_strategy="no", disable_tqdm=True,
        )
        # ref_model=None: TRL loads its own frozen copy from the policy's folder (its default, live reference).
        trainer = CountingDPOTrainer(model=load_causal_lm(cfg.model_name), ref_model=None, args=config,
                                     train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[Timer()])
        answer_tokens = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in trainer.train_dataset)
        trainer.train()
    return {"run": f"TRL {trl.__version__} DPOTrainer, live reference", "dataset_pairs": len(rows),
            "dataset_answer_tokens": answer_tokens, **clock.result()}


def run_all(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each run in a fresh subprocess, one after the other (so they never share the cores), with a fresh
    $POSTTRAIN_CACHE: the precomputed run reads only what the precompute run wrote just before it."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as folder:
        env = {**os.environ, "POSTTRAIN_CACHE": str(Path(folder) / "cache")}
        settings = [f"{flag_name(k)}={v}" for k, v in vars(args).items() if k not in ("only", "out")]
        for only in RUNS:
            out = Path(folder) / f"{only}.json"
            command = [sys.executable, __file__, *settings, "--only", only, "--out", str(out)]
            print(f"running {only}: {' '.join(command)}", flush=True)
            subprocess.run(command, check=True, cwd=ROOT, env=env)
            results[only] = json.loads(out.read_text())
    return results


def verdicts(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ratios the issue sets targets for, and the step-1 loss check."""
    live, pre, theirs = results["ours-live"], results["ours-precomputed"], results["trl"]
    losses = {k: results[k]["first_loss"] for k in ("ours-live", "ours-precomputed", "trl")}
    ratios = {
        "pairs_per_s_ours_live_over_trl": live["pairs_per_s"] / theirs["pairs_per_s"],
        "step_speedup_precomputed_over_live": live["step_seconds"] / pre["step_seconds"],
        "peak_memory_precomputed_over_live": pre["peak_memory_mib"] / live["peak_memory_mib"],
    }
    return {**ratios, "first_losses": losses, "log_2": math.log(2),
            "first_loss_is_log_2": all(abs(v - math.log(2)) < 1e-3 for v in losses.values()),
            "met_vs_trl": ratios["pairs_per_s_ours_live_over_trl"] >= TARGET_VS_TRL,
            "met_precomputed_speedup": ratios["step_speedup_precomputed_over_live"] >= TARGET_PRECOMPUTED_SPEEDUP,
            "met_precomputed_memory": pre["peak_memory_mib"] < live["peak_memory_mib"]}


def table(results: dict[str, dict[str, Any]], v: dict[str, Any]) -> str:
    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = ["| run | steps timed | pairs/s | real tokens/s | mean step (s) | padding | peak memory (MiB) | step-1 loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in ("ours-live", "ours-precomputed", "trl"):
        r = results[key]
        lines.append(f"| {r['run']} | {r['steps_timed']} | {r['pairs_per_s']:.2f} | {r['real_tokens_per_s']:.1f} | "
                     f"{r['step_seconds']:.2f} | {r['padding_share']:.1%} | {r['peak_memory_mib']} | {r['first_loss']:.4f} |")
    live, pre = results["ours-live"], results["ours-precomputed"]
    lines += [
        "",
        f"- ours (live) / TRL, pairs/s: {v['pairs_per_s_ours_live_over_trl']:.2f}x "
        f"(target at least {TARGET_VS_TRL:.2f}x: {met(v['met_vs_trl'])})",
        f"- precomputed over live reference, step-time speed-up: {v['step_speedup_precomputed_over_live']:.2f}x "
        f"(target at least {TARGET_PRECOMPUTED_SPEEDUP:.2f}x: {met(v['met_precomputed_speedup'])}); peak memory "
        f"{pre['peak_memory_mib']} vs {live['peak_memory_mib']} MiB (target lower: {met(v['met_precomputed_memory'])})",
        f"- step-1 loss, policy == reference: {', '.join(f'{k} {x:.4f}' for k, x in v['first_losses'].items())} "
        f"(log 2 = {v['log_2']:.4f}: {'all equal' if v['first_loss_is_log_2'] else 'MISMATCH'})",
        f"- reference pass of --precompute-ref-logps (once, not in the step times): {results['precompute']['seconds']:.1f} s "
        f"for {results['precompute']['pairs']} train and validation pairs, model load included",
        f"- training set: {live['dataset_pairs']} pairs; answer tokens as each labels them: ours "
        f"{live['dataset_answer_tokens']}, TRL {results['trl']['dataset_answer_tokens']}",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser(__doc__, "preference pairs", rows=64, batch_size=4, steps=16, lr=5e-6, runs=RUNS)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO temperature of all runs.")
    args = check_args(parser, parser.parse_args(argv))
    if args.beta <= 0:
        parser.error(f"--beta must be positive, got {args.beta}")
    from models import resolve_model_path

    # A folder, not the alias: the alias's converted copy lives under $POSTTRAIN_CACHE, which the runs replace.
    args.model = resolve_model_path(args.model)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    redact_output()  # everything printed or logged from here on passes through secrets_guard.redact
    args = parse_args(argv)
    if args.only == "precompute":
        result = measure_precompute(args)
    elif args.only:
        result = {"ours-live": lambda: measure_ours(args, precomputed=False),
                  "ours-precomputed": lambda: measure_ours(args, precomputed=True),
                  "trl": lambda: measure_trl(args)}[args.only]()
    else:
        results = run_all(args)
        v = verdicts(results)
        print(table(results, v))
        result = {"settings": {k: val for k, val in vars(args).items() if k not in ("only", "out")}, **results, **v}
    save_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
