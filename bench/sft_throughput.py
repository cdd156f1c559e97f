"""SFT training throughput of our trainer against TRL's ``SFTTrainer``, on the same rows, model and batching.

Measures real (non-padding) tokens/s and answer tokens/s of full fp32 SFT steps (forward, backward, clipping,
AdamW) and each framework's peak memory. Each framework runs in its own subprocess, so the peak is its own: peak
RSS on CPU (``ru_maxrss``), ``torch.cuda.max_memory_allocated`` on CUDA, read at the end of the last timed step
(the checkpoint our trainer writes after training is left out). Both get the synthetic-math rows of
``CustomDataset.splits`` (same seed and rows), the same model, micro-batch size, max length, optimizer steps, lr,
cosine schedule and clipping at 1.0; one epoch, no gradient accumulation or checkpointing, no evaluation while
timed. The loss is the mean NLL of the answer for both: TRL gets a prompt-completion conversational dataset
(``prompt``: the messages before the final assistant turn, ``completion``: that turn), so its completion-only
loss applies. The first 2 optimizer steps are warm-up and not timed. Real tokens are the sum of
``attention_mask`` over the timed batches; answer tokens are the positions the loss is taken on, counted after
the shift (``labels[:, 1:] != -100``), for both.

What differs: ours groups rows of similar length, TRL pads randomly drawn rows to the longest of the batch (its
default). Both project only answer positions through the LM head, except TRL 1.16 off CUDA/XPU (no Triton),
where it projects every position, prompt and padding included: CPU ratios are larger than GPU ones.

Run (about 4 minutes on 2 idle CPU cores; nothing is downloaded; needs pip install -r bench/requirements.txt):
    HF_HUB_OFFLINE=1 .venv/bin/python bench/sft_throughput.py --out runs/bench/sft_throughput.json

Reading the result: one row per framework, then the ratios ours/TRL (above 1x in tokens/s: ours is faster).
"padding" is the share of computed positions that are padding. The line under the table gives the answer tokens
of the whole training set as each framework labels them; TRL's count is higher by one per row because it also
learns the newline after the assistant's ``<|im_end|>``. Record the ratio and the machine in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for var, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(var, value)

from collate_functions import IGNORE_INDEX, target_count  # noqa: E402  (after the offline env)
from config import TrainConfig, flag_name, resolve  # noqa: E402
from secrets_guard import redact_output, write_json  # noqa: E402

WARMUP_STEPS = 2  # optimizer steps run before the clock starts: allocator growth, first-call overheads
TEST_ROWS = 8  # our trainer needs a validation split; it is only used after the timed steps


class StepClock:
    """Wall time and token counts of the optimizer steps after the warm-up ones."""

    def __init__(self, cuda: bool, warmup: int = WARMUP_STEPS):
        self.cuda, self.warmup = cuda, warmup
        self.started: float | None = None
        self.steps, self.seconds, self.real_tokens, self.answer_tokens, self.padded_tokens = 0, 0.0, 0, 0, 0
        self.peak_mib = 0.0

    def _sync(self) -> None:
        if self.cuda:  # CUDA kernels run asynchronously: wait for them so the step is really over
            import torch

            torch.cuda.synchronize()

    def _peak_mib(self) -> float:
        """Peak memory of this process so far: allocated CUDA memory, or resident memory on CPU."""
        import resource

        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def begin(self, step: int) -> None:
        if step >= self.warmup:
            self._sync()
            self.started = time.perf_counter()

    def stop(self) -> bool:
        """Stop the clock of a timed step (its time, count and the peak memory so far); False for a warm-up step."""
        if self.started is None:
            return False
        self._sync()
        self.seconds += time.perf_counter() - self.started
        self.started = None
        self.steps += 1
        self.peak_mib = self._peak_mib()  # read here: saving checkpoints after training is not training
        return True

    def end(self, batch: dict) -> None:
        """Stop the clock, then count the batch: (B, T) ``attention_mask`` and ``labels``."""
        if not self.stop():
            return
        self.real_tokens += int(batch["attention_mask"].sum())
        self.answer_tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.padded_tokens += batch["attention_mask"].numel()

    def result(self) -> dict[str, Any]:
        return {
            "steps_timed": self.steps, "seconds": round(self.seconds, 3),
            "real_tokens": self.real_tokens, "answer_tokens": self.answer_tokens,
            "real_tokens_per_s": self.real_tokens / self.seconds, "answer_tokens_per_s": self.answer_tokens / self.seconds,
            "padding_share": 1 - self.real_tokens / max(1, self.padded_tokens), "peak_memory_mib": round(self.peak_mib),
        }


def train_config(args: argparse.Namespace, storage: str) -> TrainConfig:
    """The config of our run; its data flags also select the rows TRL gets."""
    flags = [
        "--model-name", args.model, "--dataset-name", "synthetic-math", "--synthetic-levels", args.levels,
        "--train-dataset-length", str(args.rows), "--test-dataset-length", str(TEST_ROWS),
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--max-epochs", "1",
        "--max-steps", str(args.steps), "--lr", str(args.lr), "--warmup-steps", "0", "--precision", "32",
        "--val-generate-samples", "0", "--num-sanity-val-steps", "0", "--no-verbose",
        "--storage-path", storage, "--name", "bench",
    ]
    return resolve(flags + (["--use-gpu"] if args.device == "cuda" else []))[0]


def measure_ours(args: argparse.Namespace) -> dict[str, Any]:
    import pytorch_lightning as pl

    import train

    clock, dataset = StepClock(args.device == "cuda"), {}

    class Timer(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            dataset["answer_tokens"] = sum(target_count(f) for f in pl_module.train_set.features)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            clock.begin(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            clock.end(batch)

    with tempfile.TemporaryDirectory(prefix="sft-bench-ours-") as storage:  # checkpoints and final model land here
        train.run(train_config(args, storage), callbacks=[Timer()])
    return {"framework": "ours (Lightning)", "dataset_answer_tokens": dataset["answer_tokens"], **clock.result()}


def measure_trl(args: argparse.Namespace) -> dict[str, Any]:
    import transformers
    import trl
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    import train
    from models import load_causal_lm, load_tokenizer

    transformers.logging.set_verbosity_warning()
    clock, cuda = StepClock(args.device == "cuda"), args.device == "cuda"
    with tempfile.TemporaryDirectory(prefix="sft-bench-trl-") as storage:
        cfg = train_config(args, storage)
        tokenizer = load_tokenizer(args.model)
        train_set, _ = train.prepare_data(cfg, tokenizer)  # the rows ours keeps, in the same order
        rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in train_set.rows]

        class CountingSFTTrainer(SFTTrainer):
            """Keeps a reference to each batch for the clock; what TRL computes is unchanged."""

            def compute_loss(self, model, inputs, *rest, **kwargs):
                self.last_batch = {"attention_mask": inputs["attention_mask"], "labels": inputs["labels"]}
                return super().compute_loss(model, inputs, *rest, **kwargs)

        class Timer(transformers.TrainerCallback):
            def on_step_begin(self, targs, state, control, **kwargs) -> None:
                clock.begin(state.global_step)

            def on_step_end(self, targs, state, control, **kwargs) -> None:
                clock.end(trainer.last_batch)  # `trainer` is created below, before training starts

        config = SFTConfig(
            output_dir=storage, max_length=args.max_length, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1, num_train_epochs=1, max_steps=args.steps, learning_rate=args.lr,
            lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=cfg.seed,
            packing=False, padding_free=False, completion_only_loss=True,
            bf16=False, fp16=False, gradient_checkpointing=False,  # TRL defaults to bf16 and checkpointing; ours to neither
            use_cpu=not cuda, dataloader_num_workers=0, report_to=[], save_strategy="no", eval_strategy="no",
            logging_strategy="no", disable_tqdm=True,
        )
        trainer = CountingSFTTrainer(model=load_causal_lm(args.model), args=config, train_dataset=Dataset.from_list(rows),
                                     processing_class=tokenizer, callbacks=[Timer()])
        answer_tokens = sum(target_count(row) for row in trainer.train_dataset)
        trainer.train()
    return {"framework": f"TRL {trl.__version__} SFTTrainer", "dataset_answer_tokens": answer_tokens, **clock.result()}


def run_both(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each framework in a fresh subprocess, one after the other (so they never share the cores)."""
    results = []
    with tempfile.TemporaryDirectory(prefix="sft-bench-") as folder:
        for only in ("ours", "trl"):
            out = Path(folder) / f"{only}.json"
            settings = [f"{flag_name(k)}={v}" for k, v in vars(args).items() if k not in ("only", "out")]
            command = [sys.executable, __file__, *settings, "--only", only, "--out", str(out)]
            print(f"running {only}: {' '.join(command)}", flush=True)
            subprocess.run(command, check=True, cwd=ROOT)
            results.append(json.loads(out.read_text()))
    return results


def table(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    def ratio(key: str) -> str:
        return f"{ours[key] / theirs[key]:.2f}x"

    lines = ["| framework | steps timed | real tokens/s | answer tokens/s | padding | peak memory (MiB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in (ours, theirs):
        lines.append(f"| {r['framework']} | {r['steps_timed']} | {r['real_tokens_per_s']:.1f} | "
                     f"{r['answer_tokens_per_s']:.1f} | {r['padding_share']:.1%} | {r['peak_memory_mib']} |")
    lines.append(f"| ours / TRL | | {ratio('real_tokens_per_s')} | {ratio('answer_tokens_per_s')} | | "
                 f"{ratio('peak_memory_mib')} |")
    lines.append(f"\nanswer tokens of the training set as each labels them: ours {ours['dataset_answer_tokens']}, "
                 f"TRL {theirs['dataset_answer_tokens']}")
    return "\n".join(lines)


def bench_parser(doc: str, unit: str, rows: int, batch_size: int, steps: int | None, lr: float,
                 runs: tuple[str, ...]) -> argparse.ArgumentParser:
    """The flags every bench shares; ``unit`` names what a row is (rows, pairs), ``runs`` the subprocess names."""
    parser = argparse.ArgumentParser(description=doc.split("\n", 1)[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Model of every run (as train.py --model-name).")
    parser.add_argument("--rows", type=int, default=rows, help=f"Synthetic-math training {unit}.")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"Training {unit} per micro-batch.")
    parser.add_argument("--max-length", type=int, default=256, help="Maximum tokens per sequence (longer ones are dropped).")
    parser.add_argument("--steps", type=int, default=steps, help="Optimizer steps, warm-up included (default: one epoch).")
    parser.add_argument("--levels", default="1,2", help="Synthetic-math difficulty levels.")
    parser.add_argument("--lr", type=float, default=lr, help="Peak learning rate of every run.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="Default: cuda when available.")
    parser.add_argument("--out", default=None, help="Write the results as JSON to this file.")
    parser.add_argument("--only", choices=runs, default=None, help=argparse.SUPPRESS)  # the subprocesses
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Default --steps to one epoch and --device to CUDA when there is one; refuse a step count outside one epoch."""
    epoch = -(-args.rows // args.batch_size)
    args.steps = args.rows // args.batch_size if args.steps is None else args.steps
    if not WARMUP_STEPS < args.steps <= epoch:
        parser.error(f"--steps must be above the {WARMUP_STEPS} warm-up steps and at most one epoch "
                     f"(--rows {args.rows} / --batch-size {args.batch_size}, rounded up); got {args.steps}")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def save_result(out: str | None, result: dict[str, Any]) -> None:
    """Write the results as JSON to --out, if given (secrets redacted)."""
    if out:
        write_json(out, result)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser(__doc__, "rows", rows=96, batch_size=8, steps=None, lr=1e-5, runs=("ours", "trl"))
    return check_args(parser, parser.parse_args(argv))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    redact_output()  # everything printed or logged from here on passes through secrets_guard.redact
    args = parse_args(argv)
    if args.only:
        result = {"ours": measure_ours, "trl": measure_trl}[args.only](args)
    else:
        ours, theirs = run_both(args)
        print(table(ours, theirs))
        result = {"settings": {k: v for k, v in vars(args).items() if k not in ("only", "out")}, "ours": ours, "trl": theirs,
                  "ratio_real_tokens_per_s": ours["real_tokens_per_s"] / theirs["real_tokens_per_s"]}
    save_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
