"""The Lightning module: optimisation, data loading, validation metrics and resumable data position."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from tqdm import tqdm

from collate_functions import (
    BatchPlan,
    LengthGroupedBatchSampler,
    PlannedDataset,
    SFTCollator,
    feature_length,
    generation_prompt_ids,
    loss_units,
)
from config import TrainConfig
from custom_dataset import CustomDataset
from losses.bt import bt_loss
from losses.dpo import dpo_loss, sequence_logps
from losses.logprobs import token_logprobs
from losses.sft import genrm_part_losses, sft_loss
from metrics import answers_match, auc, edit_distance, has_final_answer
from models import generate_from_prompts, sequence_rewards

# A step turns a batch into (mean loss, metrics to log, loss units in the batch: answer tokens or pairs).
Step = Callable[["PostTrainingModule", dict], tuple[torch.Tensor, dict, torch.Tensor]]

# The module restores the data position itself (see on_load_checkpoint), so Lightning's advice does not apply.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
# DPO's frozen reference is in eval mode on purpose (Lightning restores module modes after validation).
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")


def _first(plan: BatchPlan | dict) -> BatchPlan | dict:
    """collate_fn of the planned loaders: the dataset already returns a collated batch."""
    return plan


def sft_step(module: PostTrainingModule, batch: dict) -> tuple[torch.Tensor, dict, torch.Tensor]:
    logps, mask = token_logprobs(module.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss, metrics = sft_loss(logps, mask)
    return loss, {}, metrics["tokens"]


def dpo_step(module: PostTrainingModule, batch: dict) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Chosen rows 0..B-1 and rejected rows B..2B-1 in one forward pass of the policy."""
    logps, mask = token_logprobs(module.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    policy = sequence_logps(logps, mask)  # (2B,)
    ref = batch["ref_logps"].to(policy) if "ref_logps" in batch else reference_logps(module.ref_model, batch)
    pairs = policy.shape[0] // 2
    loss, metrics = dpo_loss(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], module.cfg.beta)
    return loss, metrics, torch.tensor(pairs)


@torch.no_grad()
def reference_logps(ref_model, batch: dict) -> torch.Tensor:
    """log pi_ref(y | x) of every sequence of the batch, (N,): what a live reference computes each step and
    what --precompute-ref-logps computes once."""
    logps, mask = token_logprobs(ref_model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return sequence_logps(logps, mask)


def bt_step(module: PostTrainingModule, batch: dict) -> tuple[torch.Tensor, dict, torch.Tensor]:
    rewards = sequence_rewards(module.model, batch["input_ids"], batch["attention_mask"])  # (2B,)
    pairs = rewards.shape[0] // 2
    loss, metrics = bt_loss(rewards[:pairs], rewards[pairs:])
    return loss, metrics, torch.tensor(pairs)


def verifier_step(module: PostTrainingModule, batch: dict) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """GenRM-CoT: the SFT loss of each part (verification rationales, correct solutions), (2,), with its tokens (2,);
    the module weighs them with ``losses.sft.genrm_combine``."""
    logps, mask = token_logprobs(module.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    losses, tokens = genrm_part_losses(logps, mask, batch["part"])
    return losses, {}, tokens


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 0 to 1 over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class PostTrainingModule(pl.LightningModule):
    """Wraps a Hugging Face causal LM and the datasets of one run.

    ``step``, ``generates`` ("answers": validation answers are generated and checked, "verdicts": verification
    rationales are sampled and scored, None: neither) and ``parts`` come from ``train.TRAINING_TYPES``. A step
    with ``parts`` returns one loss per part, each averaged over its own units, and ``combine`` weighs them.
    """

    def __init__(self, cfg: TrainConfig, model, tokenizer, train_set: CustomDataset, val_set: CustomDataset,
                 step: Step = sft_step, collator: SFTCollator | None = None, ref_model=None,
                 generates: str | None = "answers", parts: tuple[str, ...] | None = None,
                 combine: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.train_set, self.val_set = train_set, val_set
        self.step, self.generates = step, generates
        self.parts, self.combine = parts, combine
        self._val_sums = self._val_units = None  # per-part loss sums and units of the validation pass
        self._judges: dict = {}  # --calculate-win-rate's judge, loaded once (a plain dict: not a submodule)
        self.collator = collator or SFTCollator(tokenizer.pad_token_id)
        self.model.train()  # from_pretrained returns eval mode; Lightning expects the training mode at fit start
        self.ref_model = ref_model  # frozen; left out of checkpoints (rebuilt from the config on resume)
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        self._data_position: dict | None = None  # {"epoch", "batches"} consumed, saved in checkpoints
        self._resume_position: dict | None = None
        self._clock = 0.0
        self.last_generations: list[dict] = []
        self.last_validated_step: int | None = None

    # ---- data -------------------------------------------------------------------------------
    def _loader(self, dataset: CustomDataset, shuffle: bool, world: int, rank: int) -> torch.utils.data.DataLoader:
        sampler = LengthGroupedBatchSampler(
            lengths=[feature_length(f) for f in dataset.features],
            targets=[loss_units(f) for f in dataset.features],
            batch_size=self.cfg.batch_size,
            accumulate=self.cfg.accumulate_grad_batches if shuffle else 1,
            shuffle=shuffle, seed=self.cfg.seed, rank=rank, world_size=world,
        )
        if shuffle and self._resume_position:
            sampler.skip_batches(self._resume_position["epoch"], self._resume_position["batches"])
        return torch.utils.data.DataLoader(
            PlannedDataset(dataset.features, self.collator), sampler=sampler, batch_size=None, collate_fn=_first
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.train_set, True, self.trainer.world_size, self.trainer.global_rank)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.val_set, False, 1, 0)

    # ---- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self):
        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.cfg.lr,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: cosine_with_warmup(s, self.cfg.warmup_steps, total, self.cfg.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """FSDP clips the norm of the whole sharded gradient itself (Lightning's clipping cannot under FSDP: the
        trainer is built without it there, see train.build_trainer)."""
        if self.cfg.strategy == "fsdp":
            if self.cfg.gradient_clip_val:
                self.trainer.strategy.model.clip_grad_norm_(self.cfg.gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _log(self, name: str, value, exact: bool = False, **kwargs) -> None:
        """Log a metric rounded to --roundoff decimals (``exact`` for values like the learning rate)."""
        value = torch.as_tensor(value, dtype=torch.float32)
        self.log(name, value if exact else torch.round(value, decimals=self.cfg.roundoff), **kwargs)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, metrics, units = self.step(self, batch)
        # Lightning divides by the accumulation count and DDP averages over workers; undo both so the loss is
        # (sum over the batch's tokens or pairs) / (tokens or pairs in the whole window, all workers).
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size
        window = batch["window_units"].float() / scale
        objective = loss * units / torch.where(window > 0, window, 1)  # a part absent from the window adds 0
        self._data_position = {"epoch": self.current_epoch, "batches": batch_idx + 1}
        if self.parts:
            metrics = {**metrics, **{f"{name}_loss": loss[p].detach() for p, name in enumerate(self.parts) if units[p] > 0}}
            loss, objective = self.combine(loss), self.combine(objective)
        shown = loss.detach()
        if self.trainer.world_size > 1 and not self.parts:  # the loss of the whole step's batch, not this worker's share
            total = self.trainer.strategy.reduce(torch.stack([shown * units, units.to(shown)]), reduce_op="sum")
            shown = total[0] / total[1].clamp(min=1)
        self._log("train/loss", shown, prog_bar=True)
        for name, value in metrics.items():
            self._log(f"train/{name}", value)
        self._log("train/lr", self.lr_schedulers().get_last_lr()[0], exact=True)
        # Monitored by the checkpoint callback to keep the newest; counts this step (global_step is pre-increment here).
        self._log("trained_steps", self.global_step + 1)
        return objective

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._clock = time.perf_counter()

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        # Forward, backward and (at a window's end) the optimizer step of this batch; data loading excluded.
        self._log("train/tokens_per_s", batch["attention_mask"].sum() / (time.perf_counter() - self._clock))

    # ---- validation -------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = self._val_units = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, metrics, units = self.step(self, batch)
        if self.parts:  # summed per part; the epoch's per-part means are combined in on_validation_epoch_end
            sums, units = (loss * units).detach().double(), units.double()
            self._val_sums = sums if self._val_sums is None else self._val_sums + sums
            self._val_units = units if self._val_units is None else self._val_units + units
            return
        # Weighted by tokens (or pairs), the epoch mean is the mean over the whole split.
        n = int(units)
        self._log("val/loss", loss, batch_size=n, prog_bar=True, sync_dist=True)
        for name, value in metrics.items():
            self._log(f"val/{name}", value, batch_size=n, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.parts and self._val_sums is not None:
            means = (self._val_sums / self._val_units.clamp(min=1)).float()
            self._log("val/loss", self.combine(means), prog_bar=True)
            for p, name in enumerate(self.parts):
                self._log(f"val/{name}_loss", means[p])
        if self.trainer.sanity_checking:
            return
        self.last_validated_step = self.global_step
        if self.cfg.val_generate_samples == 0 or not self.generates:
            return
        if self.generates == "verdicts":
            with self.full_weights():
                self.validate_verdicts()
            return
        rows = self.val_set.rows[: self.cfg.val_generate_samples]
        with self.full_weights():
            answers = self.generate([r["messages"] for r in rows])
        has_final = has_final_answer(rows[0]["reference"])  # GSM8K or MATH format: a final answer to check
        self.last_generations = [
            {"prompt": r["messages"][-2]["content"], "reference": r["reference"], "generated": a,
             "edit_distance": edit_distance(a, r["reference"]), "correct": answers_match(a, r["reference"]) if has_final else None}
            for r, a in zip(rows, answers)
        ]
        self._log("val/edit_distance", sum(g["edit_distance"] for g in self.last_generations) / len(rows))
        if has_final:
            self._log("val/accuracy", sum(g["correct"] for g in self.last_generations) / len(rows), prog_bar=True)
        if self.cfg.calculate_win_rate:  # against --win-rate-baseline's answers, judged by --win-rate-judge
            from win_rate import validation_win_rate

            result = validation_win_rate([r["messages"][:-1] for r in rows], answers, self.cfg.win_rate_baseline,
                                         self.cfg.win_rate_judge, self.cfg.run_dir / "win_rate", self._judges)
            self._log("val/win_rate", result["win_rate"], prog_bar=True)
        self._save_generations(self.last_generations)

    def _save_generations(self, rows: list[dict]) -> None:
        """Every generated answer or verdict on disk, to read what the metrics summarise."""
        if self.trainer.is_global_zero:
            path = self.cfg.run_dir / "generations" / f"step-{self.global_step}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(g) + "\n" for g in rows))

    def validate_verdicts(self) -> None:
        """The validation verifier score, served as Best-of-N serves it: p("Yes") averaged over adaptive K sampled
        rationales (--verifier-k-min, --verifier-k-max, --verifier-tau) on the first --val-generate-samples
        verification rows, against their labels (AUC, accuracy at 0.5, mean per label, mean rationales used)."""
        from extension.verifier import score_prompts

        rows = [r for r in self.val_set.rows if r["part"] == "verify"][: self.cfg.val_generate_samples]
        if not rows:
            return
        cfg = self.cfg
        scores = score_prompts(
            self.model, self.tokenizer, [generation_prompt_ids(self.tokenizer, r["messages"]) for r in rows],
            k_min=cfg.verifier_k_min, k_max=cfg.verifier_k_max, tau=cfg.verifier_tau,
            temperature=cfg.verifier_temperature, max_new_tokens=cfg.max_new_tokens,
            prompts_per_batch=max(1, cfg.batch_size * 4 // cfg.verifier_k_min), seed=cfg.seed, progress=cfg.verbose)
        labels = [r["label"] == "Yes" for r in rows]
        values = [s.score for s in scores]
        self.last_generations = [
            {"prompt": r["messages"][0]["content"], "label": r["label"], "score": s.score, "normalized": s.normalized,
             "p_yes": s.p_yes, "rationales": s.rationales, "reference": r["reference"]} for r, s in zip(rows, scores)
        ]
        self._log("val/verifier_accuracy", sum((v >= 0.5) == y for v, y in zip(values, labels)) / len(rows), prog_bar=True)
        self._log("val/verifier_rationales", sum(len(s.p_yes) for s in scores) / len(scores))
        area = auc(values, labels)
        if area is not None:  # both labels present
            self._log("val/verifier_auc", area)
        for label, name in ((True, "yes"), (False, "no")):
            group = [v for v, y in zip(values, labels) if y == label]
            if group:
                self._log(f"val/verifier_score_{name}", sum(group) / len(group))
        self._save_generations(self.last_generations)

    def full_weights(self) -> contextlib.AbstractContextManager:
        """Generation calls the model outside its training forward: under FSDP its weights are gathered first (on
        every rank; nothing is written back), elsewhere they are whole already."""
        if self.cfg.strategy != "fsdp":
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(self.trainer.strategy.model, writeback=False)

    def generate(self, conversations: list[list[dict]]) -> list[str]:
        """Greedy answers to the last user turn of each conversation (its final assistant turn is the reference)."""
        size = max(self.cfg.batch_size, 16)
        starts = range(0, len(conversations), size)
        return [answer for i in tqdm(starts, desc="generating validation answers", disable=not self.cfg.verbose, leave=False)
                for answer in generate_from_prompts(
                    self.model, self.tokenizer, [generation_prompt_ids(self.tokenizer, c) for c in conversations[i:i + size]],
                    self.cfg.max_new_tokens, do_sample=False)]

    # ---- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["train_config"] = dataclasses.asdict(self.cfg)
        # The latest validation metrics, for the model card of an export made without the run's logs (Ray, S3).
        checkpoint["val_metrics"] = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        if self._data_position is not None:
            checkpoint["data_position"] = dict(self._data_position)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resume_position = checkpoint.get("data_position")

    def state_dict(self, *args, **kwargs) -> dict:
        """The trained weights only: the frozen reference is rebuilt from --model-name/--ref-model-name."""
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if not k.startswith("ref_model.")}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.ref_model is not None:  # keep the reference's own weights
            state_dict = {**{f"ref_model.{k}": v for k, v in self.ref_model.state_dict().items()}, **state_dict}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


@torch.no_grad()
def precompute_reference_logps(ref_model, datasets: list[CustomDataset], collator, batch_size: int, cache: Path,
                               verbose: bool = True, autocast_bf16: bool = False) -> None:
    """Give every feature ``ref_logps`` = (log pi_ref(chosen | x), log pi_ref(rejected | x)), computed in one pass
    on the reference's device (``autocast_bf16`` as under --precision bf16-mixed), or read from ``cache``, a file
    keyed by reference model, precision and data, so training needs no reference model."""
    features = [f for d in datasets for f in d.features]
    if cache.is_file():
        values = torch.load(cache)
        print(f"reference log-probs read from {cache}")
    else:
        ref_model.eval()
        device = next(ref_model.parameters()).device
        values = torch.empty(len(features), 2, dtype=torch.float64)
        starts = range(0, len(features), batch_size)
        for i in tqdm(starts, desc="reference log-probs", disable=not verbose):
            batch = {k: v.to(device) for k, v in collator(features[i:i + batch_size]).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                seq = reference_logps(ref_model, batch).cpu()
            n = seq.shape[0] // 2
            values[i:i + n] = torch.stack([seq[:n], seq[n:]], dim=1).double()
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(values, cache.with_suffix(".tmp"))
        cache.with_suffix(".tmp").replace(cache)  # atomic: an interrupted pass leaves no half cache
    for feature, (chosen, rejected) in zip(features, values.tolist()):
        feature["ref_logps"] = (chosen, rejected)
