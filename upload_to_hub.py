"""Turn a training checkpoint into a standard Hugging Face model folder, with a model card, and push it to the Hub.

The checkpoint is a Lightning ``.ckpt`` written by ``train.py``, named any way a run leaves one behind
(``storage.fetch_checkpoint``): the file, a run folder (its ``checkpoints/last.ckpt``), a Ray Train checkpoint folder
(``checkpoint_<time>/checkpoint.ckpt``) or a Ray run folder (its newest ``checkpoint_*``), local or on S3
(``s3://bucket/prefix``, credentials and endpoint from the standard ``AWS_*`` environment variables). The model is
rebuilt from the training config stored in the checkpoint, given the trained weights, and saved with
``save_pretrained`` (config, safetensors weights, generation config), with the tokenizer and its chat template; for
``--training-type bt`` the reward head (a one-output sequence-classification model). The model card (README.md)
holds the training config (secrets redacted) and the final validation metrics of the run: from its CSV logs when
they are beside the checkpoint, else those the checkpoint itself stores.

    python upload_to_hub.py --checkpoint-path runs/sft-smollm2-math --repo-id me/smollm2-math-sft --training-type sft
    python upload_to_hub.py --checkpoint-path runs/sft-smollm2-math/checkpoints/last.ckpt --local-dir /tmp/export \\
        --training-type sft        # export only, no push
    python upload_to_hub.py --checkpoint-path s3://bucket/runs/sft-ray --local-dir /tmp/export --training-type sft

Pushing needs a Hugging Face write token in HF_TOKEN; the repo is created private unless --public.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
from pathlib import Path

import yaml

import storage
from config import flag_name, redact
from errors import ArgumentParser, fail
from objectives import TRAINING_TYPES, get_objective
from secrets_guard import redact_output, refuse_secret_args


class ExportError(ValueError):
    """A checkpoint that cannot be exported; the message names the path or flag."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="upload_to_hub.py", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-path", required=True,
                        help="A .ckpt file, a run folder, a Ray checkpoint or run folder; local or s3://bucket/prefix.")
    parser.add_argument("--repo-id", help="Hub model repo to push to (owner/name).")
    parser.add_argument("--training-type", required=True, choices=TRAINING_TYPES, help="What the checkpoint was trained as.")
    parser.add_argument("--local-dir", help="Export here (default: a temporary folder, removed after the push).")
    parser.add_argument("--public", action="store_true", help="Create the repo public (default: private).")
    args = parser.parse_args(argv)
    refuse_secret_args(parser, args)
    if args.repo_id is None and args.local_dir is None:
        parser.error("give --repo-id (push), --local-dir (export only), or both")
    if args.repo_id is not None and not os.environ.get("HF_TOKEN"):
        parser.error(f"--repo-id {args.repo_id} needs a Hugging Face write token in the HF_TOKEN environment variable")
    return args


def read_checkpoint(ckpt: Path) -> dict:
    """The checkpoint dict of a ``train.py`` checkpoint file."""
    if ckpt.is_dir():  # Lightning's FSDP sharded layout: a folder of per-worker shards, no single state dict to load
        raise ExportError(f"--checkpoint-path: {ckpt} is a sharded checkpoint (a folder, from --state-dict-type "
                          "sharded): export from a full checkpoint (train with --state-dict-type full), or use the "
                          "run's final_model/ folder, already a Hugging Face model")
    try:
        return storage.load_checkpoint(ckpt)
    except storage.StorageError as exc:  # truncated or corrupt: the message names the file
        raise ExportError(f"--checkpoint-path {exc}") from None


def load_checkpoint_model(ckpt: Path, checkpoint: dict, training_type: str):
    """(model, tokenizer, training config dict) rebuilt from a ``train.py`` checkpoint (``checkpoint``, read from
    ``ckpt``)."""
    from models import load_tokenizer, model_folder_problem

    cfg = checkpoint.get("train_config")
    if cfg is None or "state_dict" not in checkpoint:
        raise ExportError(f"{ckpt}: not a train.py checkpoint (no train_config or state_dict)")
    if cfg["training_type"] != training_type:
        raise ExportError(f"--training-type {training_type}, but {ckpt} was trained as {cfg['training_type']}")
    if problem := model_folder_problem(cfg["model_name"], "its --model-name"):  # the model it is rebuilt on
        raise ExportError(f"{ckpt} was trained from a model that is not there: {problem}")
    model = get_objective(training_type).load_model(cfg["model_name"])
    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ExportError(f"{ckpt}: weights do not fit {cfg['model_name']} (missing {sorted(set(missing) - tied)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]})")
    return model, load_tokenizer(cfg["model_name"]), cfg


def final_metrics(ckpt: Path, checkpoint: dict) -> dict[str, float]:
    """The last logged value of every validation metric in the run's CSV logs; when they are not beside the
    checkpoint (one fetched from S3, or copied out of its run), the validation metrics the checkpoint stores."""
    # A local run keeps checkpoints/last.ckpt, a Ray run checkpoint_<time>/checkpoint.ckpt, beside csv/.
    nested = ckpt.parent.name == "checkpoints" or ckpt.parent.name.startswith("checkpoint_")
    run = ckpt.parent.parent if nested else ckpt.parent
    metrics: dict[str, float] = {}
    for log in sorted(run.glob("csv/*/metrics.csv"), key=lambda p: p.stat().st_mtime):
        with log.open() as handle:
            for row in csv.DictReader(handle):
                metrics.update({k: float(v) for k, v in row.items() if k.startswith("val/") and v})
    return metrics or {k: float(v) for k, v in checkpoint.get("val_metrics", {}).items()}


def model_card(cfg: dict, metrics: dict[str, float], training_type: str) -> str:
    """The README.md of an export, secrets redacted (all of it: a checkpoint of an older version may hold them)."""
    config = yaml.safe_dump({flag_name(k)[2:]: v for k, v in cfg.items()}, sort_keys=False)
    lines = ["---", "library_name: transformers", "tags: [posttrain, " + training_type + "]", "---", "",
             f"# {training_type} model trained with posttrain", "",
             f"Trained from `{cfg['model_name']}` on `{cfg['dataset_name']}` with `train.py --training-type {training_type}`.", ""]
    if metrics:
        lines += ["## Final validation metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())] + [""]
    lines += ["## Training configuration", "", "```yaml", config.rstrip(), "```", ""]
    return redact("\n".join(lines))


def export(ckpt: Path, training_type: str, folder: Path) -> Path:
    """Write the Hugging Face folder of ``ckpt`` to ``folder``."""
    checkpoint = read_checkpoint(ckpt)
    model, tokenizer, cfg = load_checkpoint_model(ckpt, checkpoint, training_type)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(model_card(cfg, final_metrics(ckpt, checkpoint), training_type))
    return folder


def push(folder: Path, repo_id: str, private: bool) -> str:
    """Create (if needed) and upload to the hub repo; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=os.environ["HF_TOKEN"])
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message="Upload from posttrain upload_to_hub.py")
    return f"https://huggingface.co/{repo_id}"


def main(argv: list[str] | None = None) -> Path | None:
    redact_output()  # everything printed or logged from here on passes through secrets_guard.redact
    args = parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="upload-") as tmp:
            try:
                ckpt = storage.fetch_checkpoint(args.checkpoint_path, Path(tmp))
            except OSError as exc:  # StorageError, and what pyarrow raises for a store it cannot read (credentials)
                where = str(exc) if str(exc).startswith(args.checkpoint_path) else f"{args.checkpoint_path}: {exc}"
                raise ExportError(f"--checkpoint-path {where}") from exc
            folder = export(ckpt, args.training_type, Path(args.local_dir) if args.local_dir else Path(tmp) / "export")
            print(f"exported {ckpt} to {folder}")
            if args.repo_id:
                print(f"pushed to {push(folder, args.repo_id, private=not args.public)}"
                      f" ({'public' if args.public else 'private'})")
            return Path(args.local_dir) if args.local_dir else None
    except (ExportError, OSError) as exc:  # bad input: one line, exit status 2
        fail("upload_to_hub.py", redact(str(exc)))


if __name__ == "__main__":
    main()
