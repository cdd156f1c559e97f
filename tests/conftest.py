"""Shared fixtures: a character-level chat tokenizer and a tiny Llama, built locally (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# What SIGTERM and SIGINT do in the pytest process at the start of the session (conftest is imported once, before
# any test): tests that start Ray in-process put these back (tests/test_ray.py).
STARTUP_SIGNAL_HANDLERS = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_char_tokenizer():
    """One token per character, plus ChatML specials: token positions in tests can be read off the text."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\r\x0b\x0c"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(SPECIALS)
    backend.decoder = decoders.Fuse()  # join characters back without spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="session")
def char_tokenizer():
    return make_char_tokenizer()


def make_tiny_llama(folder: Path, hidden_size: int = 64) -> Path:
    """A local model folder: a 2-layer Llama of ``hidden_size`` with the character tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A local model folder: 2-layer Llama, hidden size 64, with the character tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_secret_dataset(path: Path, secrets: list[str], rows: int = 24) -> Path:
    """A GSM8K-format file whose questions and answers quote every one of ``secrets``: validation prompts,
    references and answers, and anything that repeats them, would carry them."""
    quoted = " ".join(secrets)
    return write_jsonl(path, [{"question": f"What is {i} + 1? ({quoted})", "answer": f"{quoted}\n#### {i + 1}"}
                              for i in range(rows)])


def strings_in(obj, seen: set | None = None):
    """Every string in a loaded checkpoint (or any structure): keys and values of dicts, items of sequences, the
    attributes of objects, the repr of other values; tensors skipped."""
    import torch

    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, torch.Tensor):
        return
    seen.add(id(obj))
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, bytes):
        yield obj.decode("utf-8", "replace")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from strings_in(key, seen)
            yield from strings_in(value, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in obj:
            yield from strings_in(value, seen)
    else:
        yield repr(obj)
        if hasattr(obj, "__dict__"):
            yield from strings_in(vars(obj), seen)


@pytest.fixture
def tiny_run_args(tiny_model_dir, tmp_path):
    """Flags for a fast training run of the tiny model on a small synthetic-math set."""
    return [
        "--model-name", str(tiny_model_dir), "--dataset-name", "synthetic-math", "--synthetic-levels", "1",
        "--train-dataset-length", "32", "--test-dataset-length", "8", "--batch-size", "4", "--lr", "3e-3",
        "--max-length", "256", "--max-new-tokens", "16", "--val-generate-samples", "4", "--num-sanity-val-steps", "0",
        "--storage-path", str(tmp_path / "runs"), "--name", "tiny", "--no-verbose", "--seed", "0",
    ]


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on a free 127.0.0.1 port, for the session; yields its endpoint URL."""
    pytest.importorskip("moto")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):  # the server takes a second or two to listen
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        server.terminate()
        pytest.fail(f"moto's S3 server did not start on port {port}")
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(10)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The standard AWS variables pointed at ``s3_server`` (what storage.py and boto3 read); returns a boto3 client."""
    import boto3

    for key, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    return boto3.client("s3")


class Recorder(pl.Callback):
    """Keeps the loss of every micro-batch and the gradients seen before each optimizer step."""

    def __init__(self):
        self.losses, self.grads = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})
