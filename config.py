"""The one typed configuration object of a run, and how it is built.

Precedence is defaults < YAML file (``--config run.yaml``) < command-line flags.
Every field below is also a flag: ``max_epochs`` is ``--max-epochs``, booleans get
``--flag/--no-flag``, and ``lambda_`` is ``--lambda``. Unknown YAML keys and
contradictory settings are reported together, before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from errors import ArgumentParser
from objectives import TRAINING_TYPES, get_objective, validate_answers
from secrets_guard import redact, secret_flag_problems
from storage import is_remote, join

PRECISIONS = ("32", "bf16-mixed", "bf16-true", "transformer-engine", "transformer-engine-float16")
STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed")
FP8_RECIPES = ("delayed", "current")
# GenRM-CoT adaptive K, the defaults of every entry point that scores with a verifier (train.py's validation,
# extension/best_of_n.py, bench/verifier_throughput.py): rationales are drawn in groups of K_MIN up to K_MAX, and a
# solution stops once the variance of its p("Yes") values is below TAU (Zhang et al., "Generative Verifiers").
VERIFIER_K_MIN, VERIFIER_K_MAX, VERIFIER_TAU, VERIFIER_TEMPERATURE = 8, 32, 0.05, 0.7


def _f(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field carrying its help text (and argparse extras such as choices)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything a run needs. Each field is a flag of train.py with the same help text."""

    # What to train.
    training_type: str = _f("sft", "Objective to train.", choices=TRAINING_TYPES)
    mode: str = _f("train", "train: fit the model; test: only evaluate a model or checkpoint.", choices=("train", "test"))
    model_name: str = _f(
        "Qwen/Qwen2.5-0.5B",
        "Hugging Face hub id, local model folder, or the offline alias 'smollm2-135m-instruct'.",
    )
    # Data.
    dataset_name: str = _f(
        "synthetic-math",
        "Hub dataset id, local file (.jsonl/.json/.parquet), folder of split files (train.jsonl and test.jsonl or "
        "validation.jsonl; .json and .parquet too) or save_to_disk folder, or 'synthetic-math' (built in, offline).",
    )
    test_dataset_name: str | None = _f(
        None, "The held-out rows that validate the run, instead of the dataset's own test split or one carved from its "
        "training rows: a file or folder (its test split, else its only split) or hub id, as --dataset-name.")
    dataset_source: str = _f(
        "auto", "Row format of the dataset; 'auto' detects it from the columns.",
        choices=("auto", "messages", "gsm8k", "math", "preference", "verifier")
    )
    train_percentile: float = _f(100.0, "Keep training rows whose text length is at or below this percentile (0-100].")
    test_percentile: float = _f(100.0, "Keep test rows whose text length is at or below this percentile (0-100].")
    train_dataset_length: int | None = _f(None, "Cap the number of training rows (first N, or random N with --dataset-random-sample).")
    test_dataset_length: int | None = _f(None, "Cap the number of test rows (first N, or random N with --dataset-random-sample).")
    dataset_random_sample: bool = _f(False, "With a length cap, take a seeded random sample instead of the first rows.")
    sanity_train: bool = _f(False, "Validate on the training set itself, to prove the model can overfit it.")
    test_size: float = _f(0.02, "Fraction carved out as the test split when the dataset has none (and no --test-dataset-name).")
    synthetic_levels: str = _f("1,2,3", "Difficulty levels of the synthetic-math dataset, comma separated (1-4).")
    max_length: int = _f(1024, "Maximum tokens per training example (prompt + response).")
    overlong: str = _f(
        "drop",
        "What to do with rows longer than --max-length: drop them or truncate them (both are counted and reported).",
        choices=("drop", "truncate"),
    )
    invalid_rows: str = _f(
        "error",
        "Malformed rows (missing or empty fields, a prompt filling --max-length): stop with an error naming the row, "
        "or skip them and report how many.",
        choices=("error", "skip"),
    )
    # Optimisation.
    seed: int = _f(42, "Random seed for data order, sampling and initialisation, and of the synthetic-math problem stream.")
    max_epochs: int = _f(1, "Number of passes over the training data.")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: run all epochs).")
    max_time_minutes: float | None = _f(
        None,
        "Also stop training after this many minutes of wall-clock time (Lightning's max_time; counted across a resume), "
        "then validate and save the final model as at the end of a run. The learning-rate schedule still follows "
        "--max-steps or the epochs.",
    )
    batch_size: int = _f(8, "Examples per micro-batch (per worker).")
    accumulate_grad_batches: int = _f(1, "Micro-batches per optimizer step.")
    lr: float = _f(1e-5, "Peak learning rate of AdamW.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_steps: int = _f(
        0,
        "Linear warmup steps before the cosine decay. The decay lasts the rest of the whole training as the trainer "
        "counts it: the epochs' optimizer steps or --max-steps, whichever ends first (--max-time-minutes does not "
        "shorten it, so a run the time limit stops ends partway down).",
    )
    min_lr_ratio: float = _f(0.0, "The cosine decay ends at this fraction of --lr.")
    gradient_clip_val: float = _f(1.0, "Clip the gradient norm to this value (0 disables).")
    precision: str = _f("32", "Numeric precision of training.", choices=PRECISIONS)
    strategy: str = _f("auto", "Distribution strategy.", choices=STRATEGIES)
    state_dict_type: str = _f(
        "full", "FSDP checkpoint layout: one full file gathered on rank 0, or one shard per worker (a folder).",
        choices=("full", "sharded"))
    zero_stage: int = _f(
        2, "DeepSpeed ZeRO stage for --strategy deepspeed: 2 shards gradients and optimizer state, 3 also the weights.",
        choices=(2, 3))
    fp8_format: str = _f(
        "HYBRID", "Transformer Engine FP8 format: HYBRID (E4M3 forward, E5M2 gradients) or E4M3 throughout.",
        choices=("HYBRID", "E4M3"))
    fp8_recipe: str = _f(
        "delayed", "Transformer Engine scaling: delayed (each scale from past steps' maxima, no extra pass; TE's default "
        "on Hopper) or current (from the tensor being cast; tracks bf16 more closely while the loss falls fast).",
        choices=FP8_RECIPES)
    fp8_amax_history_len: int = _f(
        16, "Transformer Engine delayed scaling: each FP8 scale comes from the largest |value| of this many past steps.")
    fp8_margin: int = _f(0, "Transformer Engine delayed scaling: keep 2**margin of headroom below the FP8 maximum.")
    compile_head: bool = _f(
        False, "torch.compile the output head and its log-softmax as one graph in every loss, so the float32 logits are "
        "never written (on an H100 at 0.5B, 10-14% more tokens/s; the first steps pay the compilation).")
    activation_checkpointing: bool = _f(
        False, "Recompute each decoder layer's activations in the backward pass instead of keeping them: less memory, "
        "about a third more compute. Under Transformer Engine FP8 the recompute runs in the FP8 context "
        "(Transformer Engine's own checkpoint).")
    # Objective-specific.
    beta: float = _f(0.1, "DPO temperature beta.")
    lambda_: float = _f(0.1, "GenRM-CoT weight of the correct-solution SFT loss (flag --lambda).")
    verifier_k_min: int = _f(
        VERIFIER_K_MIN, "GenRM-CoT adaptive K of the validation verifier score: rationales drawn per group, and the fewest per solution "
        "(K_min).")
    verifier_k_max: int = _f(VERIFIER_K_MAX, "GenRM-CoT adaptive K of the validation verifier score: the most rationales per solution (K_max).")
    verifier_tau: float = _f(
        VERIFIER_TAU, "GenRM-CoT adaptive K of the validation verifier score: a solution stops once the variance of its p('Yes') "
        "values is below this.")
    verifier_temperature: float = _f(VERIFIER_TEMPERATURE, "GenRM-CoT: sampling temperature of verification rationales (0: greedy).")
    ref_model_name: str | None = _f(None, "DPO reference model; default: a frozen copy of --model-name.")
    precompute_ref_logps: bool = _f(
        False, "DPO: compute the reference log-probs in one pass before training (cached on disk) and keep only the policy in memory."
    )
    # Online RL (--training-type rloo, grpo).
    num_generations: int = _f(4, "Online RL: answers sampled per prompt (K, at least 2); each one's baseline comes from the others.")
    temperature: float = _f(1.0, "Online RL: sampling temperature of the answers.")
    loss_temperature: float | None = _f(
        None, "Online RL: the temperature the loss, the KL and PPO's ratio read the policy at, softmax(logits / T). "
        "Unset: the sampling --temperature (1 if that is 0), so the answers are on-policy (as TRL and OpenRLHF).")
    top_p: float = _f(1.0, "Online RL: nucleus sampling mass of the answers (1: the whole distribution).")
    reward: list[str] = _f(
        ["math"], "Online RL: a reward source, repeat the flag for several: math, format, bt:PATH, genrm:PATH, "
        "api[:MODEL], python:MODULE:FUNCTION (see rewards.py).")
    reward_weights: str | None = _f(None, "Online RL: weights of the --reward sources in order, comma separated (default: all 1).")
    genrm_gate: bool = _f(
        False, "Online RL: ask the genrm verifier only where the math reward cannot decide (no reference answer, or "
        "math-verify says wrong).")
    verifier_max_new_tokens: int = _f(256, "Online RL's genrm reward: token budget of each verification rationale.")
    advantage_estimator: str | None = _f(
        None, "Online RL baseline: rloo (leave-one-out), grpo ((r - mean) / std over the K), dr_grpo (r - mean). "
        "Unset: rloo for rloo, grpo for grpo.", choices=("rloo", "grpo", "dr_grpo"))
    kl_coef: float | None = _f(
        None, "Online RL: weight of the KL to a frozen reference (0 loads no reference). Unset: 0.05 for rloo, 0 for "
        "grpo.")
    kl_estimator: str | None = _f(None, "Online RL: per-token KL estimator. Unset: k1 for rloo, k3 for grpo.",
                                  choices=("k1", "k2", "k3"))
    kl_placement: str | None = _f(
        None, "Online RL: the KL as a sequence-level penalty in the reward, or a per-token term of the loss. Unset: "
        "reward for rloo, loss for grpo.", choices=("reward", "loss"))
    loss_normalization: str | None = _f(
        None, "Online RL loss reduction, none length-biased: sequence (token sums, mean over answers), constant (token "
        "sums / --max-new-tokens, Dr. GRPO) or token (mean over the micro-batch's answer tokens, DAPO). Unset: "
        "sequence for rloo, token for grpo.", choices=("sequence", "constant", "token"))
    updates_per_rollout: int = _f(
        1, "Online RL: optimizer steps per batch of rollouts; above 1, PPO's clipped ratio (--clip-eps) keeps the "
        "later steps near the sampling policy.")
    clip_eps: float = _f(0.2, "Online RL: PPO clip range of the probability ratio (matters with --updates-per-rollout > 1).")
    rollout_engine: str = _f(
        "auto", "Online RL: what samples the answers: hf (the shared-prefix sampler, any device), vllm (vLLM's offline "
        "engine, the policy's weights pushed to it after each update; needs vLLM and a CUDA GPU), auto (vllm where "
        "usable, else hf).", choices=("auto", "hf", "vllm"))
    vllm_gpu_memory_utilization: float = _f(
        0.3, "Online RL with --rollout-engine vllm: the share of GPU memory vLLM reserves (the rest trains).")
    cuda_graphs: bool = _f(
        True, "On a GPU: decode online RL's rollouts (hf engine) and the GenRM-CoT verifier's rationales (its validation, "
        "--reward genrm) over a static KV cache, each token's forward pass replayed as one CUDA graph (--no-cuda-graphs: "
        "the dynamic cache, finished rows leaving the batch). The same tokens either way. No effect on the CPU; "
        "a model trained under FSDP with several ranks keeps the dynamic cache.")
    share_prompt_pass: bool = _f(
        True, "Online RL: the training forward pass runs each prompt once and its K answers over its KV cache (the "
        "same log-probs and gradients up to float rounding; on 2 CPU cores its training pass took 0.55x the time and "
        "0.63x the peak memory, docs/online-rl.md). --no-share-prompt-pass: each answer with its prompt, as one "
        "sequence. Off by itself under FSDP, DeepSpeed, --activation-checkpointing and Transformer Engine FP8, and for "
        "models it would not read exactly (a sliding window shorter than --max-length + --max-new-tokens, chunked "
        "attention, logits transformed after the output head).")
    truncated_answers: str = _f(
        "reward", "Online RL: answers that hit --max-new-tokens are rewarded like the others, or masked out of the "
        "loss (counted either way).", choices=("reward", "mask"))
    # Evaluation.
    check_val_every_n_epoch: int = _f(1, "Validate every N epochs.")
    num_sanity_val_steps: int = _f(2, "Validation batches run before training to catch errors early (0 disables).")
    val_generate_samples: int = _f(
        64, "Validation rows answered by greedy generation for edit distance and answer accuracy (0 disables)."
    )
    max_new_tokens: int = _f(256, "Generation budget of validation answers, and of online RL's sampled answers.")
    eval_before_training: bool = _f(False, "Run the validation metrics once before training, for a before/after report.")
    calculate_win_rate: bool = _f(False, "Compute the win rate against a baseline during validation (see --win-rate-baseline).")
    win_rate_baseline: str | None = _f(
        None, "--calculate-win-rate: the baseline's answers to the validation prompts, an inference.py output file.")
    win_rate_judge: str | None = _f(
        None, "--calculate-win-rate: the judge, a reward model folder (train.py --training-type bt) or 'api[:<model>]'.")
    # Checkpoints and logs.
    storage_path: str = _f("runs", "Folder under which the run folder (--name) holds checkpoints, logs and config.")
    name: str | None = _f(
        None, "Run name; default '<training-type>-<date>-<time>'. A local run stops if the name's folder already holds "
        "a run, unless --resume-from-checkpoint continues it or --overwrite starts it over; a Ray job continues it.")
    resume_from_checkpoint: str | None = _f(
        None, "Checkpoint file to continue from, or 'last' for the newest checkpoint of this run (--name)."
    )
    overwrite: bool = _f(
        False, "Start over the run of this --name: first remove its checkpoints, logs and final model (a Ray job: its "
        "whole --storage-path/--name folder, whose newest checkpoint it would otherwise continue from).")
    ckpt_to_keep: int = _f(2, "How many checkpoints to keep (the newest ones), besides last.ckpt.")
    checkpoint_frequency: int = _f(1, "Save a checkpoint every N epochs.")
    checkpoint_every_n_steps: int | None = _f(None, "Also save a checkpoint every N optimizer steps.")
    log_every_n_steps: int = _f(10, "Log training metrics every N optimizer steps.")
    roundoff: int = _f(4, "Round logged and printed metric values to this many decimals.")
    verbose: bool = _f(True, "Progress bars and per-step printing; --no-verbose keeps only summaries.")
    # Hardware and Ray.
    use_gpu: bool | None = _f(
        None, "Train on CUDA GPUs. Unset: a local run uses them when PyTorch sees one, a Ray job's workers only with "
        "this flag (implied by --accelerator-type, the transformer-engine precisions and --strategy deepspeed).")
    use_ray: bool = _f(False, "Run as a Ray Train job (on the cluster of RAY_ADDRESS or `ray job submit`, else a local Ray).")
    num_workers: int = _f(
        1, "Training processes, one per GPU with --use-gpu: Ray workers with --use-ray, else processes on this machine.")
    accelerator_type: str | None = _f(None, "Ray accelerator type of each worker's GPU, e.g. H100, A100, T4 (implies --use-gpu).")
    placement_strategy: str = _f(
        "PACK", "Ray placement of the workers.", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
    )
    max_failures: int = _f(0, "Ray: restart the workers from the last checkpoint after up to this many failures (-1: always).")

    @property
    def storage_dir(self) -> str:
        """Where this run's checkpoints, logs and resolved config are kept: a folder, or an object-store URI."""
        return join(self.storage_path, str(self.name))

    @property
    def run_dir(self) -> Path:
        """The local folder this process writes the run's files to: ``storage_dir`` itself when that is a folder, else
        a scratch folder that Ray jobs copy up to it (``distributed.sync_run_files``)."""
        if is_remote(self.storage_path):
            import tempfile

            return Path(tempfile.gettempdir()) / "posttrain-runs" / str(self.name)
        return Path(self.storage_path) / str(self.name)

    def levels(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.synthetic_levels.split(","))


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def flag_name(field_name: str) -> str:
    return "--" + field_name.rstrip("_").replace("_", "-")


def _base_type(annotation: Any) -> type:
    """int | None -> int, etc. (annotations are strings under `from __future__ import annotations`)."""
    hint = typing.get_type_hints(TrainConfig)[annotation] if isinstance(annotation, str) else annotation
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


FIELD_TYPES = {name: _base_type(name) for name in FIELDS}


def default_value(name: str) -> Any:
    """The default of a field (a fresh copy of a list default)."""
    f = FIELDS[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of train.py. Defaults are suppressed so that only flags actually given override YAML."""
    parser = ArgumentParser(  # a bad flag: one line, exit status 2
        prog="train.py",
        description="Post-train a language model: SFT, DPO, Bradley-Terry reward models, GenRM-CoT verifiers.",
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file of settings (keys as field names, '-' or '_'); flags win over it.")
    parser.add_argument("--print-config", action="store_true", help="Print the resolved config as YAML and exit.")
    for name, f in FIELDS.items():
        kind = FIELD_TYPES[name]
        text = f"{f.metadata['help']} (default: {default_value(name)})"
        kwargs: dict[str, Any] = {"help": text.replace("%", "%%"), "dest": name}  # argparse %-formats help
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:  # repeat the flag: --reward math --reward format
            kwargs.update(action="append", type=str, metavar=name.upper())
        else:
            kwargs["type"] = kind
            kwargs["metavar"] = name.rstrip("_").upper()
        parser.add_argument(flag_name(name), **kwargs)
    return parser


class ConfigError(ValueError):
    """A user error in the configuration; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = [redact(p) for p in problems]  # a message may quote a value that holds a secret
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


def _number(value: Any) -> int | float | None:
    """A YAML number, or a string that spells a finite one: PyYAML follows YAML 1.1, which reads ``1e-5`` (no dot)
    as a string. None for anything else (booleans included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        for parse in (int, float):
            try:
                number = parse(value.strip())
            except ValueError:
                continue
            return number if math.isfinite(number) else None
    return None


def _coerce_yaml_value(key: str, value: Any, source: str) -> tuple[Any, str | None]:
    """Check a YAML value against the field's type; return (value, problem or None)."""
    kind = FIELD_TYPES[key]
    if value is None:
        return None, None
    if kind is bool and not isinstance(value, bool):
        return value, f"{source}: '{key}' must be true or false, got {value!r}"
    if kind is int:
        number = _number(value)
        if number is None or number != int(number):
            return value, f"{source}: '{key}' must be an integer, got {value!r}"
        value = int(number)
    if kind is float:
        number = _number(value)
        if number is None:
            return value, f"{source}: '{key}' must be a number, got {value!r}"
        value = float(number)
    if kind is str:
        value = str(value)
    if typing.get_origin(kind) is list:  # a list, or one value standing for a list of one
        value = value if isinstance(value, list) else [value]
        if not value or not all(isinstance(v, str) for v in value):
            return value, f"{source}: '{key}' must be a list of text values, got {value!r}"
    choices = FIELDS[key].metadata.get("choices")
    if choices and value not in choices:
        return value, f"{source}: '{key}' must be one of {', '.join(choices)}, got {value!r}"
    return value, None


def load_yaml(path: str) -> tuple[dict[str, Any], list[str]]:
    """Read a YAML config file; returns the values and the problems found (unknown keys, wrong types)."""
    p = Path(path)
    if not p.is_file():
        return {}, [f"--config: file not found: {path}"]
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        return {}, [f"{path}: not valid YAML: {exc}"]
    if not isinstance(raw, dict):
        return {}, [f"{path}: must be a mapping of setting: value, got {type(raw).__name__}"]
    values, problems = {}, []
    known = {n.rstrip("_") for n in FIELDS}
    for key, value in raw.items():
        norm = str(key).replace("-", "_")
        name = norm + "_" if norm + "_" in FIELDS else norm
        if name not in FIELDS:
            close = difflib.get_close_matches(norm, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{path}: unknown key '{key}'{hint}")
            continue
        value, problem = _coerce_yaml_value(name, value, path)
        if problem:
            problems.append(problem)
            continue  # keep the default so the other checks can still run
        values[name] = value
    return values, problems


class Problems(list):
    """Messages naming what is wrong with a config; ``need(cond, message)`` adds the message when cond is false."""

    def need(self, cond: bool, message: str) -> None:
        if not cond:
            self.append(message)


def validate(cfg: TrainConfig) -> list[str]:
    """Every contradiction or out-of-range value in ``cfg``, as messages naming the flags."""
    problems = Problems()
    need = problems.need

    for key in ("train_percentile", "test_percentile"):
        value = getattr(cfg, key)
        need(0 < value <= 100, f"{flag_name(key)} must be in (0, 100], got {value}")
    for key in ("train_dataset_length", "test_dataset_length", "checkpoint_every_n_steps", "max_time_minutes"):
        value = getattr(cfg, key)
        need(value is None or value > 0, f"{flag_name(key)} must be positive, got {value}")
    for key in ("batch_size", "accumulate_grad_batches", "max_length", "num_workers", "checkpoint_frequency",
                "check_val_every_n_epoch", "log_every_n_steps", "max_new_tokens"):
        need(getattr(cfg, key) >= 1, f"{flag_name(key)} must be at least 1, got {getattr(cfg, key)}")
    for key in ("warmup_steps", "val_generate_samples", "num_sanity_val_steps", "roundoff", "max_failures"):
        need(getattr(cfg, key) >= 0, f"{flag_name(key)} must be 0 or more, got {getattr(cfg, key)}")
    need(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
    need(0 <= cfg.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    need(0 < cfg.test_size < 1, f"--test-size must be in (0, 1), got {cfg.test_size}")
    need(cfg.ckpt_to_keep >= 1 or cfg.ckpt_to_keep == -1, f"--ckpt-to-keep must be at least 1 (or -1: keep all), got {cfg.ckpt_to_keep}")
    need(cfg.max_epochs >= 1 or cfg.max_steps >= 1, "--max-epochs and --max-steps cannot both be below 1: nothing would train")
    need(cfg.max_steps == -1 or cfg.max_steps >= 1, f"--max-steps must be -1 or at least 1, got {cfg.max_steps}")
    need(cfg.beta > 0, f"--beta must be positive, got {cfg.beta}")
    need(cfg.lambda_ >= 0, f"--lambda must be 0 or more, got {cfg.lambda_}")
    need(1 <= cfg.verifier_k_min <= cfg.verifier_k_max,
         f"need 1 <= --verifier-k-min <= --verifier-k-max, got {cfg.verifier_k_min} and {cfg.verifier_k_max}")
    need(cfg.verifier_tau >= 0, f"--verifier-tau must be 0 or more, got {cfg.verifier_tau}")
    need(cfg.verifier_temperature >= 0, f"--verifier-temperature must be 0 or more, got {cfg.verifier_temperature}")
    objective = get_objective(cfg.training_type)
    if not objective.needs_reference(cfg):
        need(cfg.ref_model_name is None, f"--ref-model-name is for a run with a reference model (dpo; rloo or "
                                         f"grpo with --kl-coef above 0), not this {cfg.training_type} run")
        need(not cfg.precompute_ref_logps, f"--precompute-ref-logps is for a training type with a reference model "
                                           f"(dpo), not {cfg.training_type}")
    if objective.check is not None:
        problems += objective.check(cfg)
    need(objective.online or cfg.updates_per_rollout == 1,
         f"--updates-per-rollout is for online RL (rloo, grpo), not {cfg.training_type}")
    try:
        need(all(1 <= lv <= 4 for lv in cfg.levels()), f"--synthetic-levels must be levels 1-4, got {cfg.synthetic_levels!r}")
    except ValueError:
        problems.append(f"--synthetic-levels must be comma-separated integers, got {cfg.synthetic_levels!r}")
    if cfg.sanity_train:
        need(cfg.test_percentile == 100, "--sanity-train validates on the training set, so --test-percentile has no effect: drop one of them")
        need(cfg.test_dataset_length is None, "--sanity-train validates on the training set, so --test-dataset-length has no effect: drop one of them")
        need(cfg.test_dataset_name is None, "--sanity-train validates on the training set, so --test-dataset-name has no effect: drop one of them")
    if cfg.name is not None:
        need(re.fullmatch(r"[A-Za-z0-9._-]+", cfg.name) is not None and cfg.name not in (".", ".."),
             f"--name may hold only letters, digits, '.', '_' and '-', got {cfg.name!r}")
    # A secret given as a flag would be printed and saved with the config: refused, naming the flag, not the value.
    problems += secret_flag_problems({flag_name(k): getattr(cfg, k) for k in FIELDS})
    problems += distribution_problems(cfg)
    if cfg.calculate_win_rate:
        need(cfg.win_rate_baseline is not None and cfg.win_rate_judge is not None,
             "--calculate-win-rate needs --win-rate-baseline (an inference.py output) and --win-rate-judge")
        need(cfg.win_rate_baseline is None or Path(cfg.win_rate_baseline).is_file(),
             f"--win-rate-baseline {cfg.win_rate_baseline}: no such file")
        need(objective.validate is validate_answers,
             f"--calculate-win-rate judges generated answers, which --training-type {cfg.training_type} does not "
             "generate: use sft or dpo")
    if not cfg.use_ray:  # a Ray driver may have no GPU: its workers check their own machine (hardware_problems)
        problems += hardware_problems(cfg)
    return problems


def model_folder_problems(cfg: TrainConfig) -> list[str]:
    """The model flags that name a local folder which is not a model folder (``models.model_folder_problem``). A
    local run checks them before it writes or loads anything (``train.run``; a Ray job's workers, as they load);
    not in ``validate``: an example config names the model of an earlier stage, made later."""
    from models import model_folder_problem

    judge = cfg.win_rate_judge if cfg.win_rate_judge and not cfg.win_rate_judge.startswith("api") else None
    names = {"model_name": cfg.model_name, "ref_model_name": cfg.ref_model_name, "win_rate_judge": judge}
    return [p for key, name in names.items() if name and (p := model_folder_problem(name, flag_name(key)))]


def distribution_problems(cfg: TrainConfig) -> list[str]:
    """Strategy, precision, worker and storage settings that do not combine, as messages naming the flags."""
    problems = Problems()
    need = problems.need

    fp8 = cfg.precision.startswith("transformer-engine")
    need(cfg.state_dict_type == "full" or cfg.strategy == "fsdp", "--state-dict-type sharded needs --strategy fsdp")
    need(not (fp8 and cfg.strategy in ("fsdp", "deepspeed")),
         f"--precision {cfg.precision} with --strategy {cfg.strategy}: Lightning's Transformer Engine plugin works with "
         "--strategy ddp (or auto) only, since FSDP and DeepSpeed bring their own precision plugins; use --strategy ddp, "
         "or --precision bf16-mixed with FSDP/DeepSpeed")
    need(not fp8 or cfg.use_gpu, f"--precision {cfg.precision} runs FP8 on NVIDIA GPUs (H100/Ada): drop --no-use-gpu")
    need(cfg.strategy != "deepspeed" or cfg.use_gpu, "--strategy deepspeed needs GPUs (drop --no-use-gpu); on CPU use ddp "
         "or fsdp")
    need(cfg.max_failures >= -1, f"--max-failures must be -1 (always restart) or more, got {cfg.max_failures}")
    need(cfg.max_failures == 0 or cfg.use_ray, "--max-failures restarts Ray workers after a failure: add --use-ray")
    need(cfg.accelerator_type is None or cfg.use_ray, "--accelerator-type picks Ray workers' GPUs: add --use-ray")
    need(not is_remote(cfg.storage_path) or cfg.use_ray,
         f"--storage-path {cfg.storage_path}: object stores are written by Ray jobs; add --use-ray, or train to a local "
         "folder and copy it up")
    if cfg.resume_from_checkpoint not in (None, "last") and not is_remote(cfg.resume_from_checkpoint):
        need(Path(cfg.resume_from_checkpoint).exists(), f"--resume-from-checkpoint {cfg.resume_from_checkpoint}: no such file or folder")
    if cfg.overwrite and cfg.resume_from_checkpoint is not None:
        ckpt, run = cfg.resume_from_checkpoint, cfg.storage_dir
        if ckpt != "last" and not is_remote(ckpt) and not is_remote(run):
            ckpt, run = str(Path(ckpt).resolve()), str(Path(run).resolve())
        need(ckpt != "last" and not (ckpt + "/").startswith(run.rstrip("/") + "/"),
             f"--overwrite removes the checkpoints of run {cfg.name}, so it cannot also resume from one of them "
             f"(--resume-from-checkpoint {cfg.resume_from_checkpoint}): drop one of the two")
    return problems


def hardware_problems(cfg: TrainConfig) -> list[str]:
    """What this machine lacks for ``cfg``: CUDA, Transformer Engine, DeepSpeed. Checked before any model loads,
    on the machine that trains (here, or on each Ray worker)."""
    import importlib.util

    import torch

    problems = []
    where = "this Ray worker" if cfg.use_ray else "this machine"
    if cfg.use_gpu and not torch.cuda.is_available():
        problems.append(f"--use-gpu (or --accelerator-type / a transformer-engine precision / --strategy deepspeed) needs "
                        f"CUDA, and PyTorch sees no CUDA device on {where}" + ("; on CPU use --strategy ddp or fsdp"
                                                                               if cfg.strategy == "deepspeed" else ""))
    if cfg.precision.startswith("transformer-engine") and importlib.util.find_spec("transformer_engine") is None:
        problems.append(f"--precision {cfg.precision} needs NVIDIA Transformer Engine, not installed on {where}: "
                        "pip install -r requirements-gpu.txt (or --precision bf16-mixed)")
    if cfg.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        problems.append(f"--strategy deepspeed needs DeepSpeed, not installed on {where}: pip install -r requirements-gpu.txt")
    return problems


def resolve(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """Build the config from defaults < YAML < flags; raise ConfigError listing every problem."""
    args = build_parser().parse_args(argv)
    given = vars(args)
    values: dict[str, Any] = {}
    problems: list[str] = []
    if given.get("config"):
        values, problems = load_yaml(given["config"])
    values.update({k: v for k, v in given.items() if k in FIELDS})
    cfg = TrainConfig(**values)
    if cfg.num_workers > 1 and not cfg.use_ray and cfg.name is None:
        problems.append("--num-workers above 1 without --use-ray starts that many processes here, which must share one "
                        "run folder: give --name")
    gpu_only = cfg.accelerator_type or cfg.precision.startswith("transformer-engine") or cfg.strategy == "deepspeed"
    if gpu_only and cfg.use_gpu is None:
        cfg.use_gpu = True  # GPU accelerator types, FP8 and DeepSpeed exist only on GPUs (our users' commands omit --use-gpu)
    elif cfg.use_gpu is None:  # a local run takes this machine's GPU; a Ray driver's own hardware says nothing of its workers
        import torch

        cfg.use_gpu = not cfg.use_ray and torch.cuda.is_available()
    if cfg.name is None:
        cfg.name = f"{cfg.training_type}-{time.strftime('%Y%m%d-%H%M%S')}"
    for key, value in get_objective(cfg.training_type).defaults.items():  # unset settings the objective decides
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg, args


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (flag spellings as keys), secrets redacted."""
    data = {flag_name(name)[2:]: getattr(cfg, name) for name in FIELDS}
    return redact(yaml.safe_dump(data, sort_keys=False))


def save(cfg: TrainConfig, folder: Path) -> Path:
    """Write the resolved config beside the run's checkpoints (atomically: a crash leaves the old one)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
    return path


def reference_markdown() -> str:
    """docs/configuration.md: every field of ``TrainConfig`` as its flag, YAML key, type, default and help, grouped as
    the class groups them (its ``# Group.`` comments). ``python config.py`` rewrites the file; a test fails when the
    file is stale."""
    import inspect

    groups: dict[str, list[str]] = {}
    group = "General"
    for line in inspect.getsource(TrainConfig).splitlines():
        stripped = line.strip()
        if stripped.startswith("# "):
            group = stripped[2:].rstrip(".")
        name = stripped.split(":", 1)[0]
        if name in FIELDS and ": " in stripped and "=" in stripped:
            groups.setdefault(group, []).append(name)
    out = ["# Configuration reference", "",
           "Every setting of `train.py`, generated from `config.TrainConfig` by `python config.py` (a test fails when this",
           "file is stale). Each is a flag (booleans also take `--no-...`) and a key of a `--config` YAML file (written",
           "with `-` or `_`); defaults < YAML < flags. `python train.py --config run.yaml --print-config` prints the",
           "resolved values.", ""]
    for title, names in groups.items():
        out += [f"## {title}", "", "| flag | YAML key | type | default | what it does |", "|---|---|---|---|---|"]
        for name in names:
            f = FIELDS[name]
            kind = FIELD_TYPES[name].__name__
            choices = f.metadata.get("choices")
            if choices:
                kind = " \\| ".join(f"`{c}`" for c in choices)
            default = "none" if default_value(name) is None else f"`{default_value(name)}`"
            text = f.metadata["help"].replace("|", "\\|")
            out.append(f"| `{flag_name(name)}` | `{name.rstrip('_')}` | {kind} | {default} | {text} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    target = Path(__file__).resolve().parent / "docs" / "configuration.md"
    target.write_text(reference_markdown())
    print(f"wrote {target}")
