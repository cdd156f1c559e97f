"""The objective registry: one typed ``Objective`` per ``--training-type``, the only place training types differ.

An objective names the rows it reads (its data kind, ``custom_dataset.FORMATS``), how a row becomes features
(``tokenize``), how features become a batch (``collator``), the model it trains (``load_model``), and its loss:

    loss(model, batch, ref, **loss_args) -> (loss_sum, units, metrics)

``loss_sum`` is the loss summed over the batch's units (answer tokens, or pairs; one value per part for a loss of
several parts), ``units`` how many units the batch holds. The module divides by the units of the whole accumulation
window once, through ``total(loss_sum, units, **total_args)`` (``per_unit_mean``, or GenRM-CoT's
``losses.sft.genrm_loss``), so the loss functions under ``losses/`` stay pure and know nothing of batching.

``sft_verifier`` lives in ``extension/genrm.py`` and the online-RL types ``rloo`` and ``grpo`` in ``online_rl.py``:
the registry names where, and loads them only when used (so the core never imports ``extension/``). Adding a training type: docs/adding-a-training-type.md.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from collate_functions import PreferenceCollator, SFTCollator, target_count, tokenize_pair, tokenize_sft
from losses.bt import bt_loss
from losses.dpo import dpo_loss, sequence_logps
from losses.logprobs import token_logprobs
from losses.sft import sft_loss
from models import load_causal_lm, load_reward_model, sequence_rewards

# (loss summed over the batch's units, the units in the batch, metrics to log)
LossOutput = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]
# Rows of synthetic-math when no --train-dataset-length / --test-dataset-length caps them.
SYNTHETIC_TRAIN_ROWS, SYNTHETIC_TEST_ROWS = 5000, 200


def per_unit_mean(loss_sum: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """The loss per unit (answer token, or pair): loss_sum / units, 0 where there are no units."""
    return loss_sum / torch.where(units > 0, units, 1)


def validate_answers(module) -> list[dict]:
    """Validation by greedy answers to the validation prompts, checked against the references
    (``module.PostTrainingModule.validate_answers``: edit distance, accuracy, optional win rate)."""
    return module.validate_answers()


def synthetic_sizes(cfg) -> tuple[int, int]:
    """(train rows, test rows) of synthetic-math: the row caps, else the defaults."""
    return cfg.train_dataset_length or SYNTHETIC_TRAIN_ROWS, cfg.test_dataset_length or SYNTHETIC_TEST_ROWS


def synthetic_math_data(cfg, pairs: bool = False):
    """The built-in synthetic-math dataset: SFT rows, or preference pairs (correct vs one-slip solution)."""
    import synthetic_math

    return synthetic_math.build_dataset(*synthetic_sizes(cfg), seed=cfg.seed, levels=cfg.levels(), pairs=pairs)


@dataclass(frozen=True)
class Objective:
    """What one training type trains, and how (see the module docstring)."""

    name: str
    data_kind: str  # "sft", "preference" or "verifier": the row formats it reads
    tokenize: Callable[..., tuple[dict | None, str]]  # (tokenizer, row, max_length, overlong) -> (feature, status)
    collator: type[SFTCollator]  # (pad_token_id, multiple: the width multiple FP8 needs) -> features -> padded batch
    load_model: Callable[..., torch.nn.Module]  # (model name, dtype=...) -> the model trained
    loss: Callable[..., LossOutput]  # (model, batch, ref, **loss_args)
    units: Callable[[dict], int | tuple[int, ...]]  # what the loss of one feature sums over (per part)
    total: Callable[..., torch.Tensor] = per_unit_mean  # (loss_sum, units, **total_args) -> the scalar loss
    loss_args: dict[str, str] = field(default_factory=dict)  # keyword of ``loss`` -> TrainConfig field
    total_args: dict[str, str] = field(default_factory=dict)  # keyword of ``total`` -> TrainConfig field
    parts: tuple[str, ...] = ()  # names of a loss's parts ('<name>_loss' is logged for each), if several
    validate: Callable[[Any], list[dict]] | None = None  # (module) -> the generations of a validation pass
    # A frozen reference model (--ref-model-name, --precompute-ref-logps): always, or as a function of the config.
    uses_reference: bool | Callable[[Any], bool] = False
    synthetic: Callable[[Any], Any] = synthetic_math_data  # (cfg) -> DatasetDict for --dataset-name synthetic-math
    setup: Callable[[Any], Any] | None = None  # (module) -> run state passed to ``loss`` as ``rollouts`` (online RL)
    online: bool = False  # samples its own answers each step (online RL): --num-generations, --reward, ... apply
    defaults: dict[str, Any] = field(default_factory=dict)  # TrainConfig field -> its value when left unset (None)
    check: Callable[[Any], list[str]] | None = None  # (cfg) -> problems with this objective's own settings

    def needs_reference(self, cfg) -> bool:
        """Whether a run of ``cfg`` loads a frozen reference model."""
        return self.uses_reference(cfg) if callable(self.uses_reference) else self.uses_reference

    def bound_loss(self, cfg, **state: Any) -> Callable[..., LossOutput]:
        """``loss`` with its settings from ``cfg`` (and the run ``state`` of ``setup``): called as (model, batch, ref)."""
        return functools.partial(self.loss, **{k: getattr(cfg, f) for k, f in self.loss_args.items()}, **state)

    def bound_total(self, cfg) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``total`` with its settings from ``cfg``: called as (loss_sum, units)."""
        return functools.partial(self.total, **{k: getattr(cfg, f) for k, f in self.total_args.items()})


# ---- the losses of the core objectives: model + batch -> (loss_sum, units, metrics) -----------------------

def sft_objective_loss(model, batch: dict, ref=None) -> LossOutput:
    """Masked NLL summed over the answer tokens (``losses.sft.sft_loss``); units: answer tokens."""
    logps, mask = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss_sum, metrics = sft_loss(logps, mask, reduction="sum")
    return loss_sum, metrics["tokens"], {}


@torch.no_grad()
def reference_logps(ref_model, batch: dict) -> torch.Tensor:
    """log pi_ref(y | x) of every sequence of the batch, (N,): what a live reference computes each step and
    what --precompute-ref-logps computes once."""
    logps, mask = token_logprobs(ref_model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return sequence_logps(logps, mask)


def dpo_objective_loss(model, batch: dict, ref, beta: float) -> LossOutput:
    """DPO (``losses.dpo.dpo_loss``) summed over pairs: chosen rows 0..B-1 and rejected rows B..2B-1 in one forward
    pass of the policy; the reference's log-probs come precomputed in the batch or from the live ``ref``."""
    logps, mask = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    policy = sequence_logps(logps, mask)  # (2B,)
    ref_logps = batch["ref_logps"].to(policy) if "ref_logps" in batch else reference_logps(ref, batch)
    pairs = policy.shape[0] // 2
    loss_sum, metrics = dpo_loss(policy[:pairs], policy[pairs:], ref_logps[:pairs], ref_logps[pairs:], beta,
                                 reduction="sum")
    return loss_sum, torch.tensor(pairs), metrics


def bt_objective_loss(model, batch: dict, ref=None) -> LossOutput:
    """Bradley-Terry (``losses.bt.bt_loss``) summed over pairs of the reward model's scalar rewards."""
    rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])  # (2B,)
    pairs = rewards.shape[0] // 2
    loss_sum, metrics = bt_loss(rewards[:pairs], rewards[pairs:], reduction="sum")
    return loss_sum, torch.tensor(pairs), metrics


def one_pair(feature: dict) -> int:
    """A preference loss counts pairs."""
    return 1


def synthetic_pairs(cfg):
    return synthetic_math_data(cfg, pairs=True)


SFT = Objective(name="sft", data_kind="sft", tokenize=tokenize_sft, collator=SFTCollator, load_model=load_causal_lm,
                loss=sft_objective_loss, units=target_count, validate=validate_answers)
DPO = Objective(name="dpo", data_kind="preference", tokenize=tokenize_pair, collator=PreferenceCollator,
                load_model=load_causal_lm, loss=dpo_objective_loss, units=one_pair, loss_args={"beta": "beta"},
                validate=validate_answers, uses_reference=True, synthetic=synthetic_pairs)
BT = Objective(name="bt", data_kind="preference", tokenize=tokenize_pair, collator=PreferenceCollator,
               load_model=load_reward_model, loss=bt_objective_loss, units=one_pair, synthetic=synthetic_pairs)

# --training-type -> its Objective, or "module:NAME" where it is defined outside the core (loaded on first use).
OBJECTIVES: dict[str, Objective | str] = {
    "sft": SFT,
    "dpo": DPO,
    "bt": BT,
    "sft_verifier": "extension.genrm:OBJECTIVE",
    "rloo": "online_rl:RLOO",
    "grpo": "online_rl:GRPO",
}
TRAINING_TYPES = tuple(OBJECTIVES)


def get_objective(training_type: str) -> Objective:
    """The ``Objective`` of a --training-type (``KeyError`` naming the choices for an unknown one)."""
    if training_type not in OBJECTIVES:
        raise KeyError(f"unknown training type {training_type!r}; choose one of {', '.join(TRAINING_TYPES)}")
    entry = OBJECTIVES[training_type]
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = getattr(importlib.import_module(module), name)
    return entry
