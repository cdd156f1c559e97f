"""The Lightning module: optimisation, data loading, validation metrics and resumable data position."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from tqdm import tqdm

import stopping
from collate_functions import BatchPlan, LengthGroupedBatchSampler, PlannedDataset, feature_length, generation_prompt_ids
from config import TrainConfig
from custom_dataset import CustomDataset
from metrics import answers_match, edit_distance, has_final_answer
from models import token_bar
from objectives import Objective, get_objective, reference_logps
from precision import sequence_multiple
from sampling import generate_from_prompts
from secrets_guard import redact_data

# The module restores the data position itself (see on_load_checkpoint), so Lightning's advice does not apply.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
# DPO's frozen reference is in eval mode on purpose (Lightning restores module modes after validation).
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")


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
    """Wraps a Hugging Face model and the datasets of one run; what is trained, and how, is its ``Objective``
    (``objectives.py``; by default the one of ``cfg.training_type``). The objective's loss returns the loss summed
    over a batch's units; the module divides once, by the units of the whole accumulation window."""

    def __init__(self, cfg: TrainConfig, model, tokenizer, train_set: CustomDataset, val_set: CustomDataset,
                 objective: Objective | None = None, ref_model=None):
        super().__init__()
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.train_set, self.val_set = train_set, val_set
        self.objective = objective or get_objective(cfg.training_type)
        # Online RL's run state (sampler, rewards; ``online_rl.Rollouts``), saved in checkpoints; None elsewhere.
        self.rollouts = self.objective.setup(self) if self.objective.setup is not None else None
        state = {"rollouts": self.rollouts} if self.rollouts is not None else {}
        self.loss_fn, self.total = self.objective.bound_loss(cfg, **state), self.objective.bound_total(cfg)
        self._val_sums = self._val_units = None  # loss sums and units of the validation pass (per part)
        self._window: list[tuple[torch.Tensor, dict, float]] = []  # the accumulation window's micro-batches so far (``_step_log``)
        self._judges: dict = {}  # --calculate-win-rate's judge, loaded once (a plain dict: not a submodule)
        self.collator = self.objective.collator(tokenizer.pad_token_id, sequence_multiple(cfg.precision))
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
            targets=[self.objective.units(f) for f in dataset.features],
            batch_size=self.cfg.batch_size,
            accumulate=self.cfg.accumulate_grad_batches if shuffle else 1,
            shuffle=shuffle, seed=self.cfg.seed, rank=rank, world_size=world,
            repeat=self.cfg.updates_per_rollout if shuffle else 1,
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

    def log_metric(self, name: str, value, exact: bool = False, **kwargs) -> None:
        """Log a metric rounded to --roundoff decimals (``exact`` for values like the learning rate)."""
        value = torch.as_tensor(value, dtype=torch.float32)
        self.log(name, value if exact else torch.round(value, decimals=self.cfg.roundoff), **kwargs)

    def _log_parts(self, prefix: str, loss_sum: torch.Tensor, units: torch.Tensor) -> None:
        """'<part>_loss' of each part present (a loss of several parts: its per-part means)."""
        for p, name in enumerate(self.objective.parts):
            if units[p] > 0:
                self.log_metric(f"{prefix}/{name}_loss", loss_sum[p] / units[p])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss_sum, units, metrics = self.loss_fn(self.model, batch, self.ref_model)
        units = units.to(loss_sum)
        # Lightning divides by the accumulation count and DDP averages over workers; undo both, so the objective is
        # (sum over the batch's tokens or pairs) / (tokens or pairs in the whole window, all workers).
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size
        objective = self.total(loss_sum * scale, batch["window_units"].to(loss_sum))
        self._data_position = {"epoch": self.current_epoch, "batches": batch_idx + 1}
        shown = torch.stack([loss_sum.detach(), units])
        if self.trainer.world_size > 1:  # the loss of the whole step's batch, not this worker's share
            shown = self.trainer.strategy.reduce(shown, reduce_op="sum")
        step = self._step_log(batch_idx, shown, metrics, len(batch["input_ids"]))
        if step is not None:  # the accumulation window's last micro-batch: log the optimizer step's numbers
            shown, metrics = step
            self.log_metric("train/loss", self.total(shown[0], shown[1]), prog_bar=True)
            self._log_parts("train", shown[0], shown[1])
            for name, value in metrics.items():
                self.log_metric(f"train/{name}", value)
            self.log_metric("train/lr", self.lr_schedulers().get_last_lr()[0], exact=True)
        # Monitored by the checkpoint callback to keep the newest; counts this step (global_step is pre-increment here).
        self.log_metric("trained_steps", self.global_step + 1)
        return objective

    def _step_log(self, batch_idx: int, shown: torch.Tensor, metrics: dict, rows: int
                  ) -> tuple[torch.Tensor, dict] | None:
        """What an optimizer step logs, once its accumulation window's last micro-batch has run (None before): the
        loss over all its micro-batches (their loss sums and units added), and each metric's mean over the
        micro-batches that report it, weighted by their ``rows`` (the max for ``*_max``). Lightning keeps one value
        per step, so logging each micro-batch would leave only the last one's (one length group of the step's
        prompts)."""
        metrics = {k: torch.as_tensor(v).detach().float() for k, v in metrics.items()}
        self._window.append((shown, metrics, float(rows)))
        accumulate = self.trainer.accumulate_grad_batches
        if (batch_idx + 1) % accumulate and batch_idx + 1 != self.trainer.num_training_batches:
            return None
        window, self._window = self._window, []
        step = {}
        for name in dict.fromkeys(k for _, m, _ in window for k in m):
            values = torch.stack([m[name].to(shown.device) for _, m, _ in window if name in m])
            weights = torch.tensor([w for _, m, w in window if name in m], device=values.device)
            step[name] = values.amax() if name.endswith("_max") else (values * weights).sum() / weights.sum()
        return torch.stack([s for s, _, _ in window]).sum(0), step

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._clock = time.perf_counter()
        if self.rollouts is not None:  # online RL samples here, outside the strategy's forward (FSDP needs that)
            self.rollouts.prepare(self.model, batch)

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        # Forward, backward and (at a window's end) the optimizer step of this batch; data loading excluded.
        self.log_metric("train/tokens_per_s", batch["attention_mask"].sum() / (time.perf_counter() - self._clock))
        self.stop_if_requested()  # after the checkpoint callbacks: a checkpoint due at this step is written first

    def stop_if_requested(self) -> None:
        """Raise ``stopping.Stopped`` once SIGTERM or SIGINT was received, on every worker at the same step (one of
        them stopping alone would leave the others waiting in a collective)."""
        stop = stopping.requested()
        if self.trainer.world_size > 1:
            stop = self.trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            raise stopping.Stopped("stop requested")

    # ---- validation -------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = self._val_units = None

    def on_validation_batch_start(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.rollouts is not None:
            self.rollouts.prepare(self.model, batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.stop_if_requested()
        loss_sum, units, metrics = self.loss_fn(self.model, batch, self.ref_model)
        # Summed over the split (per part), so the epoch's loss is the mean over every token (or pair) of it.
        sums, units = loss_sum.detach().double(), units.double()
        self._val_sums = sums if self._val_sums is None else self._val_sums + sums
        self._val_units = units if self._val_units is None else self._val_units + units
        for name, value in metrics.items():  # the split's mean over its units (its max for a "*_max")
            self.log_metric(f"val/{name}", value, batch_size=max(1, int(units.sum())), sync_dist=True,
                            reduce_fx="max" if name.endswith("_max") else "mean")

    def on_validation_epoch_end(self) -> None:
        if self._val_sums is not None:
            self.log_metric("val/loss", self.total(self._val_sums, self._val_units).float(), prog_bar=True)
            self._log_parts("val", self._val_sums, self._val_units)
        if self.trainer.sanity_checking:
            return
        self.last_validated_step = self.global_step
        if self.cfg.val_generate_samples == 0 or self.objective.validate is None:
            return
        with self.full_weights():
            generations = self.objective.validate(self)
        if generations:
            self.last_generations = generations
            self._save_generations(generations)

    def validate_answers(self) -> list[dict]:
        """Greedy answers to the first --val-generate-samples validation prompts: edit distance to the reference,
        accuracy where the reference has a final answer (GSM8K or MATH format), win rate with --calculate-win-rate."""
        rows = self.val_set.rows[: self.cfg.val_generate_samples]
        answers = self.generate([r["messages"] for r in rows])
        has_final = has_final_answer(rows[0]["reference"])  # GSM8K or MATH format: a final answer to check
        generations = [
            {"prompt": r["messages"][-2]["content"], "reference": r["reference"], "generated": a,
             "edit_distance": edit_distance(a, r["reference"]), "correct": answers_match(a, r["reference"]) if has_final else None}
            for r, a in zip(rows, answers)
        ]
        self.log_metric("val/edit_distance", sum(g["edit_distance"] for g in generations) / len(rows))
        if has_final:
            self.log_metric("val/accuracy", sum(g["correct"] for g in generations) / len(rows), prog_bar=True)
        if self.cfg.calculate_win_rate:  # against --win-rate-baseline's answers, judged by --win-rate-judge
            from win_rate import validation_win_rate

            result = validation_win_rate([r["messages"][:-1] for r in rows], answers, self.cfg.win_rate_baseline,
                                         self.cfg.win_rate_judge, self.cfg.run_dir / "win_rate", self._judges)
            self.log_metric("val/win_rate", result["win_rate"], prog_bar=True)
        return generations

    def _save_generations(self, rows: list[dict]) -> None:
        """Every generated answer or verdict on disk, to read what the metrics summarise."""
        if self.trainer.is_global_zero:
            path = self.cfg.run_dir / "generations" / f"step-{self.global_step}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(g) + "\n" for g in redact_data(rows)))  # data may hold secrets

    def full_weights(self) -> contextlib.AbstractContextManager:
        """Generation calls the model outside its training forward: under FSDP its weights are gathered first (on
        every rank; nothing is written back), elsewhere they are whole already."""
        if self.cfg.strategy != "fsdp":
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(self.trainer.strategy.model, writeback=False)

    def sampling_sync(self):
        """For a sampler whose ranks decode different lengths (``sampling.PrefixSampler``'s ``sync``): under FSDP with
        several ranks every forward pass gathers weights from all of them, so each decoding step asks whether any
        rank still decodes; None elsewhere (each rank's forward passes are its own)."""
        if self.cfg.strategy != "fsdp" or self._trainer is None or self.trainer.world_size < 2:
            return None
        strategy = self.trainer.strategy
        return lambda more: bool(strategy.reduce_boolean_decision(more, all=False))

    def graph_decoding(self) -> bool:
        """Whether the shared-prefix samplers decode as CUDA graphs (--cuda-graphs): on a CUDA device, where each rank's
        forward passes are its own (not under FSDP with several ranks, see ``sampling_sync``)."""
        return self.cfg.cuda_graphs and self.device.type == "cuda" and self.sampling_sync() is None

    def generate(self, conversations: list[list[dict]]) -> list[str]:
        """Greedy answers to the last user turn of each conversation (its final assistant turn is the reference)."""
        size = max(self.cfg.batch_size, 16)
        answers: list[str] = []
        with token_bar("generating validation answers", self.cfg.verbose) as bar:
            for i in range(0, len(conversations), size):
                answers += generate_from_prompts(
                    self.model, self.tokenizer, [generation_prompt_ids(self.tokenizer, c) for c in conversations[i:i + size]],
                    self.cfg.max_new_tokens, progress=bar, do_sample=False)
                bar.set_postfix_str(f"{len(answers)}/{len(conversations)} answers")
        return answers

    # ---- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["train_config"] = dataclasses.asdict(self.cfg)
        # The latest validation metrics, for the model card of an export made without the run's logs (Ray, S3).
        checkpoint["val_metrics"] = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        if self._data_position is not None:
            checkpoint["data_position"] = dict(self._data_position)
        if self.rollouts is not None:  # every rank's sampler state: a resumed run draws the same answers on each
            checkpoint["rollouts"] = {"ranks": self._every_rank(self.rollouts.state_dict())}
        # Every string the checkpoint holds (this config, the checkpoint callback's paths, ...) passes through redact.
        checkpoint.update({key: redact_data(value) for key, value in checkpoint.items()})

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resume_position = checkpoint.get("data_position")
        if self.rollouts is not None and "rollouts" in checkpoint:
            ranks = checkpoint["rollouts"].get("ranks", [checkpoint["rollouts"]])  # before 2026-11-27: rank 0's only
            world, rank = (self.trainer.world_size, self.trainer.global_rank) if self._trainer is not None else (1, 0)
            if len(ranks) == world:
                self.rollouts.load_state_dict(ranks[rank])
            else:
                warnings.warn(f"the checkpoint's rollout state is from {len(ranks)} workers and this run has {world}: "
                              "each worker's sampler starts a new random stream (the rollouts differ from the run's)",
                              stacklevel=2)

    def _every_rank(self, state):
        """``state`` of every rank, in rank order (a collective: Lightning saves checkpoints on every rank)."""
        if self._trainer is None or self.trainer.world_size < 2:
            return [state]
        states = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(states, state)
        return states

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
            stopping.check()  # the cache is written whole at the end, or not at all
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
