"""How a run is spread over processes: Lightning strategies (DDP, FSDP, DeepSpeed) and the Ray Train job.

Without ``--use-ray``, Lightning runs ``--num-workers`` processes on this machine, and nothing here imports Ray.
With ``--use-ray``, ``run_on_ray`` hands the same training function (``train.run``) to a Ray Train ``TorchTrainer``
(Ray 2.60, Train V2 API): one worker per ``--num-workers``, each running ``train.run`` with Ray's Lightning strategy
and environment. Every checkpoint the run makes is reported to Ray (``RayCheckpointReport``), which copies it to
``--storage-path/--name`` (a folder or ``s3://bucket/prefix``) and keeps the newest ``--ckpt-to-keep``. A worker
restarted after a failure (``--max-failures``) and a later submission with the same ``--name`` both start from the
newest reported checkpoint (with ``--overwrite``, a submission removes the earlier run and starts over). Logs,
generations, the resolved config and the final model are copied beside them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl

import storage
from config import TrainConfig
from patches.lightning_fsdp_cpu import cpu_capable
from secrets_guard import redact_output

# What a run leaves in its local folder that belongs in --storage-path too (checkpoints go through Ray).
RUN_FILES = ("config.yaml", "tensorboard", "csv", "generations", "win_rate", "final_model")


def layer_classes(model) -> set[type]:
    """The model's repeated blocks (Hugging Face's ``_no_split_modules``, e.g. ``LlamaDecoderLayer``): FSDP shards
    and gathers the weights one block at a time."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def lightning_strategy(cfg: TrainConfig, model, on_ray: bool):
    """The Lightning strategy object for ``--strategy`` (Ray's subclass of it on a Ray worker)."""
    if on_ray:
        from ray.train.lightning import RayDDPStrategy, RayDeepSpeedStrategy, RayFSDPStrategy

        classes = {"ddp": RayDDPStrategy, "fsdp": cpu_capable(RayFSDPStrategy), "deepspeed": RayDeepSpeedStrategy}
    else:
        if cfg.strategy == "auto":
            return "auto"
        from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

        classes = {"ddp": DDPStrategy, "fsdp": cpu_capable(FSDPStrategy), "deepspeed": DeepSpeedStrategy}
    name = "ddp" if cfg.strategy == "auto" else cfg.strategy
    kwargs: dict = {}
    if name == "fsdp":
        # use_orig_params: DPO's frozen reference and the trained policy may share a sharding unit.
        kwargs = {"auto_wrap_policy": layer_classes(model) or None, "state_dict_type": cfg.state_dict_type,
                  "sharding_strategy": "FULL_SHARD", "use_orig_params": True}
    elif name == "deepspeed":
        # logging_batch_size_per_gpu: DeepSpeed's train_micro_batch_size_per_gpu, which Lightning otherwise reads off
        # the loader's batch_sampler (ours batches in its sampler, so that is None and the setup fails).
        kwargs = {"stage": cfg.zero_stage, "logging_batch_size_per_gpu": cfg.batch_size}
    return classes[name](**kwargs)


def full_state_dict(trainer: pl.Trainer, model) -> dict | None:
    """The trained model's full weights on rank 0 (None elsewhere), gathered from FSDP's shards or DeepSpeed ZeRO-3's
    partitions, whatever the checkpoint layout. Every rank must call it."""
    if isinstance(trainer.strategy, pl.strategies.FSDPStrategy):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        on_gpu = trainer.strategy.root_device.type == "cuda"  # offloading CPU-resident weights crashes (see patches/)
        with FSDP.state_dict_type(trainer.strategy.model, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=on_gpu, rank0_only=True)):
            state = trainer.strategy.model.state_dict()
        prefix = "model."  # the LightningModule's attribute holding the Hugging Face model
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    else:  # DeepSpeed: ZeRO-3 partitions every weight; stage 2 keeps them whole
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return state if trainer.is_global_zero else None


# ---- Ray ---------------------------------------------------------------------------------------------------------
def sync_run_files(cfg: TrainConfig) -> None:
    """Copy the run's logs, generations, config and final model from this worker's local folder to --storage-path
    (a no-op when that is the local folder itself)."""
    if not storage.is_remote(cfg.storage_dir):
        return
    for name in RUN_FILES:
        local = cfg.run_dir / name
        if local.exists():
            storage.upload(local, storage.join(cfg.storage_dir, name))


def pull_run_files(cfg: TrainConfig) -> None:
    """Before a resumed Ray run writes logs, fetch the earlier attempts' logs from --storage-path, so the new logs are
    added beside them (CSV logs get the next version number) rather than written over them. What this machine's
    scratch folder still holds of an earlier run of the name goes first: --storage-path alone says what the run is
    (after --overwrite, nothing)."""
    if not storage.is_remote(cfg.storage_dir):
        return
    for name in RUN_FILES:
        local = cfg.run_dir / name
        shutil.rmtree(local) if local.is_dir() else local.unlink(missing_ok=True)
    for name in ("tensorboard", "csv", "generations"):
        remote = storage.join(cfg.storage_dir, name)
        if storage.kind(remote) == "dir":
            storage.download(remote, cfg.run_dir / name)


class RayCheckpointReport(pl.Callback):
    """Saves a checkpoint where the local ModelCheckpoint would (every --checkpoint-frequency epochs, or every
    --checkpoint-every-n-steps steps) and reports it with the metrics to Ray Train, which uploads it to
    ``<storage>/<name>/checkpoint_<time>/checkpoint.ckpt`` and keeps the newest --ckpt-to-keep. Every rank saves
    (FSDP shards and DeepSpeed partitions come from all of them) and every rank reports, as Ray requires."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self._last_step = -1

    def _report(self, trainer: pl.Trainer) -> None:
        import ray.train

        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        # Staged in the run's own folder (the same filesystem as the run's checkpoints when --storage-path is a folder),
        # not the system temp folder: _worker removes what a killed save left there when the run next starts.
        folder = ray_staging(self.cfg, trainer.global_rank) / f"step-{trainer.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(folder / storage.CKPT_NAME)  # a collective: rank 0 writes (all ranks when sharded)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        metrics.update(step=trainer.global_step, epoch=trainer.current_epoch)
        if trainer.is_global_zero:
            sync_run_files(self.cfg)
        checkpoint = ray.train.Checkpoint.from_directory(folder) if any(folder.iterdir()) else None
        ray.train.report(metrics, checkpoint=checkpoint)
        trainer.strategy.barrier()
        shutil.rmtree(folder, ignore_errors=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.cfg.checkpoint_every_n_steps
        if n and trainer.global_step % n == 0 and trainer.global_step > 0:
            self._report(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.cfg.checkpoint_every_n_steps and (trainer.current_epoch + 1) % self.cfg.checkpoint_frequency == 0:
            self._report(trainer)


def ray_staging(cfg: TrainConfig, rank: int) -> Path:
    """Where a Ray worker writes a checkpoint before reporting it (Ray then copies it to --storage-path)."""
    return cfg.run_dir / ".ray-staging" / f"rank-{rank}"


def ray_trainer_setup(cfg: TrainConfig) -> dict:
    """Trainer arguments of a Ray worker: Ray's cluster environment, and the checkpoint report in place of the local
    ModelCheckpoint (Ray keeps the checkpoints)."""
    from ray.train.lightning import RayLightningEnvironment

    return {"plugins": [RayLightningEnvironment()], "callbacks": [RayCheckpointReport(cfg)], "devices": "auto"}


def _worker(config: dict, train_fn: Callable[..., dict]) -> None:
    """The training function of each Ray worker: check the machine, find the checkpoint to start from, and run
    ``train_fn`` (``train.run``, the same function a local run calls)."""
    import ray.train

    from config import ConfigError, hardware_problems

    redact_output()  # this worker's output, in the Ray job's logs too, passes through secrets_guard.redact
    cfg = TrainConfig(**config["cfg"])
    problems = hardware_problems(cfg)
    if problems:
        raise ConfigError(problems)
    rank = ray.train.get_context().get_world_rank()
    workdir = cfg.run_dir / "resume" / f"rank-{rank}"
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(ray_staging(cfg, rank), ignore_errors=True)  # a checkpoint a killed worker was writing
    ckpt = None
    latest = ray.train.get_checkpoint()  # this run's newest: after a restart, or a resubmission of the same --name
    if latest is not None:
        ckpt = storage.fetch_checkpoint(latest.to_directory(str(workdir / "latest")), workdir)
        print(f"resuming from the run's latest checkpoint {latest.path}", flush=True)
    elif cfg.resume_from_checkpoint not in (None, "last"):
        ckpt = storage.fetch_checkpoint(cfg.resume_from_checkpoint, workdir)
    elif cfg.resume_from_checkpoint == "last":
        raise ConfigError([f"--resume-from-checkpoint last: run {cfg.storage_dir} has no checkpoint yet"])
    if ckpt is not None and Path(ckpt).is_file():  # whole and readable, checked before the data and the model load
        storage.load_checkpoint(ckpt, mmap=True)    # (as a local run does; a sharded checkpoint is a folder)
    if rank == 0:
        pull_run_files(cfg)
    results = train_fn(cfg, ckpt=str(ckpt) if ckpt else None, on_ray=True)
    ray.train.report({k: v for k, v in (results.get("after") or results.get("test") or {}).items()})
    shutil.rmtree(workdir, ignore_errors=True)


def input_error(error: BaseException) -> BaseException | None:
    """The bad-input error (a config, data or file problem, which train.py reports in one line with exit status 2)
    that a worker failed with, if that is why the run failed; None for anything else (its traceback is kept)."""
    from config import ConfigError
    from custom_dataset import DataError

    for failure in getattr(error, "worker_failures", {}).values():
        cause = failure
        while cause is not None:
            if isinstance(cause, (ConfigError, DataError, OSError)):
                return cause
            cause = cause.__cause__
    return None


def continue_or_start_over(cfg: TrainConfig) -> None:
    """A Ray job whose --name already has a run folder continues that run from its newest checkpoint (Ray's rule for a
    resubmitted name, kept so that resubmitting after a failure or preemption just works); --overwrite removes the
    folder first, so the job starts over. Either way it says so, before Ray starts."""
    if storage.kind(cfg.storage_dir) != "dir":
        return
    if cfg.overwrite:
        storage.remove(cfg.storage_dir)
        print(f"--overwrite: removed {cfg.storage_dir}, the earlier run of this --name")
        return
    latest = storage.latest_ray_checkpoint(cfg.storage_dir)
    if latest is None:
        print(f"{cfg.storage_dir} exists but holds no Ray checkpoint: this job starts from scratch beside its files "
              "(--overwrite removes them first)")
        return
    unused = cfg.resume_from_checkpoint not in (None, "last")
    print(f"{cfg.storage_dir} holds a run of this --name: this job continues it from its newest checkpoint {latest}"
          + (f", not from --resume-from-checkpoint {cfg.resume_from_checkpoint}" if unused else "")
          + " (--overwrite starts it over)")


def run_on_ray(cfg: TrainConfig, train_fn: Callable[..., dict]) -> dict:
    """Run ``train_fn`` (``train.run``, passed in so that this module needs no import of train.py) on
    ``--num-workers`` Ray workers; returns the final metrics and where the run is stored."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`: the job's cluster, with its --working-dir
            ray.init()
        else:  # this machine (a running `ray start` cluster, else a new local one); workers import from this folder
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent)}})
    storage_path = cfg.storage_path if storage.is_remote(cfg.storage_path) else str(Path(cfg.storage_path).resolve())
    continue_or_start_over(cfg)
    resources = {"GPU": 1} if cfg.use_gpu else {"CPU": 1}
    trainer = TorchTrainer(
        functools.partial(_worker, train_fn=train_fn),
        train_loop_config={"cfg": dataclasses.asdict(dataclasses.replace(cfg, storage_path=storage_path))},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources,
                                     accelerator_type=cfg.accelerator_type, placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(
            name=cfg.name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None if cfg.ckpt_to_keep == -1 else cfg.ckpt_to_keep),
        ),
    )
    started = time.time()
    try:
        result = trainer.fit()  # Ray Train V2 raises a worker's failure (WorkerGroupError)
    except Exception as exc:
        if (bad_input := input_error(exc)) is None:
            raise
        raise bad_input from None
    if result.error is not None:
        raise input_error(result.error) or result.error
    metrics = {k: v for k, v in (result.metrics or {}).items() if k.startswith("val/")}
    print(f"ray run finished in {(time.time() - started) / 60:.1f} min; stored in {cfg.storage_dir}"
          + (f"; latest checkpoint {result.checkpoint.path}" if result.checkpoint else ""))
    return {"run_dir": cfg.storage_dir, "after": metrics,
            "checkpoint": result.checkpoint.path if result.checkpoint else None}
