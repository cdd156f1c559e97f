"""End-to-end invariants of training on the tiny model through train.run: batch 4 equals batch 1 with 4 accumulation
steps (the window loss and every gradient), a crash and a resume reproduce the uninterrupted loss curve step by step
(mid-epoch, same next batch), a short run lowers the validation loss, and --mode test evaluates without training."""

from __future__ import annotations

import csv

import pytest
import pytorch_lightning as pl
import torch
from conftest import Recorder

import train
from config import resolve


class Crash(pl.Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def _run(args, *extra, callbacks=()):
    cfg, _ = resolve([*args, *extra])
    return train.run(cfg, callbacks=list(callbacks))


@pytest.mark.slow
def test_batch_of_four_equals_four_accumulated_batches_of_one(tiny_run_args):
    """One optimizer step over the same 4 rows of different lengths: the window loss (sum of answer-token
    NLL / answer tokens of the window) and every gradient agree."""
    base = [*tiny_run_args, "--train-dataset-length", "4", "--val-generate-samples", "0", "--gradient-clip-val", "0"]
    big, small = Recorder(), Recorder()
    _run(base, "--batch-size", "4", "--name", "big", callbacks=[big])
    _run(base, "--batch-size", "1", "--accumulate-grad-batches", "4", "--name", "small", callbacks=[small])
    assert len(big.grads) == len(small.grads) == 1
    # Lightning reports each micro-batch's loss divided by the accumulation count; they add up to the window's loss.
    assert len(small.losses) == 4
    torch.testing.assert_close(torch.tensor(big.losses[0]), torch.tensor(sum(small.losses)), rtol=1e-5, atol=1e-6)
    for name, grad in big.grads[0].items():
        torch.testing.assert_close(small.grads[0][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_resume_after_a_crash_continues_the_same_loss_curve(tiny_run_args):
    """32 rows, batch 4: 8 steps per epoch, 16 in two epochs. A run crashes after step 11 (epoch 1, batch 3),
    before that step's checkpoint is written (Lightning runs checkpoint callbacks last), so it resumes from
    step 10, mid-epoch: steps 11-16 must have exactly the losses of an uninterrupted run."""
    base = [*tiny_run_args, "--max-epochs", "2", "--warmup-steps", "3", "--val-generate-samples", "0",
            "--checkpoint-every-n-steps", "1"]
    whole, first, second = Recorder(), Recorder(), Recorder()
    _run(base, "--name", "whole", callbacks=[whole])
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(base, "--name", "crashy", callbacks=[first, Crash(at_step=11)])
    _run(base, "--name", "crashy", "--resume-from-checkpoint", "last", callbacks=[second])
    assert len(whole.losses) == 16 and len(first.losses) == 11 and len(second.losses) == 6
    torch.testing.assert_close(torch.tensor(first.losses[:10] + second.losses), torch.tensor(whole.losses),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_short_run_lowers_validation_loss_and_keeps_checkpoints(tiny_run_args, tmp_path):
    results = _run(tiny_run_args, "--max-epochs", "3", "--eval-before-training", "--ckpt-to-keep", "2")
    assert results["after"]["val/loss"] < results["before"]["val/loss"] - 0.5
    assert {"val/accuracy", "val/edit_distance"} <= set(results["after"])
    checkpoints = sorted(p.name for p in (tmp_path / "runs" / "tiny" / "checkpoints").iterdir())
    assert checkpoints == ["epoch=1-step=16.ckpt", "epoch=2-step=24.ckpt", "last.ckpt"]
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "final_model" / "model.safetensors").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["train_config"]["name"] == "tiny"
    # --roundoff 4 (default) rounds logged metrics, but not the learning rate.
    rows = list(csv.DictReader(next((run_dir / "csv").glob("version_*/metrics.csv")).open()))
    losses = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    assert losses and all(abs(v - round(v, 4)) < 1e-6 for v in losses)
    assert any(0 < float(r["train/lr"]) < 3e-3 and abs(float(r["train/lr"]) - round(float(r["train/lr"]), 4)) > 1e-7
               for r in rows if r["train/lr"])

    # --mode test on the last checkpoint reproduces the final validation loss without training.
    tested = _run(tiny_run_args, "--mode", "test", "--resume-from-checkpoint", "last")
    assert tested["test"]["val/loss"] == pytest.approx(results["after"]["val/loss"], abs=1e-3)


def test_missing_checkpoint_is_a_clear_error(tiny_run_args, capsys):
    with pytest.raises(SystemExit):
        train.main([*tiny_run_args, "--resume-from-checkpoint", "last"])
    err = capsys.readouterr().err
    assert "--resume-from-checkpoint last:" in err and "tiny/checkpoints/last.ckpt: no checkpoint there" in err


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--strategy", "ddp"], ["--strategy", "fsdp"], ["--precision", "bf16-true"],
                                   ["--precision", "bf16-mixed"]], ids=["ddp", "fsdp", "bf16-true", "bf16-mixed"])
def test_strategies_and_precisions_train(tiny_run_args, flags):
    """Each setting trains to a finite validation loss below the untrained one (about ln 101 = 4.6 per char)."""
    results = _run(tiny_run_args, "--train-dataset-length", "16", "--val-generate-samples", "1", *flags)
    assert 0 < results["after"]["val/loss"] < 4.5


def _checkpoints(run_dir) -> tuple[list[str], str]:
    """The checkpoint files of a run folder and the one last.ckpt links to."""
    folder = run_dir / "checkpoints"
    return sorted(p.name for p in folder.iterdir()), (folder / "last.ckpt").resolve().name


@pytest.mark.slow
def test_a_rerun_of_a_name_continues_it_or_starts_it_over_never_both(tiny_run_args, tmp_path, capsys):
    """A second run of the same --name without --resume-from-checkpoint stops before writing anything, naming both
    ways on; --overwrite starts clean (no '-v1' files, last.ckpt on the new run); resuming continues in place (also
    from the run's first checkpoint, whose callback state predates last.ckpt); --mode test still reads the run."""
    base = [*tiny_run_args, "--val-generate-samples", "0", "--checkpoint-every-n-steps", "1", "--ckpt-to-keep", "-1"]
    run_dir = tmp_path / "runs" / "tiny"
    train.main([*base, "--max-steps", "2"])
    assert _checkpoints(run_dir) == (["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"], "epoch=0-step=2.ckpt")
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    capsys.readouterr()

    with pytest.raises(SystemExit) as stop:
        train.main([*base, "--max-steps", "3"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"{run_dir} already holds a run" in err
    assert "--resume-from-checkpoint last" in err and "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before  # nothing written, nothing removed

    (run_dir / "checkpoints" / "epoch=0-step=9.ckpt.partial-4242").write_bytes(b"a save cut short")
    train.main([*base, "--max-steps", "1", "--overwrite"])
    assert _checkpoints(run_dir) == (["epoch=0-step=1.ckpt", "last.ckpt"], "epoch=0-step=1.ckpt")
    assert len(list((run_dir / "csv").iterdir())) == 1  # the old run's logs went with it

    train.main([*base, "--max-steps", "3", "--resume-from-checkpoint", "last"])
    assert _checkpoints(run_dir) == (["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt", "last.ckpt"],
                                     "epoch=0-step=3.ckpt")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    tested = train.main([*base, "--mode", "test", "--resume-from-checkpoint", "last"])
    assert "val/loss" in tested["test"]


def test_overwrite_cannot_resume_from_the_checkpoints_it_removes(tiny_run_args, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main([*tiny_run_args, "--overwrite", "--resume-from-checkpoint", "last"])
    assert "--overwrite removes the checkpoints of run tiny" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_max_time_stops_training_then_validates_and_saves_the_final_model(tiny_run_args, tmp_path):
    """--max-time-minutes: Lightning's timer ends fit at the first step boundary past the limit (here 6 ms: after
    step 1 of 8), and the run still validates that model and saves it as final_model."""
    recorder = Recorder()
    results = _run(tiny_run_args, "--max-time-minutes", "0.0001", "--val-generate-samples", "0", callbacks=[recorder])
    assert len(recorder.losses) == 1
    assert "val/loss" in results["after"]
    assert (tmp_path / "runs" / "tiny" / "final_model" / "model.safetensors").is_file()


def test_max_time_must_be_positive(tiny_run_args, capsys):
    with pytest.raises(SystemExit):
        train.main([*tiny_run_args, "--max-time-minutes", "0"])
    assert "--max-time-minutes must be positive, got 0.0" in capsys.readouterr().err
