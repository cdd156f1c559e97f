"""The Lightning module: optimisation, data loading, validation metrics and resumable data position."""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from tqdm import tqdm

from collate_functions import (
    BatchPlan,
    LengthGroupedBatchSampler,
    PlannedDataset,
    SFTCollator,
    generation_prompt_ids,
    target_count,
)
from config import TrainConfig
from custom_dataset import CustomDataset
from losses.logprobs import token_logprobs
from metrics import answers_match, edit_distance

# The module restores the data position itself (see on_load_checkpoint), so Lightning's advice does not apply.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def _first(plan: BatchPlan | dict) -> BatchPlan | dict:
    """collate_fn of the planned loaders: the dataset already returns a collated batch."""
    return plan


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 0 to 1 over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class PostTrainingModule(pl.LightningModule):
    """Wraps a Hugging Face causal LM and the datasets of one run."""

    def __init__(self, cfg: TrainConfig, model, tokenizer, train_set: CustomDataset, val_set: CustomDataset,
                 loss_fn: Callable):
        super().__init__()
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.train_set, self.val_set = train_set, val_set
        self.loss_fn = loss_fn  # from train.TRAINING_TYPES: (token_logps, mask, normalizer) -> (loss, metrics)
        self.model.train()  # from_pretrained returns eval mode; Lightning expects the training mode at fit start
        self.collator = SFTCollator(tokenizer.pad_token_id)
        self._data_position: dict | None = None  # {"epoch", "batches"} consumed, saved in checkpoints
        self._resume_position: dict | None = None
        self._clock = 0.0
        self.last_generations: list[dict] = []
        self.last_validated_step: int | None = None

    # ---- data -------------------------------------------------------------------------------
    def _loader(self, dataset: CustomDataset, shuffle: bool, world: int, rank: int) -> torch.utils.data.DataLoader:
        sampler = LengthGroupedBatchSampler(
            lengths=[len(f["input_ids"]) for f in dataset.features],
            targets=[target_count(f) for f in dataset.features],
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

    def _log(self, name: str, value, exact: bool = False, **kwargs) -> None:
        """Log a metric rounded to --roundoff decimals (``exact`` for values like the learning rate)."""
        value = torch.as_tensor(value, dtype=torch.float32)
        self.log(name, value if exact else torch.round(value, decimals=self.cfg.roundoff), **kwargs)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logps, mask = token_logprobs(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        # Lightning divides by the accumulation count and DDP averages over workers; undo both so the
        # loss is (sum of answer-token NLL) / (answer tokens in the window, all workers).
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size
        loss, metrics = self.loss_fn(logps, mask, batch["window_tokens"].float() / scale)
        self._data_position = {"epoch": self.current_epoch, "batches": batch_idx + 1}
        self._log("train/loss", metrics["nll"], prog_bar=True)
        self._log("train/lr", self.lr_schedulers().get_last_lr()[0], exact=True)
        self._log("step", self.global_step)  # monitored by the checkpoint callback to keep the newest
        return loss

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._clock = time.perf_counter()

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        # Forward, backward and (at a window's end) the optimizer step of this batch; data loading excluded.
        self._log("train/tokens_per_s", batch["attention_mask"].sum() / (time.perf_counter() - self._clock))

    # ---- validation -------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logps, mask = token_logprobs(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        _, metrics = self.loss_fn(logps, mask)
        # Weighted by tokens, the epoch mean is the token-level mean NLL over the whole split.
        self._log("val/loss", metrics["nll"], batch_size=int(metrics["tokens"]), prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.last_validated_step = self.global_step
        if self.cfg.val_generate_samples == 0:
            return
        rows = self.val_set.rows[: self.cfg.val_generate_samples]
        answers = self.generate([r["messages"] for r in rows])
        has_final = "####" in rows[0]["reference"]  # GSM8K format: a final numeric answer to check
        self.last_generations = [
            {"prompt": r["messages"][-2]["content"], "reference": r["reference"], "generated": a,
             "edit_distance": edit_distance(a, r["reference"]), "correct": answers_match(a, r["reference"]) if has_final else None}
            for r, a in zip(rows, answers)
        ]
        self._log("val/edit_distance", sum(g["edit_distance"] for g in self.last_generations) / len(rows))
        if has_final:
            self._log("val/accuracy", sum(g["correct"] for g in self.last_generations) / len(rows), prog_bar=True)
        if self.trainer.is_global_zero:  # every answer on disk, to read what the metrics summarise
            path = self.cfg.run_dir / "generations" / f"step-{self.global_step}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(g) + "\n" for g in self.last_generations))

    @torch.no_grad()
    def generate(self, conversations: list[list[dict]]) -> list[str]:
        """Greedy answers to the last user turn of each conversation (its final assistant turn is the reference)."""
        tok = self.tokenizer
        stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} - {None, tok.unk_token_id}
        was_training = self.model.training
        self.model.eval()
        out = []
        size = max(self.cfg.batch_size, 16)
        starts = range(0, len(conversations), size)
        for i in tqdm(starts, desc="generating validation answers", disable=not self.cfg.verbose, leave=False):
            prompts = [generation_prompt_ids(tok, c) for c in conversations[i:i + size]]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
            attention = torch.zeros_like(ids)
            for row, p in enumerate(prompts):  # left padding, so every answer starts at column `width`
                ids[row, width - len(p):] = torch.tensor(p)
                attention[row, width - len(p):] = 1
            generated = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=attention.to(self.device), do_sample=False,
                max_new_tokens=self.cfg.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=sorted(stop),
            )
            out += tok.batch_decode(generated[:, width:], skip_special_tokens=True)
        self.model.train(was_training)
        return [a.strip() for a in out]

    # ---- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["train_config"] = dataclasses.asdict(self.cfg)
        if self._data_position is not None:
            checkpoint["data_position"] = dict(self._data_position)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resume_position = checkpoint.get("data_position")
