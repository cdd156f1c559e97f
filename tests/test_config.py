"""The run configuration: the full flag set, YAML precedence (defaults < YAML < flags), every validation message
naming its flag, every --strategy x --precision combination's verdict locally and under Ray, redaction of secrets,
and docs/configuration.md being the generated reference of the current fields."""

from __future__ import annotations

import dataclasses
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


def test_help_prints_every_flag_with_its_help_text(capsys):
    """argparse %-formats help strings: a literal "%" in one (--compile-head's "10-14%") crashed --help."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "10-14% more tokens/s" in text
    assert all(config.flag_name(name) in text for name in config.FIELDS)


def test_negated_booleans_parse():
    args = vars(build_parser().parse_args(["--no-use-ray", "--verbose", "--no-sanity-train", "--no-dataset-random-sample",
                                           "--no-calculate-win-rate"]))
    assert args == {"use_ray": False, "verbose": True, "sanity_train": False, "dataset_random_sample": False,
                    "calculate_win_rate": False}


@pytest.mark.parametrize("command", [RAY_COMMAND, RAY_COMMAND.replace("--precision transformer-engine", "--precision bf16-true")
                                     .replace("--training-type sft_verifier", "--training-type dpo")], ids=["verifier", "dpo"])
def test_users_ray_command_lines_are_accepted_as_is(command):
    """The driver (a laptop, or a CPU head node) needs neither a GPU nor Transformer Engine: each Ray worker checks its
    own machine. --accelerator-type H100 (and FP8) imply --use-gpu, which our users' command does not spell out."""
    cfg, _ = resolve(shlex.split(command))
    assert (cfg.use_ray, cfg.use_gpu, cfg.num_workers, cfg.strategy, cfg.accelerator_type) == (True, True, 2, "ddp", "H100")
    assert cfg.storage_dir == "s3://rl-sf/SFT-verifier-final" and cfg.lambda_ == 0.01
    assert cfg.run_dir.name == "SFT-verifier-final" and not str(cfg.run_dir).startswith("s3:")  # a local scratch folder
    on_worker = config.hardware_problems(cfg)  # what a worker without a GPU says, before any model loads
    assert on_worker[0].startswith("--use-gpu (or --accelerator-type / a transformer-engine precision / --strategy "
                                   "deepspeed) needs CUDA")
    assert "this Ray worker" in on_worker[0]


def refusals(strategy: str, precision: str, where: str) -> list[str]:
    """What resolve() must say of a combination (key phrases, in order); [] means accepted. FP8 implies --use-gpu.
    On this CPU machine, with no CUDA, Transformer Engine or DeepSpeed, a local run also fails the hardware checks;
    a Ray driver does not check them (its workers do)."""
    fp8, sharded = precision.startswith("transformer-engine"), strategy in ("fsdp", "deepspeed")
    said = ["works with --strategy ddp (or auto) only"] if fp8 and sharded else []
    if where == "local":
        said += ["needs CUDA"] if fp8 or strategy == "deepspeed" else []
        said += ["needs NVIDIA Transformer Engine"] if fp8 else []
        said += ["--strategy deepspeed needs DeepSpeed"] if strategy == "deepspeed" else []
    return said


@pytest.mark.parametrize("strategy", config.STRATEGIES)
@pytest.mark.parametrize("precision", config.PRECISIONS)
@pytest.mark.parametrize("where", ["local", "ray"])
def test_every_strategy_and_precision_combination(strategy, precision, where):
    flags = ["--strategy", strategy, "--precision", precision, "--name", "x"] + (["--use-ray"] if where == "ray" else [])
    expected = refusals(strategy, precision, where)
    if not expected:
        cfg, _ = resolve(flags)
        assert cfg.use_gpu == (precision.startswith("transformer-engine") or strategy == "deepspeed")
        return
    with pytest.raises(ConfigError) as err:
        resolve(flags)
    assert len(err.value.problems) == len(expected), err.value.problems
    for phrase, problem in zip(expected, err.value.problems):
        assert phrase in problem, (phrase, err.value.problems)


def test_distribution_contradictions_are_reported_together():
    with pytest.raises(ConfigError) as err:
        resolve(["--max-failures", "2", "--storage-path", "s3://bucket/runs", "--num-workers", "2",
                 "--accelerator-type", "A100", "--state-dict-type", "sharded", "--resume-from-checkpoint", "/nowhere.ckpt"])
    assert err.value.problems == [
        "--num-workers above 1 without --use-ray starts that many processes here, which must share one run folder: "
        "give --name",
        "--state-dict-type sharded needs --strategy fsdp",
        "--max-failures restarts Ray workers after a failure: add --use-ray",
        "--accelerator-type picks Ray workers' GPUs: add --use-ray",
        "--storage-path s3://bucket/runs: object stores are written by Ray jobs; add --use-ray, or train to a local "
        "folder and copy it up",
        "--resume-from-checkpoint /nowhere.ckpt: no such file or folder",
        "--use-gpu (or --accelerator-type / a transformer-engine precision / --strategy deepspeed) needs CUDA, and "
        "PyTorch sees no CUDA device on this machine",
    ]


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
    """A flag holding a secret is refused (tests/test_secrets.py); a config that holds one all the same (built in
    code, or read from an older checkpoint) is saved redacted."""
    monkeypatch.setenv("HF_TOKEN", "hf_supersecretvalue")
    cfg, _ = resolve(["--name", "r", "--storage-path", str(tmp_path)])
    cfg = dataclasses.replace(cfg, model_name="org/m-hf_supersecretvalue")
    assert "hf_supersecretvalue" not in config.to_yaml(cfg)
    saved = config.save(cfg, cfg.run_dir).read_text()
    assert "hf_supersecretvalue" not in saved and "org/m-***" in saved


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_parses_and_names_its_command(path):
    first_lines = path.read_text().splitlines()[:3]
    assert any(line.startswith("#") and f"--config configs/{path.name}" in line for line in first_lines)
    resolve(["--config", str(path)])


@pytest.mark.parametrize("flags,cuda,expected", [
    ([], True, True),  # a local run takes the machine's GPU
    ([], False, False),
    (["--no-use-gpu"], True, False),
    (["--use-ray"], True, False),  # a Ray driver's GPU says nothing of the workers'
    (["--use-ray", "--use-gpu"], False, True),  # the workers check their own hardware
])
def test_use_gpu_defaults_to_the_machines_gpu_locally(monkeypatch, flags, cuda, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg, _ = resolve(flags + ["--name", "x"])
    assert cfg.use_gpu is expected


def test_fp8_and_deepspeed_refuse_an_explicit_no_use_gpu():
    with pytest.raises(ConfigError) as err:
        resolve(["--precision", "transformer-engine", "--no-use-gpu", "--name", "x"])
    assert err.value.problems[0] == ("--precision transformer-engine runs FP8 on NVIDIA GPUs (H100/Ada): drop "
                                     "--no-use-gpu")
    with pytest.raises(ConfigError) as err:
        resolve(["--strategy", "deepspeed", "--no-use-gpu", "--name", "x"])
    assert err.value.problems[0] == "--strategy deepspeed needs GPUs (drop --no-use-gpu); on CPU use ddp or fsdp"


def test_fp8_recipe_is_a_choice(capsys):
    cfg, _ = resolve(["--fp8-recipe", "current", "--name", "x"])
    assert cfg.fp8_recipe == "current"
    with pytest.raises(SystemExit):
        resolve(["--fp8-recipe", "dynamic", "--name", "x"])
    assert "--fp8-recipe: invalid choice: 'dynamic'" in capsys.readouterr().err


def test_configuration_reference_is_current():
    """docs/configuration.md is generated from TrainConfig; a field added or changed without regenerating it fails."""
    from pathlib import Path

    from config import reference_markdown

    doc = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    assert doc.read_text() == reference_markdown(), "docs/configuration.md is stale: run `python config.py`"
    assert "`--lambda`" in doc.read_text() and "`--verifier-tau`" in doc.read_text()


def test_yaml_numbers_written_as_strings_are_numbers(tmp_path):
    """PyYAML follows YAML 1.1, which reads `1e-5` (no dot) as a string: a float field takes it, an int field takes
    a string or float that is a whole number; anything else still names the key."""
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-5\nbeta: '0.5'\nmax_steps: 1e2\nbatch_size: 4.0\nzero_stage: '3'\n")
    cfg, _ = resolve(["--config", str(path), "--name", "n"])
    assert (cfg.lr, cfg.beta, cfg.max_steps, cfg.batch_size, cfg.zero_stage) == (1e-5, 0.5, 100, 4, 3)
    assert isinstance(cfg.max_steps, int) and isinstance(cfg.batch_size, int)
    path.write_text("lr: fast\nwarmup_steps: 2.5\nmax_steps: 1e-1\nbeta: .nan\nseed: true\n")
    with pytest.raises(ConfigError) as refused:
        resolve(["--config", str(path), "--name", "n"])
    assert len(refused.value.problems) == 5
    for key in ("'lr' must be a number", "'warmup_steps' must be an integer", "'max_steps' must be an integer",
                "'beta' must be a number", "'seed' must be an integer"):
        assert any(key in p for p in refused.value.problems), key
