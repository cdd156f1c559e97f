"""Flags, YAML precedence, validation messages and redaction of the run configuration."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

import config
import train
from config import ConfigError, TrainConfig, build_parser, resolve

ROOT = Path(__file__).resolve().parent.parent

# The flags our users' job scripts use (issue 2), each with a non-default value.
ALL_FLAGS = (
    "--use-ray --model-name m --dataset-name d --training-type dpo --storage-path s3://b/p --name n --num-workers 2 "
    "--accelerator-type H100 --placement-strategy SPREAD --seed 7 --max-epochs 3 --use-gpu --batch-size 2 --lr 0.002 "
    "--resume-from-checkpoint c.ckpt --accumulate-grad-batches 4 --strategy ddp --precision bf16-true --mode test "
    "--check-val-every-n-epoch 2 --ckpt-to-keep 5 --checkpoint-frequency 3 --state-dict-type sharded --dataset-source gsm8k "
    "--no-verbose --train-dataset-length 10 --test-dataset-length 5 --num-sanity-val-steps 0 --sanity-train "
    "--dataset-random-sample --beta 2.0 --roundoff 3 --train-percentile 98 --test-percentile 97 --calculate-win-rate "
    "--lambda 0.01"
)
# The Ray command line of issue 5, which must be accepted as is.
RAY_COMMAND = (
    '--use-ray --name "SFT-verifier-final" --num-workers 2 --strategy ddp --storage-path "s3://rl-sf" '
    "--precision transformer-engine --batch-size 1 --num-sanity-val-steps 0 --checkpoint-frequency 1 "
    "--check-val-every-n-epoch 1 --accumulate-grad-batches 1 --accelerator-type H100 --train-percentile 98 "
    "--test-percentile 98 --training-type sft_verifier --model-name psr-ai/qwen2.5-0.5B-SFT-DPO --no-verbose "
    "--roundoff 4 --lambda 0.01"
)


def test_every_flag_parses_into_its_field():
    args = vars(build_parser().parse_args(shlex.split(ALL_FLAGS)))
    expected = {
        "use_ray": True, "model_name": "m", "dataset_name": "d", "training_type": "dpo", "storage_path": "s3://b/p",
        "name": "n", "num_workers": 2, "accelerator_type": "H100", "placement_strategy": "SPREAD", "seed": 7,
        "max_epochs": 3, "use_gpu": True, "batch_size": 2, "lr": 0.002, "resume_from_checkpoint": "c.ckpt",
        "accumulate_grad_batches": 4, "strategy": "ddp", "precision": "bf16-true", "mode": "test",
        "check_val_every_n_epoch": 2, "ckpt_to_keep": 5, "checkpoint_frequency": 3, "state_dict_type": "sharded",
        "dataset_source": "gsm8k", "verbose": False, "train_dataset_length": 10, "test_dataset_length": 5,
        "num_sanity_val_steps": 0, "sanity_train": True, "dataset_random_sample": True, "beta": 2.0, "roundoff": 3,
        "train_percentile": 98.0, "test_percentile": 97.0, "calculate_win_rate": True, "lambda_": 0.01,
    }
    assert args == expected


def test_negated_booleans_parse():
    args = vars(build_parser().parse_args(["--no-use-ray", "--verbose", "--no-sanity-train", "--no-dataset-random-sample",
                                           "--no-calculate-win-rate"]))
    assert args == {"use_ray": False, "verbose": True, "sanity_train": False, "dataset_random_sample": False,
                    "calculate_win_rate": False}


def test_ray_command_line_parses_and_is_refused_only_for_unlanded_parts():
    build_parser().parse_args(shlex.split(RAY_COMMAND))  # argparse accepts it as is
    with pytest.raises(ConfigError) as err:
        resolve(shlex.split(RAY_COMMAND))
    problems = "\n".join(err.value.problems)
    assert "--use-ray is not yet available" in problems
    assert "sft_verifier" not in problems  # landed with issue 4
    assert "--precision transformer-engine is not yet available" in problems


def test_defaults_then_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("batch-size: 3\nlr: 0.5\nmax_epochs: 4\nverbose: false\nlambda: 0.2\n")
    cfg, _ = resolve(["--config", str(path), "--lr", "0.25", "--name", "x"])
    assert (cfg.batch_size, cfg.lr, cfg.max_epochs, cfg.verbose, cfg.lambda_) == (3, 0.25, 4, False, 0.2)
    assert cfg.seed == TrainConfig.seed  # untouched fields keep their defaults


def test_unknown_and_mistyped_yaml_keys_are_all_reported(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("batch_sise: 3\nlr: fast\nverbose: 1\nprecision: fp64\n")
    with pytest.raises(ConfigError) as err:
        resolve(["--config", str(path)])
    assert err.value.problems == [
        f"{path}: unknown key 'batch_sise' (did you mean 'batch_size'?)",
        f"{path}: 'lr' must be a number, got 'fast'",
        f"{path}: 'verbose' must be true or false, got 1",
        f"{path}: 'precision' must be one of 32, bf16-mixed, bf16-true, transformer-engine, transformer-engine-float16, got 'fp64'",
    ]


def test_contradictions_are_collected_before_any_model_loads():
    with pytest.raises(ConfigError) as err:
        resolve(["--sanity-train", "--test-percentile", "90", "--test-dataset-length", "5", "--batch-size", "0",
                 "--train-percentile", "120", "--name", "a/b", "--state-dict-type", "sharded"])
    assert err.value.problems == [
        "--train-percentile must be in (0, 100], got 120.0",
        "--batch-size must be at least 1, got 0",
        "--sanity-train validates on the training set, so --test-percentile has no effect: drop one of them",
        "--sanity-train validates on the training set, so --test-dataset-length has no effect: drop one of them",
        "--name may hold only letters, digits, '.', '_' and '-', got 'a/b'",
        "--state-dict-type sharded needs --strategy fsdp",
    ]


def test_main_exits_2_with_the_message(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--max-epochs", "0", "--max-steps", "-1"])
    assert exc.value.code == 2
    assert "--max-epochs and --max-steps cannot both be below 1" in capsys.readouterr().err


def test_print_config_prints_yaml_and_runs_nothing(capsys, tmp_path):
    assert train.main(["--print-config", "--name", "p", "--storage-path", str(tmp_path)]) is None
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["name"] == "p" and printed["lambda"] == 0.1 and printed["training-type"] == "sft"
    assert not (tmp_path / "p").exists()


def test_secrets_from_environment_are_redacted(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_supersecretvalue")
    cfg, _ = resolve(["--name", "r", "--storage-path", str(tmp_path), "--model-name", "org/m-hf_supersecretvalue"])
    assert "hf_supersecretvalue" not in config.to_yaml(cfg)
    saved = config.save(cfg, cfg.run_dir).read_text()
    assert "hf_supersecretvalue" not in saved and "org/m-***" in saved


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_parses_and_names_its_command(path):
    first_lines = path.read_text().splitlines()[:3]
    assert any(line.startswith("#") and f"--config configs/{path.name}" in line for line in first_lines)
    resolve(["--config", str(path)])
