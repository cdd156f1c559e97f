"""Bad input ends every entry point the same way: exit status 2 and one line on stderr, ``<script>: <message>``,
naming the file (and its line or row), the column or the flag; never a traceback, and nothing left behind that would
make the next, correct run fail (a run folder, a settings file, a half output).

Each entry point's ``main([...])`` is fed broken inputs of its own kind: a JSON line that is not JSON, an empty file, a
file that is not UTF-8, a truncated or random-bytes checkpoint, a model folder that is not there, a row without a
column, a zip that is not one, a YAML value of the wrong type, a bad flag. Two run as real processes, for the exit
status and stderr as a user sees them. Every broken input fails before a model loads (the tiny model's tokenizer
at most), so the whole file takes seconds.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

import evaluate_math
import generate_dpo_pairs
import inference
import train
import upload_to_hub
import win_rate
from extension import best_of_n
from extension import data_preparation as prep

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_progress_bars(monkeypatch):
    """Progress bars (datasets' as it reads a file, a script's own) are drawn on stderr: off, so that stderr holds
    only what failed (a process gets TQDM_DISABLE=1)."""
    import datasets
    from tqdm import std

    monkeypatch.setattr(std.tqdm, "__init__", functools.partialmethod(std.tqdm.__init__, disable=True))
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def fails(capsys, main, argv: list[str], script: str, *named) -> str:
    """Run ``main(argv)``; assert exit status 2 and exactly one non-empty stderr line, ``<script>: ...``, holding every
    one of ``named`` (a file, a line, a column, a flag); return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert stop.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"{script}: "), err
    for name in named:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def gsm(n: int) -> list[dict]:
    """Problems as train.py, generate_dpo_pairs.py and best_of_n.py --dataset read them."""
    return [{"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"} for i in range(n)]


def answers(n: int) -> list[dict]:
    """Rows of an inference.py output, as win_rate.py and evaluate_math.py read them."""
    return [{"id": str(i), "prompt": [{"role": "user", "content": f"q{i}"}], "completion": f"a{i}",
             "reference": f"#### {i}"} for i in range(n)]


def prompts(n: int) -> list[dict]:
    """Rows of inference.py --prompts."""
    return [{"prompt": f"q{i}"} for i in range(n)]


def candidates(n: int) -> list[dict]:
    """Labeled candidates of best_of_n.py --candidates (data_collection rows)."""
    return [{"question": "q", "question_id": 0, "model_output": f"s{i}", "model_output_id": i, "correctness": i % 2}
            for i in range(n)]


def broken(folder: Path, kind, rows: int = 2) -> dict[str, Path]:
    """Files of ``kind``'s rows, broken three ways: line 3 not JSON, line 3 not UTF-8 (Latin-1), empty."""
    folder.mkdir(parents=True, exist_ok=True)
    good = "".join(json.dumps(r) + "\n" for r in kind(rows)).encode()
    latin1 = json.dumps(kind(1)[0], ensure_ascii=False).replace('"', '"Caf\xe9 ', 1).encode("latin-1") + b"\n"
    files = {"broken_line": good + b'{"cut": \n', "latin1": good + latin1, "empty": b""}
    for name, content in files.items():
        (folder / f"{name}.jsonl").write_bytes(content)
    return {name: folder / f"{name}.jsonl" for name in files}


@pytest.fixture
def bad(tmp_path) -> dict[str, Path]:
    """Broken inputs, each named by what is wrong with it (the JSON-lines ones hold train.py's problems)."""
    folder = tmp_path / "bad"
    paths = broken(folder, gsm)
    rows = gsm(30)
    del rows[17]["answer"]
    paths["no_column"] = write_jsonl(folder / "no_column.jsonl", rows)
    torch.save({"state_dict": {"model.w": torch.zeros(256)}, "train_config": {}}, folder / "whole.ckpt")
    data = (folder / "whole.ckpt").read_bytes()
    paths["truncated_ckpt"] = folder / "truncated.ckpt"
    paths["truncated_ckpt"].write_bytes(data[: len(data) // 2])
    paths["random_ckpt"] = folder / "random.ckpt"
    paths["random_ckpt"].write_bytes(random.Random(0).randbytes(4096))
    paths["yaml"] = folder / "run.yaml"
    paths["yaml"].write_text("lr: fast\n")
    paths["missing_model"] = tmp_path / "no-such-model"
    return paths


# ---- train.py ------------------------------------------------------------------------------------------------

def test_train(tmp_path, bad, tiny_model_dir, capsys):
    runs = tmp_path / "runs"
    base = ["--model-name", str(tiny_model_dir), "--storage-path", str(runs), "--name", "r", "--no-verbose"]
    data = lambda path: [*base, "--dataset-name", str(path)]  # noqa: E731
    fails(capsys, train.main, data(bad["broken_line"]), "train.py", "--dataset-name", bad["broken_line"], "line 3")
    fails(capsys, train.main, data(bad["empty"]), "train.py", bad["empty"], "empty")
    fails(capsys, train.main, data(bad["latin1"]), "train.py", bad["latin1"], "line 3 is not UTF-8")
    fails(capsys, train.main, data(bad["no_column"]), "train.py", bad["no_column"], "row 17", "column 'answer'")
    fails(capsys, train.main, data(tmp_path / "nope.jsonl"), "train.py", "nope.jsonl: no such file")
    # The checkpoint is read first: the broken dataset is never reached.
    for ckpt in (bad["truncated_ckpt"], bad["random_ckpt"]):
        fails(capsys, train.main, [*data(bad["broken_line"]), "--resume-from-checkpoint", str(ckpt)], "train.py",
              "--resume-from-checkpoint", ckpt, "truncated or not a PyTorch checkpoint")
    fails(capsys, train.main, [*base, "--model-name", str(bad["missing_model"])], "train.py",
          f"--model-name {bad['missing_model']}: no such model folder")
    fails(capsys, train.main, [*base, "--model-name", str(tmp_path)], "train.py", "a folder without config.json")
    fails(capsys, train.main, [*base, "--config", str(bad["yaml"])], "train.py", bad["yaml"], "'lr' must be a number")
    fails(capsys, train.main, [*base, "--lr", "x"], "train.py", "--lr", "'x'")
    fails(capsys, train.main, [*base, "--lrr", "1"], "train.py", "--lrr")
    both = fails(capsys, train.main, [*base, "--max-epochs", "0", "--max-steps", "-1", "--batch-size", "0"], "train.py")
    assert "--max-epochs and --max-steps" in both and "--batch-size must be at least 1" in both
    assert not runs.exists()  # no run folder: the next run of the name starts as if none of these had run


def test_train_as_a_process_prints_one_line_and_exits_2(tmp_path, bad, tiny_model_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "train.py", "--model-name", str(tiny_model_dir), "--dataset-name",
                           str(bad["broken_line"]), "--storage-path", str(tmp_path / "runs"), "--name", "r", "--no-verbose"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith(f"train.py: --dataset-name {bad['broken_line']}: line 3 column 9: not valid JSON")


# ---- inference.py, win_rate.py, evaluate_math.py -------------------------------------------------------------

def test_inference(tmp_path, bad, tiny_model_dir, capsys):
    out = tmp_path / "out" / "answers.jsonl"
    base = ["--model-name", str(tiny_model_dir), "--output", str(out), "--max-new-tokens", "2"]
    files = broken(tmp_path / "prompts", prompts)
    for name, named in (("broken_line", "line 3"), ("empty", "no prompts"), ("latin1", "line 3: not UTF-8")):
        fails(capsys, inference.main, [*base, "--prompts", str(files[name])], "inference.py", "--prompts", files[name], named)
    fails(capsys, inference.main, [*base, "--dataset-name", str(bad["broken_line"])], "inference.py",
          bad["broken_line"], "line 3")
    assert not out.exists()
    # An output file with a line that is not UTF-8 (not a torn last line): named, and kept as it was.
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"\xff\xfe not text\n" + write_jsonl(tmp_path / "a.jsonl", answers(3)).read_bytes())
    before = out.read_bytes()
    good = write_jsonl(tmp_path / "prompts.jsonl", prompts(1))
    fails(capsys, inference.main, [*base, "--prompts", str(good)], "inference.py", out, "line 1 is not UTF-8")
    assert out.read_bytes() == before
    fails(capsys, inference.main, ["--model-name", str(bad["missing_model"]), "--prompts", str(good), "--output",
                                   str(out)], "inference.py", f"--model-name {bad['missing_model']}: no such model folder")
    fails(capsys, inference.main, [*base, "--prompts", str(good), "--n", "0"], "inference.py", "--n must be at least 1")


def test_win_rate(tmp_path, bad, capsys):
    good, out = write_jsonl(tmp_path / "base.jsonl", answers(3)), tmp_path / "wr"
    files = broken(tmp_path / "answers", answers)
    for name, named in (("broken_line", "line 3"), ("latin1", "line 3 is not UTF-8"), ("empty", "holds no rows")):
        fails(capsys, win_rate.main, ["--candidates", str(files[name]), "--baseline", str(good), "--judge", "api",
                                      "--output-dir", str(out)], "win_rate.py", files[name], named)
    fails(capsys, win_rate.main, ["--candidates", str(good), "--baseline", str(good), "--judge-model",
                                  str(bad["missing_model"]), "--output-dir", str(out)],
          "win_rate.py", f"--judge-model {bad['missing_model']}: no such model folder")
    assert not (out / "summary.json").exists() and not (out / "reward_cache.jsonl").exists()


def test_evaluate_math(tmp_path, bad, capsys):
    out = tmp_path / "math"
    files = broken(tmp_path / "answers", answers)
    for name, named in (("broken_line", "line 3"), ("latin1", "line 3 is not UTF-8"), ("empty", "no predictions")):
        fails(capsys, evaluate_math.main, ["--predictions", str(files[name]), "--output-dir", str(out)],
              "evaluate_math.py", files[name], named)
    fails(capsys, evaluate_math.main, ["--predictions", str(tmp_path / "none.jsonl"), "--output-dir", str(out)],
          "evaluate_math.py", "--predictions", "none.jsonl: no such file")
    fails(capsys, evaluate_math.main, ["--model-name", str(bad["missing_model"]), "--dataset-name", "synthetic-math",
                                       "--output-dir", str(out)], "evaluate_math.py", "--model-name", "no such model folder")
    assert not (out / "summary.json").exists() and not (out / "results.jsonl").exists()


# ---- generate_dpo_pairs.py, upload_to_hub.py -----------------------------------------------------------------

def test_generate_dpo_pairs(tmp_path, bad, tiny_model_dir, capsys):
    out = tmp_path / "pairs"
    base = ["--model-name", str(tiny_model_dir), "--output-dir", str(out), "--samples-per-problem", "2"]
    fails(capsys, generate_dpo_pairs.main, [*base, "--dataset-name", str(bad["broken_line"])],
          "generate_dpo_pairs.py", "--dataset-name", bad["broken_line"], "line 3")
    fails(capsys, generate_dpo_pairs.main, [*base, "--dataset-name", str(bad["no_column"])],
          "generate_dpo_pairs.py", bad["no_column"], "column 'answer'")
    fails(capsys, generate_dpo_pairs.main, [*base, "--model-name", str(bad["missing_model"])],
          "generate_dpo_pairs.py", f"--model-name {bad['missing_model']}: no such model folder")
    assert not out.exists()  # no generation.json that would hold a rerun to these settings


def test_upload_to_hub(tmp_path, bad, capsys):
    export = tmp_path / "export"
    for ckpt in (bad["truncated_ckpt"], bad["random_ckpt"]):
        fails(capsys, upload_to_hub.main, ["--checkpoint-path", str(ckpt), "--training-type", "sft", "--local-dir",
                                           str(export)], "upload_to_hub.py", "--checkpoint-path", ckpt, "truncated")
    fails(capsys, upload_to_hub.main, ["--checkpoint-path", str(tmp_path / "none.ckpt"), "--training-type", "sft",
                                       "--local-dir", str(export)], "upload_to_hub.py", "--checkpoint-path", "none.ckpt")
    assert not export.exists()


def test_upload_to_hub_as_a_process_prints_one_line_and_exits_2(bad, tmp_path):
    done = subprocess.run([sys.executable, "upload_to_hub.py", "--checkpoint-path", str(bad["random_ckpt"]),
                           "--training-type", "sft", "--local-dir", str(tmp_path / "export")],
                          cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith(f"upload_to_hub.py: --checkpoint-path "
                                                                         f"{bad['random_ckpt']}: truncated")


# ---- extension/data_preparation.py, extension/best_of_n.py ---------------------------------------------------

def test_data_preparation(tmp_path, capsys):
    out = tmp_path / "prep"
    zips = tmp_path / "zips"
    zips.mkdir()
    bad_zip = zips / "critiques_correct_solutions_batch_00.zip"
    bad_zip.write_bytes(b"PK not really a zip")
    fails(capsys, prep.main, ["--path", str(zips), "--output-dir", str(out)], "data_preparation.py", bad_zip,
          "not a readable zip archive")
    collection = tmp_path / "gz" / "data_collection"
    collection.mkdir(parents=True)
    row = {"question": "q", "question_id": 1, "model_output": "s", "correctness": 1,
           "verifier_output": "Verification: Is the answer correct (Yes/No)? Yes"}
    whole = gzip.compress((json.dumps(row) + "\n").encode() * 200)
    (collection / "part.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    fails(capsys, prep.main, ["--path", str(collection), "--output-dir", str(out)], "data_preparation.py",
          collection / "part.jsonl.gz", "not a readable gzip file")
    (collection / "part.jsonl.gz").unlink()
    (collection / "empty.jsonl").write_text("")
    fails(capsys, prep.main, ["--path", str(collection), "--output-dir", str(out)], "data_preparation.py",
          f"--path {collection}: no usable row")
    fails(capsys, prep.main, ["--source", "policy", "--output-dir", str(out)], "data_preparation.py", "--path")
    assert not out.exists()


def test_best_of_n(tmp_path, bad, tiny_model_dir, capsys):
    out = tmp_path / "bon"
    base = ["--verifier", str(tiny_model_dir), "--n", "2", "--num-problems", "1", "--output-dir", str(out)]
    files = broken(tmp_path / "candidates", candidates)
    for name, named in (("broken_line", "row 3"), ("latin1", "line 3: not UTF-8")):
        fails(capsys, best_of_n.main, [*base, "--candidates", str(files[name])], "best_of_n.py", files[name], named)
    fails(capsys, best_of_n.main, [*base, "--candidates", str(files["empty"])], "best_of_n.py", "--candidates",
          "no question has 2 candidates")
    fails(capsys, best_of_n.main, [*base, "--candidates", str(tmp_path / "none.jsonl")], "best_of_n.py", "none.jsonl")
    fails(capsys, best_of_n.main, [*base, "--generator", str(tiny_model_dir), "--dataset", str(bad["broken_line"])],
          "best_of_n.py", bad["broken_line"], "line 3")
    fails(capsys, best_of_n.main, [*base, "--generator", str(bad["missing_model"])], "best_of_n.py",
          f"--generator {bad['missing_model']}: no such model folder")
    assert not (out / "settings.json").exists()  # a rerun with the inputs corrected is not held to these
