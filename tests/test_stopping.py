"""SIGTERM and SIGINT stop every phase within seconds and keep what is whole (stopping.py), and checkpoints are
written whole or not at all (checkpoints.py): a generation and a verifier decode loop stop at their next token step,
train.py stops while it generates validation answers with its checkpoints intact, inference.py keeps resumable rows,
and a save killed with SIGKILL leaves the old checkpoint, its staging file beside it and nothing in the temp folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

import stopping
from checkpoints import AtomicCheckpointIO, AtomicLastLink, remove_staging

ROOT = Path(__file__).resolve().parent.parent


class SignalAfter:
    """A stand-in progress bar that sends ``sig`` to this process at the ``at``-th token step it is told of."""

    def __init__(self, sig: int, at: int = 5):
        self.sig, self.at, self.steps = sig, at, 0

    def update(self, n: int) -> None:
        self.steps += 1
        if self.steps == self.at:
            os.kill(os.getpid(), self.sig)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from models import load_causal_lm, load_tokenizer

    return load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_generate_at_the_next_token_step(tiny, sig, code, capsys):
    from sampling import generate_from_prompts

    model, tokenizer = tiny
    handlers = {s: signal.getsignal(s) for s in stopping.SIGNALS}
    bar = SignalAfter(sig)

    @stopping.stop_on_signals("a-script")
    def main():
        stopping.keep("what the test says")
        # min_new_tokens: no end-of-turn can end the generation before the signal does
        generate_from_prompts(model, tokenizer, [[5, 6, 7], [8, 9]], 500, progress=bar, do_sample=False, min_new_tokens=500)

    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == code
    assert bar.steps <= bar.at + 1  # the step after the signal, not the 500th
    assert f"a-script: stopped by {signal.Signals(sig).name}; kept what the test says" in capsys.readouterr().err
    assert {s: signal.getsignal(s) for s in stopping.SIGNALS} == handlers and not stopping.requested()


def test_the_verifier_decode_loop_stops_at_its_next_step(tiny):
    from collate_functions import generation_prompt_ids
    from extension.verifier import RationaleSampler

    model, tokenizer = tiny
    prompt = generation_prompt_ids(tokenizer, [{"role": "user", "content": "Is 2 + 2 = 4?"}, {"role": "assistant", "content": ""}])
    bar = SignalAfter(signal.SIGTERM)

    @stopping.stop_on_signals("a-script")
    def main():
        RationaleSampler(model, tokenizer, [prompt], max_new_tokens=400, temperature=1.0, progress=bar)([0], 4)

    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 143 and bar.steps == bar.at


def test_a_second_signal_stops_at_once():
    """Between two checks (loading a model, say) the first signal only sets the flag; the second does not wait."""

    @stopping.stop_on_signals("a-script")
    def main():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        assert stopping.requested()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)

    started = time.time()
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 130 and time.time() - started < 10


class Output:
    """A child process's stdout and stderr together, read as they come (tqdm writes without newlines)."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.data = process, bytearray()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while chunk := self.process.stdout.read1(65536):
            self.data.extend(chunk)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while text.encode() not in self.data:
            if self.process.poll() is not None or time.time() > deadline:
                self.process.kill()
                pytest.fail(f"never printed {text!r}:\n{self.text[-3000:]}")
            time.sleep(0.05)

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")


def _start(*argv: str) -> tuple[subprocess.Popen, Output]:
    process = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return process, Output(process)


def _stop(process: subprocess.Popen, output: Output, sig: int = signal.SIGTERM) -> float:
    """Send ``sig``; returns how long the process took to exit."""
    sent = time.time()
    process.send_signal(sig)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running 60 s after {signal.Signals(sig).name}:\n{output.text[-3000:]}")
    return time.time() - sent


@pytest.mark.slow
def test_train_stops_on_sigterm_while_generating_validation_answers(tiny_run_args, tmp_path):
    """2 steps, a checkpoint after each, then validation answers of up to 900 tokens for 32 prompts: minutes of
    generation on 2 cores, which SIGTERM ends within seconds (exit 143), keeping both checkpoints whole."""
    args = [*tiny_run_args, "--train-dataset-length", "8", "--test-dataset-length", "32", "--val-generate-samples", "32",
            "--max-new-tokens", "900", "--checkpoint-every-n-steps", "1", "--ckpt-to-keep", "-1", "--verbose"]
    process, output = _start("train.py", *args)
    output.wait_for("generating validation answers", timeout=300)
    took = _stop(process, output)
    assert process.returncode == 143, output.text[-3000:]
    assert took < 20, f"took {took:.1f} s to stop"  # interpreter and Lightning teardown on a busy 2-core machine
    assert "train.py: stopped by SIGTERM; kept the last complete checkpoint epoch=0-step=2.ckpt" in output.text
    run_dir = tmp_path / "runs" / "tiny"
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"]
    for step in (1, 2):
        assert torch.load(folder / f"epoch=0-step={step}.ckpt", weights_only=False)["global_step"] == step
    assert (folder / "last.ckpt").resolve().name == "epoch=0-step=2.ckpt"
    assert not (run_dir / "final_model").exists() and not list(run_dir.rglob("*.partial-*"))


@pytest.mark.slow
def test_inference_stops_on_sigterm_and_its_rows_resume(tiny_model_dir, tmp_path):
    """Batches of 2 prompts, 400 tokens each: SIGTERM after the first rows are written stops within seconds; every row
    in the file is whole, and a rerun generates only the prompts that are missing."""
    import inference
    from resumable import read_rows

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": str(i), "prompt": f"Count to {i}."} for i in range(40)])
    output = tmp_path / "out.jsonl"
    args = ["--model-name", str(tiny_model_dir), "--prompts", str(prompts), "--output", str(output),
            "--batch-size", "2", "--max-new-tokens", "400", "--backend", "transformers"]
    process, printed = _start("inference.py", *args)
    deadline = time.time() + 300
    while not (output.is_file() and output.read_bytes().count(b"\n") >= 2):
        assert process.poll() is None and time.time() < deadline, printed.text[-3000:]
        time.sleep(0.05)
    took = _stop(process, printed)
    assert process.returncode == 143 and took < 20, (took, printed.text[-3000:])
    assert "inference.py: stopped by SIGTERM; kept" in printed.text and "rerun the same command to resume" in printed.text
    assert output.read_bytes().endswith(b"\n")
    rows = read_rows(output, keys=("id", "completion"))
    assert 2 <= len(rows) < 40 and len(rows) % 2 == 0  # whole batches only
    summary = inference.main([*args, "--limit", str(len(rows) + 1)])
    assert summary["written"] == 1 and summary["skipped"] == len(rows)
    assert [r["id"] for r in read_rows(output)] == [str(i) for i in range(len(rows) + 1)]


# ---- checkpoints, whole or not at all ----------------------------------------------------------------------

KILLED_MID_SAVE = """
import sys, time
import checkpoints

def stuck(obj, handle):  # torch.save that writes a first part and then never finishes
    handle.write(b"half a checkpoint")
    handle.flush()
    print("writing", flush=True)
    time.sleep(120)

checkpoints.torch.save = stuck
checkpoints.AtomicCheckpointIO().save_checkpoint({"step": 2}, sys.argv[1])
"""


@pytest.mark.slow  # the child process imports Lightning
def test_a_save_killed_midway_leaves_the_old_checkpoint_and_no_orphan_in_the_temp_folder(tmp_path):
    folder, temp = tmp_path / "checkpoints", tmp_path / "system-temp"
    folder.mkdir()
    temp.mkdir()
    last = folder / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, last)
    process = subprocess.Popen([sys.executable, "-c", KILLED_MID_SAVE, str(last)], cwd=ROOT, stdout=subprocess.PIPE,
                               env={**os.environ, "TMPDIR": str(temp)})
    assert process.stdout.readline() == b"writing\n"
    process.kill()
    process.wait(30)
    assert torch.load(last, weights_only=False) == {"step": 1}
    staged = [p.name for p in folder.iterdir() if p != last]
    assert len(staged) == 1 and staged[0].startswith("last.ckpt.partial-")  # beside it: one rename from done
    assert not list(temp.iterdir())
    assert [p.name for p in remove_staging(folder)] == staged and [p.name for p in folder.iterdir()] == ["last.ckpt"]


def test_a_save_that_fails_leaves_the_old_checkpoint_and_nothing_else(tmp_path, monkeypatch):
    import checkpoints

    path = tmp_path / "epoch=0-step=1.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)

    def disk_full(obj, handle):
        handle.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}


def test_last_ckpt_moves_to_the_newest_checkpoint_in_one_rename(tmp_path):
    class Trainer:
        is_global_zero = True

        class strategy:  # noqa: N801
            barrier = staticmethod(lambda: None)

    for step in (1, 2):
        (tmp_path / f"step={step}.ckpt").write_bytes(b"whole")
        AtomicLastLink._link_checkpoint(Trainer, str(tmp_path / f"step={step}.ckpt"), str(tmp_path / "last.ckpt"))
        assert os.readlink(tmp_path / "last.ckpt") == f"step={step}.ckpt"  # relative: the folder can move
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=1.ckpt", "step=2.ckpt"]
