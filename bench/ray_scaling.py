"""Steps per second of Ray DDP training for 1, 2, ... workers at the same global batch (the rows of each step are the
same whatever the worker count, see collate_functions.LengthGroupedBatchSampler).

Each run is ``train.py --use-ray`` in its own process (a local Ray instance; the job's own startup is not timed).
The clock is the TensorBoard wall time of ``train/loss`` at each optimizer step: steps/s = (steps - 1 - warm-up) /
(time of the last step - time of the first timed one), which leaves out Ray and model startup, the data pass and
the validation at the end. CPU workers get one core each (``resources_per_worker={"CPU": 1}``, and Ray sets
OMP_NUM_THREADS to it), so on this 2-core machine 2 workers use both cores and 1 worker one.

Run (about 5 minutes on 2 idle cores; nothing is downloaded):
    .venv/bin/python bench/ray_scaling.py --workers 1,2 --out runs/bench/ray_scaling.json

Record the table and the machine in docs/scaling.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from secrets_guard import excerpt, redact_output, write_json

ROOT = Path(__file__).resolve().parent.parent
WARMUP_STEPS = 2


def step_times(event_dir: Path) -> list[float]:
    """Wall time of each logged train/loss, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(event_dir))
    events.Reload()
    return [e.wall_time for e in sorted(events.Scalars("train/loss"), key=lambda e: e.step)]


def run(workers: int, args: argparse.Namespace, folder: Path) -> dict:
    per_worker = args.global_batch // workers
    name = f"scale-{workers}"
    command = [sys.executable, "train.py", "--use-ray", "--num-workers", str(workers), "--strategy", "ddp",
               "--model-name", args.model, "--dataset-name", "synthetic-math", "--synthetic-levels", "1,2",
               "--train-dataset-length", str(args.global_batch * args.steps), "--test-dataset-length", "8",
               "--batch-size", str(per_worker), "--max-length", "256", "--val-generate-samples", "0",
               "--num-sanity-val-steps", "0", "--log-every-n-steps", "1", "--no-verbose", "--seed", "0",
               "--storage-path", str(folder), "--name", name] + (["--use-gpu"] if args.use_gpu else [])
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{workers} workers failed:\n{excerpt(done.stdout, 3000, end=True)}\n"
                         f"{excerpt(done.stderr, 3000, end=True)}")
    times = step_times(folder / name / "tensorboard")[WARMUP_STEPS:]
    return {"workers": workers, "batch_per_worker": per_worker, "global_batch": args.global_batch,
            "timed_steps": len(times) - 1, "steps_per_s": (len(times) - 1) / (times[-1] - times[0])}


def main(argv: list[str] | None = None) -> list[dict]:
    redact_output()  # everything printed or logged from here on passes through secrets_guard.redact
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="Worker counts to run, comma separated.")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Model name or folder (train.py --model-name).")
    parser.add_argument("--global-batch", type=int, default=8, help="Rows per optimizer step, split across the workers.")
    parser.add_argument("--steps", type=int, default=12, help="Optimizer steps per run (the first 2 are warm-up).")
    parser.add_argument("--use-gpu", action="store_true", help="One GPU per worker (on a GPU cluster).")
    parser.add_argument("--out", help="Write the results here as JSON.")
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    if any(args.global_batch % w for w in counts):
        parser.error(f"--global-batch {args.global_batch} must divide evenly among --workers {args.workers}")
    if args.steps <= WARMUP_STEPS + 1:
        parser.error(f"--steps must be above {WARMUP_STEPS + 1} (the first {WARMUP_STEPS} are warm-up)")
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(w, args, Path(tmp)) for w in counts]
    base = results[0]["steps_per_s"]
    print("| workers | batch per worker | steps/s | speed-up |\n|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['workers']} | {r['batch_per_worker']} | {r['steps_per_s']:.3f} | {r['steps_per_s'] / base:.2f}x |")
    if args.out:
        write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
