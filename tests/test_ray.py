"""Ray Train jobs on this CPU machine (gloo): DDP and FSDP workers against one worker, S3 storage against a local
S3 server, resubmission, a worker killed mid-run, and `ray job submit` with secrets in the job's environment.

Every run here trains the tiny local model; a Ray run costs 20-40 s on 2 cores, most of it Ray starting workers.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from conftest import STARTUP_SIGNAL_HANDLERS, strings_in, write_secret_dataset  # noqa: E402

import storage  # noqa: E402
import train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECRETS = {"HF_TOKEN": "hf_TESTSECRETvalue1234567890", "AWS_SECRET_ACCESS_KEY": "testing-secret-key-SENTINEL-42"}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    """One local Ray instance for the in-process runs of this module, stopped after them."""
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def startup_signal_handlers():
    """ray.init sets a SIGTERM handler that raises SystemExit, and TorchTrainer.fit a SIGINT handler that aborts the
    run through its controller actor; ray.shutdown removes neither, so a later SIGTERM or Ctrl-C would not do in this
    pytest process what it did at the start. Put the session's handlers back once the module-scoped Ray runs are set
    up (they run before this fixture) and after every test."""

    def restore():
        for sig, handler in STARTUP_SIGNAL_HANDLERS.items():
            signal.signal(sig, handler)

    restore()
    yield
    restore()


def tiny_args(model: Path, storage_path: str, name: str, *extra: str) -> list[str]:
    return ["--model-name", str(model), "--dataset-name", "synthetic-math", "--synthetic-levels", "1",
            "--train-dataset-length", "32", "--test-dataset-length", "8", "--lr", "3e-3", "--max-length", "256",
            "--max-new-tokens", "8", "--val-generate-samples", "2", "--num-sanity-val-steps", "0", "--no-verbose",
            "--seed", "0", "--log-every-n-steps", "1", "--storage-path", storage_path, "--name", name, *extra]


def step_losses(csv_text: str) -> dict[int, float]:
    """train/loss per optimizer step from a run's CSV log."""
    return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(io.StringIO(csv_text)) if r.get("train/loss")}


def read_text(uri: str) -> str:
    if not storage.is_remote(uri):
        return Path(uri).read_text()
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """The reference runs the comparisons share: 1 local process with batch 4 (8 steps over 32 rows), and 2 Ray DDP
    workers with batch 2 each (the same 4 rows per step, split across them)."""
    folder = tmp_path_factory.mktemp("ray-runs")
    one = train.main(tiny_args(tiny_model_dir, str(folder), "one", "--batch-size", "4"))
    ddp = train.main(tiny_args(tiny_model_dir, str(folder), "ddp", "--batch-size", "2", "--use-ray", "--num-workers", "2",
                               "--strategy", "ddp"))
    return folder, one, ddp


def test_two_ddp_workers_follow_the_loss_curve_of_one_worker_with_twice_the_batch(runs):
    folder, one, ddp = runs
    single = step_losses((folder / "one" / "csv" / "version_0" / "metrics.csv").read_text())
    double = step_losses((folder / "ddp" / "csv" / "version_0" / "metrics.csv").read_text())
    assert sorted(single) == sorted(double) == list(range(8))
    torch.testing.assert_close(torch.tensor([double[s] for s in range(8)]), torch.tensor([single[s] for s in range(8)]),
                               rtol=2e-4, atol=2e-4)
    assert single[7] < single[0]  # it learned, so equal curves are not two flat lines
    assert ddp["after"]["val/loss"] == pytest.approx(one["after"]["val/loss"], abs=2e-3)
    # Ray kept the epoch's checkpoint beside the logs, config and final model.
    names = storage.listdir(str(folder / "ddp"))
    assert {"config.yaml", "csv", "tensorboard", "final_model", "generations"} <= set(names)
    assert len([n for n in names if n.startswith("checkpoint_") and not n.endswith(".json")]) == 1


def test_fsdp_workers_match_ddp_and_a_sharded_checkpoint_resumes(runs, tiny_model_dir):
    """2 FSDP workers (gloo) train like 2 DDP workers; the sharded checkpoint of epoch 1 is a folder of shards that
    a second submission of the same name loads to train epoch 2."""
    folder, _, _ = runs
    args = tiny_args(tiny_model_dir, str(folder), "fsdp", "--batch-size", "2", "--use-ray", "--num-workers", "2",
                     "--strategy", "fsdp", "--state-dict-type", "sharded")
    train.main(args)
    fsdp = step_losses((folder / "fsdp" / "csv" / "version_0" / "metrics.csv").read_text())
    ddp = step_losses((folder / "ddp" / "csv" / "version_0" / "metrics.csv").read_text())
    torch.testing.assert_close(torch.tensor([fsdp[s] for s in range(8)]), torch.tensor([ddp[s] for s in range(8)]),
                               rtol=2e-4, atol=2e-4)
    ckpt = storage.latest_ray_checkpoint(str(folder / "fsdp"))
    sharded = Path(ckpt) / storage.CKPT_NAME
    assert sharded.is_dir() and any(p.suffix == ".distcp" for p in sharded.iterdir())
    resumed = train.main([*args, "--max-epochs", "2"])
    second = step_losses((folder / "fsdp" / "csv" / "version_1" / "metrics.csv").read_text())
    assert sorted(second) == list(range(8, 16))  # epoch 2 only: epoch 1 came from the shards
    assert resumed["after"]["val/loss"] < ddp[0]


@pytest.fixture
def s3_bucket(s3_env, monkeypatch):
    """A new bucket on the local S3 server, and our secrets in the environment (the AWS secret key is a sentinel we
    look for in everything saved)."""
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    bucket = f"runs-{time.time_ns()}"
    s3_env.create_bucket(Bucket=bucket)
    return s3_env, bucket


def test_s3_storage_keeps_the_newest_checkpoints_and_a_resubmission_resumes(s3_bucket, tiny_model_dir, capsys):
    """Checkpoints every 2 steps of 8, keep 2: steps 6 and 8 stay. Logs, config and final model land beside them.
    Submitting the same name again with 2 epochs starts at step 8, from the newest checkpoint on S3, and says so;
    with --overwrite it starts over in an emptied folder. No secret from the environment is in anything written."""
    client, bucket = s3_bucket
    ray.shutdown()  # a local Ray started now passes these AWS variables to its workers, as `ray job submit` does
    uri = f"s3://{bucket}/runs"
    args = tiny_args(tiny_model_dir, uri, "s3run", "--batch-size", "4", "--use-ray", "--num-workers", "1",
                     "--checkpoint-every-n-steps", "2", "--ckpt-to-keep", "2")
    train.main(args)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/s3run/")["Contents"]]
    checkpoints = sorted({k.split("/")[2] for k in keys if k.split("/")[2].startswith("checkpoint_2")})
    assert len(checkpoints) == 2
    steps = [torch.load(io.BytesIO(client.get_object(Bucket=bucket, Key=f"runs/s3run/{c}/checkpoint.ckpt")["Body"].read()),
                        weights_only=False)["global_step"] for c in checkpoints]
    assert steps == [6, 8]
    for name in ("config.yaml", "csv/version_0/metrics.csv", "final_model/model.safetensors", "final_model/config.json"):
        assert f"runs/s3run/{name}" in keys
    assert any(k.startswith("runs/s3run/tensorboard/events.out.tfevents") for k in keys)

    capsys.readouterr()
    result = train.main([*args, "--max-epochs", "2"])
    assert f"{uri}/s3run holds a run of this --name: this job continues it from its newest checkpoint" in capsys.readouterr().out
    second = step_losses(read_text(f"{uri}/s3run/csv/version_1/metrics.csv"))
    assert sorted(second) == list(range(8, 16))
    assert "csv/version_0/metrics.csv" in " ".join(  # the first attempt's log is still there
        o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/s3run/csv/")["Contents"])
    assert result["run_dir"] == f"{uri}/s3run"

    train.main([*args, "--overwrite"])
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/s3run/")["Contents"]]
    assert not any("/csv/version_1/" in k for k in keys)  # the earlier attempts went with --overwrite
    assert sorted(step_losses(read_text(f"{uri}/s3run/csv/version_0/metrics.csv"))) == list(range(8))
    everything = b"".join(client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                          for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    for secret in SECRETS.values():
        assert secret.encode() not in everything


def test_a_worker_killed_mid_run_restarts_from_the_last_checkpoint(tiny_model_dir, tmp_path):
    """--max-failures 1: one of 2 workers is killed (SIGKILL) once checkpoints exist; Ray restarts the group, which
    resumes from the newest registered checkpoint (not step 0) and finishes all 96 steps (6 epochs of 16)."""
    psutil = pytest.importorskip("psutil")
    args = tiny_args(tiny_model_dir, str(tmp_path), "killed", "--batch-size", "1", "--use-ray", "--num-workers", "2",
                     "--checkpoint-every-n-steps", "4", "--max-epochs", "6", "--val-generate-samples", "0",
                     "--max-failures", "1")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    job = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and killed is None and job.poll() is None:
            # Ray registers a reported checkpoint (and writes this snapshot) only once its controller has collected
            # the reports of every worker; a worker killed before that restarts from the previous one.
            if (tmp_path / "killed" / "checkpoint_manager_snapshot.json").is_file():
                workers = [p for p in psutil.process_iter(["cmdline"])
                           if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]
                if workers:
                    killed = workers[-1].pid
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.2)
        output, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert killed is not None, output[-3000:]
    assert job.returncode == 0, output[-3000:]
    attempts = sorted((tmp_path / "killed" / "csv").iterdir())
    assert [a.name for a in attempts] == ["version_0", "version_1"]  # the restart logs beside the first attempt
    restarted = step_losses((attempts[1] / "metrics.csv").read_text())
    assert 0 < min(restarted) and max(restarted) == 95  # from a checkpoint, not from step 0, to the end
    final = torch.load(Path(storage.latest_ray_checkpoint(str(tmp_path / "killed"))) / storage.CKPT_NAME,
                       weights_only=False)
    assert final["global_step"] == 96 and (tmp_path / "killed" / "final_model" / "model.safetensors").is_file()


def test_ray_job_submit_on_a_local_cluster_with_secrets_in_the_job_env(tiny_model_dir, tmp_path):
    """`ray start --head`, then our users' way in: `ray job submit --working-dir . --runtime-env-json {env_vars}`.
    The job succeeds, `ray job logs` shows its output, and the secrets, in the job's environment and quoted by its
    data (so the validation references and answers carry them), appear in no log, config, generations file or
    checkpoint (its bytes, and its contents once loaded)."""
    ray.shutdown()  # this module's in-process Ray; the job runs on a cluster of its own
    bin_dir = Path(sys.executable).parent
    # A loopback cluster of the test's own: Ray 2.60's token authentication is switched off for it.
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    with socket.socket() as a, socket.socket() as b:  # Ray's default 6379 may be another cluster's on this machine
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        port, dashboard = a.getsockname()[1], b.getsockname()[1]
    ray_cli = [str(bin_dir / "ray")]
    start = subprocess.run([*ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
                            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    address = f"http://127.0.0.1:{dashboard}"
    try:
        runtime_env = {"excludes": [".venv", ".git", "runs"], "env_vars": dict(SECRETS)}
        data = write_secret_dataset(tmp_path / "secret-rows.jsonl", list(SECRETS.values()))
        args = tiny_args(tiny_model_dir, str(tmp_path), "job", "--batch-size", "4", "--use-ray", "--num-workers", "2",
                         "--dataset-name", str(data), "--test-size", "0.25")
        submit = subprocess.run([*ray_cli, "job", "submit", "--address", address, "--working-dir", ".",
                                 "--runtime-env-json", json.dumps(runtime_env), "--", "python", "train.py", *args],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        job_id = next(w.strip("'") for line in submit.stdout.splitlines() if "submitted successfully" in line
                      for w in line.split() if w.strip("'").startswith("raysubmit_"))
        logs = subprocess.run([*ray_cli, "job", "logs", "--address", address, job_id], env=env, capture_output=True,
                              text=True, timeout=60)
        assert logs.returncode == 0 and "after training: val/" in logs.stdout
        written = b"".join(p.read_bytes() for p in (tmp_path / "job").rglob("*") if p.is_file())
        assert (tmp_path / "job" / "final_model" / "model.safetensors").is_file()
        for secret in SECRETS.values():
            assert secret not in logs.stdout and secret not in submit.stdout and secret.encode() not in written
        assert "***" in next((tmp_path / "job" / "generations").glob("*.jsonl")).read_text()  # the data's, masked
        checkpoints = list((tmp_path / "job").rglob("*.ckpt"))
        assert checkpoints
        for ckpt in checkpoints:
            inside = "\n".join(strings_in(torch.load(ckpt, map_location="cpu", weights_only=False)))
            assert not any(secret in inside for secret in SECRETS.values()), ckpt
    finally:
        subprocess.run([*ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(tmp_path / "job", ignore_errors=True)


def test_the_in_process_ray_runs_leave_sigterm_and_sigint_as_they_were(runs):
    """After the in-process Ray runs (``runs``; last in this module, after the others too), SIGTERM and SIGINT are
    handled as when the session started."""
    assert {sig: signal.getsignal(sig) for sig in STARTUP_SIGNAL_HANDLERS} == STARTUP_SIGNAL_HANDLERS


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_online_rl_with_two_cpu_workers_samples_its_own_prompts_on_each(tiny_model_dir, tmp_path, strategy):
    """--training-type rloo --use-ray --num-workers 2 (DDP, or FSDP whose weights are gathered at each batch start,
    the ranks then decoding answers of different lengths apart): each rank samples K answers to its own prompts and
    writes its own rollout file per step; the rewards and validation metrics come back."""
    result = train.main(tiny_args(tiny_model_dir, str(tmp_path), "rl", "--training-type", "rloo", "--reward", "format",
                                  "--num-generations", "2", "--kl-coef", "0", "--batch-size", "2", "--use-ray",
                                  "--num-workers", "2", "--strategy", strategy))  # one epoch: 8 steps of 2 x 2 prompts
    rollouts = tmp_path / "rl" / "rollouts"
    training = sorted(p.name for p in rollouts.iterdir() if p.name.startswith("step-"))
    assert training == sorted(f"step-{s}.rank-{r}.jsonl" for s in range(8) for r in (0, 1))
    rows = [{json.loads(line)["row"] for line in (rollouts / f"step-0.rank-{r}.jsonl").read_text().splitlines()}
            for r in (0, 1)]
    assert len(rows[0]) == len(rows[1]) == 2 and not rows[0] & rows[1]  # 2 prompts each, none shared
    assert "val/reward_format" in result["after"]


def test_a_ray_job_checks_its_checkpoint_before_the_data_and_model_load(tiny_model_dir, tmp_path, capsys):
    """--resume-from-checkpoint naming a truncated file: the worker stops before loading anything, and the driver
    ends with the one-line error naming the file (exit status 2), as a local run does."""
    bad = tmp_path / "truncated.ckpt"
    bad.write_bytes(b"PK\x03\x04" + b"0" * 64)
    with pytest.raises(SystemExit) as stopped:
        train.main(tiny_args(tiny_model_dir, str(tmp_path), "bad", "--batch-size", "4", "--use-ray", "--num-workers", "1",
                             "--resume-from-checkpoint", str(bad)))
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"{bad}: truncated or not a PyTorch checkpoint" in err[-1]
