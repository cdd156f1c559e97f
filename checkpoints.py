"""How checkpoints are written: whole or not at all, and staged beside where they land.

Lightning 2.6 writes a checkpoint through fsspec's transaction, which stages it in the system temp folder and then
moves it: across filesystems the move is a copy, so a kill mid-save leaves a checkpoint-sized orphan in /tmp and a
torn file at the destination. ``AtomicCheckpointIO`` writes ``<name>.partial-<pid>`` in the destination's own folder
(same filesystem), flushes it to disk and renames it over the destination, which is atomic: a reader sees the old
file or the new one. ``AtomicLastLink`` moves ``last.ckpt`` to the newest checkpoint the same way (Lightning removes
the old link and then makes the new one, so a kill between the two leaves no last.ckpt). ``remove_staging`` deletes
what a killed save left, at the start of the run's next process.

DeepSpeed and FSDP's sharded layout write checkpoint folders themselves, outside the checkpoint IO: not covered here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

STAGING = ".partial-"  # <destination name>.partial-<pid>: a file (or folder) being written, renamed when whole


def staging_path(destination: Path) -> Path:
    """Where ``destination`` is written before its rename: beside it, named after this process."""
    return destination.with_name(f"{destination.name}{STAGING}{os.getpid()}")


def remove_staging(folder: Path) -> list[Path]:
    """Delete every staged file or folder (``*.partial-*``) under ``folder``, left by a process killed mid-save;
    returns what was deleted. Call it before this run writes anything there."""
    removed = sorted(folder.rglob(f"*{STAGING}*")) if folder.is_dir() else []
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, saving through a staged file beside the destination and an atomic rename."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # not a local file: Lightning's own way
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_path(path)
        try:
            with staging.open("wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staging, path)
        finally:
            staging.unlink(missing_ok=True)  # an exception mid-write (a kill -9 leaves it to remove_staging)


class AtomicLastLink(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``save_last="link"`` swaps ``last.ckpt`` atomically: the new link is made under a
    staging name and renamed over the old one, so last.ckpt always exists once made and always names a whole
    checkpoint. Overrides the private ``_link_checkpoint`` of pytorch_lightning 2.6; check it on upgrade."""

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            link = Path(linkpath)
            staging = staging_path(link)
            staging.unlink(missing_ok=True)
            os.symlink(os.path.relpath(filepath, link.parent), staging)
            if link.is_dir() and not link.is_symlink():  # a copied sharded checkpoint: a rename cannot replace it
                shutil.rmtree(link)
            os.replace(staging, link)
        trainer.strategy.barrier()
