"""Post-train a language model: one entrypoint for SFT, DPO, Bradley-Terry reward models and GenRM-CoT verifiers.

Local run (the README's main job: SFT of the embedded SmolLM2-135M-Instruct on synthetic math):
    python train.py --config configs/sft-smollm2-math.yaml

Any setting can be given as a flag, flags winning over the YAML file:
    python train.py --model-name smollm2-135m-instruct --dataset-name synthetic-math --training-type sft \
        --batch-size 8 --lr 1e-5 --max-epochs 1 --storage-path runs --name sft-demo

Resume the same run after a crash, or evaluate its checkpoint:
    python train.py --config configs/sft-smollm2-math.yaml --name sft-demo --resume-from-checkpoint last
    python train.py --config configs/sft-smollm2-math.yaml --name sft-demo --mode test --resume-from-checkpoint last

Print the resolved configuration without running anything:
    python train.py --config configs/sft-smollm2-math.yaml --print-config
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from datetime import timedelta

import stopping
from checkpoints import AtomicCheckpointIO, AtomicLastLink, remove_staging, staging_path
from collate_functions import INVALID_PROMPT, ChatTemplateError
from config import ConfigError, TrainConfig, model_folder_problems, redact, resolve, save, to_yaml
from custom_dataset import CustomDataset, DataError
from distributed import RUN_FILES, full_state_dict, sync_run_files
from errors import fail
from losses.logprobs import compile_head
from models import load_causal_lm
from objectives import Objective, get_objective
from precision import convert_to_fp8, enable_activation_checkpointing
from secrets_guard import redact_output
from storage import StorageError, fetch_checkpoint, load_checkpoint
from storage import join as storage_join

log = logging.getLogger("train")

# What each --training-type trains (its data kind, tokenizer, collator, model, loss and validation) is its
# Objective, in the one table objectives.OBJECTIVES; this file only runs it.


def prepare_data(cfg: TrainConfig, tokenizer):
    """Load, select and tokenize the train and validation sets; report rows dropped or truncated. --mode test
    tokenizes only the validation set (its training rows are never used)."""
    from tqdm import tqdm

    tokenize = get_objective(cfg.training_type).tokenize
    train_set, val_set = CustomDataset.splits(cfg)
    for split, dataset in (("train", train_set), ("test", val_set)):  # the test split validates
        if split == "test" and dataset is train_set:
            break
        if split == "train" and cfg.mode == "test" and dataset is not val_set:
            continue
        kept, features, outcome = [], [], Counter()
        for row in tqdm(dataset.rows, desc=f"tokenizing {split}", disable=not cfg.verbose, leave=False):
            stopping.check()
            feature, status = tokenize(tokenizer, row, cfg.max_length, cfg.overlong)
            if status == INVALID_PROMPT and cfg.invalid_rows == "error":
                raise DataError(f"{cfg.dataset_name} [{split}] row {row['row']}: the prompt alone fills --max-length "
                                f"{cfg.max_length}: raise --max-length, or --invalid-rows skip leaves such rows out")
            outcome[status] += 1
            if feature is not None:
                kept.append(row)
                features.append(feature)
        dataset.rows, dataset.features = kept, features
        summary = ", ".join(f"{n} {status}" for status, n in sorted(outcome.items()))
        print(f"{split}: {len(features)} rows kept ({summary})")
        if not features:
            if cfg.overlong == "drop" and any(status.startswith("dropped") for status in outcome):
                advice = "raise it, or use --overlong truncate to keep each row's first --max-length tokens"
            else:  # only prompts that fill --max-length: truncating cuts answers, never prompts
                advice = "the prompts alone fill it, which --overlong truncate cannot change: raise --max-length"
            raise ConfigError([f"--max-length {cfg.max_length}: no {split} row fits ({summary}); {advice}"])
    return train_set, val_set


def reference_model(cfg: TrainConfig, tokenizer, datasets: list[CustomDataset], collator):
    """The frozen reference of an objective that uses one (DPO: --ref-model-name, else the starting model), or None
    once its log-probs are precomputed into the features (--precompute-ref-logps): then only the policy stays in
    memory."""
    import torch

    from models import cache_dir, model_fingerprint
    from module import precompute_reference_logps

    name = cfg.ref_model_name or cfg.model_name
    if not cfg.precompute_ref_logps:
        return load_causal_lm(name)
    unique = list({id(d): d for d in datasets}.values())  # --sanity-train: train and validation are one object
    key = hashlib.sha256(json.dumps({
        "model": model_fingerprint(name), "tokenizer": tokenizer.name_or_path, "precision": cfg.precision,
        "features": [[f["chosen_input_ids"], f["chosen_labels"], f["rejected_input_ids"], f["rejected_labels"]]
                     for d in unique for f in d.features],
    }).encode()).hexdigest()[:24]
    cache = cache_dir() / "ref_logps" / f"{key}.pt"
    ref = None
    if not cache.is_file():  # a cached pass needs no reference model at all
        # The same numbers as a live reference would give: the run's device and precision.
        dtype = torch.bfloat16 if cfg.precision == "bf16-true" else torch.float32
        ref = load_causal_lm(name, dtype=dtype).to("cuda" if cfg.use_gpu else "cpu")
    precompute_reference_logps(ref, unique, collator, cfg.batch_size * 2, cache, verbose=cfg.verbose,
                               autocast_bf16=cfg.precision == "bf16-mixed")
    return None


def checkpoint_path(cfg: TrainConfig) -> str | None:
    """The local checkpoint --resume-from-checkpoint names ('last' = newest of this run; a file, a run folder or a
    Ray checkpoint, local or on S3: ``storage.fetch_checkpoint``), checked to exist and to be readable."""
    ckpt = cfg.resume_from_checkpoint
    if ckpt is None:
        return None
    path = cfg.run_dir / "checkpoints" / "last.ckpt" if ckpt == "last" else ckpt
    try:
        found = fetch_checkpoint(str(path), cfg.run_dir / "resume")
        if found.is_file():  # a truncated or corrupt file fails here, before the data and the model load
            load_checkpoint(found, mmap=True)
        return str(found)
    except StorageError as exc:
        where = str(exc) if str(exc).startswith(str(ckpt)) else f"{ckpt}: {exc}"  # the message may name the path
        raise ConfigError([f"--resume-from-checkpoint {where}"]) from None


def claim_run_dir(cfg: TrainConfig) -> None:
    """Make the folder of --name this run's, before anything is written or loaded (a local run, in its launching
    process). A second run of a name must say what it does with the first: continue it (--resume-from-checkpoint)
    or start it over (--overwrite, which removes its checkpoints, logs and final model first); training from scratch
    into the old folder would mix the two (new checkpoints beside the old ones, last.ckpt of the old run). What a
    process killed mid-save left (``checkpoints.remove_staging``) is removed either way."""
    found = [name for name in ("checkpoints", *RUN_FILES) if (cfg.run_dir / name).exists()]
    if found and cfg.overwrite:
        for name in found:
            path = cfg.run_dir / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        print(f"--overwrite: removed {', '.join(found)} of the earlier run from {cfg.run_dir}")
    elif found and cfg.resume_from_checkpoint is None:
        if any((cfg.run_dir / "checkpoints").glob("*.ckpt")):
            how = "continue it with --resume-from-checkpoint last, start it over with --overwrite"
        else:
            how = "it has no checkpoint to continue from (--resume-from-checkpoint last): start it over with --overwrite"
        raise ConfigError([f"--name {cfg.name}: {cfg.run_dir} already holds a run of that name ({', '.join(found)}); "
                           f"{how} (removes its checkpoints, logs and final model first), or choose another --name"])
    for path in remove_staging(cfg.run_dir):
        print(f"removed {path}, left by a save that was cut short")


def kept_on_stop(cfg: TrainConfig) -> str:
    """What a local run stopped by SIGTERM or SIGINT keeps, for the line ``stopping`` prints on the way out."""
    last = cfg.run_dir / "checkpoints" / "last.ckpt"
    if cfg.mode == "test":
        return f"{cfg.run_dir} as it was (--mode test writes no checkpoint)"
    if last.exists():
        return (f"the last complete checkpoint {last.resolve().name} in {last.parent} (continue with "
                "--resume-from-checkpoint last)")
    return f"no checkpoint yet in {cfg.run_dir} (start it again with --overwrite)"


def build_trainer(cfg: TrainConfig, model, callbacks: list | None = None, on_ray: bool = False):
    """The Lightning Trainer of a run: local checkpoints, or on a Ray worker, checkpoints reported to Ray."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from distributed import lightning_strategy, ray_trainer_setup
    from precision import lightning_plugin

    if on_ray:
        setup = ray_trainer_setup(cfg)
    else:
        every = {"every_n_train_steps": cfg.checkpoint_every_n_steps} if cfg.checkpoint_every_n_steps else {
            "every_n_epochs": cfg.checkpoint_frequency}
        checkpoint = AtomicLastLink(  # a ModelCheckpoint whose last.ckpt link is swapped atomically
            dirpath=cfg.run_dir / "checkpoints", filename="{epoch}-{step}", monitor="trained_steps", mode="max",
            save_top_k=cfg.ckpt_to_keep, save_last="link", **every,  # last.ckpt links the newest, no 2nd copy
            # The folder holds one run (claim_run_dir), so a name is never taken by another run: no '-v1' copies. (With
            # the counter, a run resumed from its first checkpoint, saved before last.ckpt existed, wrote last-v1.ckpt
            # and left last.ckpt on the old step.)
            enable_version_counter=False,
        )
        setup = {"plugins": [], "callbacks": [checkpoint], "devices": cfg.num_workers}
    plugin = lightning_plugin(cfg)  # Transformer Engine's FP8, which replaces the precision flag
    trainer = pl.Trainer(
        accelerator="gpu" if cfg.use_gpu else "cpu",
        devices=setup["devices"],
        strategy=lightning_strategy(cfg, model, on_ray),
        precision=None if plugin else cfg.precision,
        plugins=[*setup["plugins"], AtomicCheckpointIO(), *([plugin] if plugin else [])],  # checkpoints: whole or none
        max_epochs=cfg.max_epochs,
        max_steps=cfg.max_steps,
        max_time=None if cfg.max_time_minutes is None else timedelta(minutes=cfg.max_time_minutes),
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        gradient_clip_val=None if cfg.strategy == "fsdp" else cfg.gradient_clip_val or None,  # FSDP: the module clips
        check_val_every_n_epoch=cfg.check_val_every_n_epoch,
        num_sanity_val_steps=cfg.num_sanity_val_steps,
        log_every_n_steps=cfg.log_every_n_steps,
        logger=[TensorBoardLogger(cfg.run_dir, name="tensorboard", version=""), CSVLogger(cfg.run_dir, name="csv", flush_logs_every_n_steps=cfg.log_every_n_steps)],
        callbacks=[*setup["callbacks"], *(callbacks or [])],
        enable_checkpointing=not on_ray,  # on Ray, RayCheckpointReport saves and Ray keeps the checkpoints
        enable_progress_bar=cfg.verbose,
        enable_model_summary=cfg.verbose,
        use_distributed_sampler=False,  # the length-grouped sampler shards by rank itself
        deterministic=False,
    )
    if on_ray:
        from ray.train.lightning import prepare_trainer

        prepare_trainer(trainer)
    return trainer


def report(title: str, metrics: dict, roundoff: int) -> dict:
    shown = {k: round(float(v), roundoff) for k, v in metrics.items() if k.startswith("val/")}
    print(f"{title}: " + ", ".join(f"{k}={v}" for k, v in sorted(shown.items())))
    return shown


def run(cfg: TrainConfig, callbacks: list | None = None, ckpt: str | None = None, on_ray: bool = False) -> dict:
    """Train (or test) as ``cfg`` says, in this process (one of --num-workers; on a Ray worker with ``on_ray``, where
    ``ckpt`` is the checkpoint Ray resumes from). Returns the validation metrics before/after and the run folder."""
    import pytorch_lightning as pl

    from models import load_tokenizer
    from module import PostTrainingModule

    if not on_ray and (problems := model_folder_problems(cfg)):
        raise ConfigError(problems)
    if not on_ray and int(os.environ.get("LOCAL_RANK", 0)) == 0:  # not a process Lightning launched for DDP
        claim_run_dir(cfg)
    stopping.keep(lambda: kept_on_stop(cfg))
    ckpt = ckpt if on_ray else checkpoint_path(cfg)
    pl.seed_everything(cfg.seed, verbose=False)
    print(redact(f"resolved config:\n{to_yaml(cfg)}") if cfg.verbose else f"run folder: {cfg.storage_dir}")
    tokenizer = load_tokenizer(cfg.model_name)
    train_set, val_set = prepare_data(cfg, tokenizer)
    objective: Objective = get_objective(cfg.training_type)
    # The reference first: a --precompute-ref-logps pass then runs without the policy in memory.
    ref_model = None
    if objective.needs_reference(cfg):
        ref_model = reference_model(cfg, tokenizer, [train_set, val_set], objective.collator(tokenizer.pad_token_id))
    model = objective.load_model(cfg.model_name)
    fp8 = "te" if cfg.precision.startswith("transformer-engine") else None
    if fp8:
        print(convert_to_fp8(model, fp8).summary())  # layers FP8 cannot take are named, not skipped silently
    if cfg.activation_checkpointing:
        print(f"activation checkpointing: {enable_activation_checkpointing(model, fp8)} layers recompute in backward")
    if cfg.compile_head:
        compile_head(model)
    save(cfg, cfg.run_dir)  # once the data and the model have loaded: bad input leaves no run folder behind
    module = PostTrainingModule(cfg, model, tokenizer, train_set, val_set, objective, ref_model=ref_model)
    trainer = build_trainer(cfg, model, callbacks, on_ray)
    results: dict = {"run_dir": cfg.storage_dir}
    started = time.time()
    if cfg.mode == "test":
        results["test"] = report("test", trainer.validate(module, ckpt_path=ckpt, verbose=False)[0], cfg.roundoff)
        return results
    if cfg.eval_before_training and ckpt is None:
        results["before"] = report("before training", trainer.validate(module, verbose=False)[0], cfg.roundoff)
    trainer.fit(module, ckpt_path=ckpt)
    if module.last_validated_step != trainer.global_step:  # fit ended between two validations
        trainer.validate(module, verbose=False)
    results["after"] = report("after training", trainer.callback_metrics, cfg.roundoff)
    results["train_minutes"] = round((time.time() - started) / 60, 2)
    final = cfg.run_dir / "final_model"
    weights = full_state_dict(trainer, model) if cfg.strategy in ("fsdp", "deepspeed") else None  # gathered from the shards
    if trainer.is_global_zero:
        staged = staging_path(final)  # written whole, then renamed: a kill mid-save leaves no torn final_model
        model.save_pretrained(staged, state_dict=weights)
        tokenizer.save_pretrained(staged)
        shutil.rmtree(final, ignore_errors=True)  # a resumed run's earlier one
        staged.rename(final)
        if on_ray:
            sync_run_files(cfg)
        print(f"final model (Hugging Face format): {storage_join(cfg.storage_dir, 'final_model')}")
    for sample in module.last_generations[:3]:
        if "generated" in sample:
            print(f"--- {sample['prompt']}\n    generated: {sample['generated']!r}\n    reference: {sample['reference']!r}")
        else:  # a verdict
            print(f"--- {sample['prompt']}\n    label {sample['label']}, score {sample['score']:.3f}, "
                  f"first rationale: {sample['rationales'][0]!r}")
    return results


@stopping.stop_on_signals("train.py")
def main(argv: list[str] | None = None) -> dict | None:
    redact_output()  # everything printed or logged from here on passes through secrets_guard.redact
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg, args = resolve(argv)
        if args.__dict__.get("print_config"):
            print(to_yaml(cfg), end="")
            return None
        if cfg.use_ray:
            from distributed import run_on_ray

            stopping.release()  # Ray's driver handles SIGTERM and SIGINT itself, and stops its workers
            print(redact(f"resolved config:\n{to_yaml(cfg)}") if cfg.verbose else f"run folder: {cfg.storage_dir}")
            return run_on_ray(cfg, run)
        return run(cfg)
    except (ConfigError, DataError, ChatTemplateError, OSError) as exc:  # bad input: one line, exit status 2
        fail("train.py", exc)


if __name__ == "__main__":
    main()
