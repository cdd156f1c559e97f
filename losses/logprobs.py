"""The one place where log-probabilities are read off a model, shared by every loss."""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Config fields of model families whose forward() transforms the logits after the output head
# (Gemma 2/3 soft-capping, Cohere, Granite, Falcon-H1 scaling): for them the full forward pass is used.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")


def transforms_logits(model: torch.nn.Module) -> bool:
    """Whether ``model``'s forward() changes the logits after its output head (``LOGIT_TRANSFORMS``), so that the head
    applied to the decoder's hidden states would not give them."""
    return any(getattr(model.config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS)


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[target] for every position.

    Args:
        logits: (..., V) unnormalised scores; upcast to float32 so the log-softmax is exact in bf16 runs.
        targets: (...) token ids, all valid (no -100).
        temperature: the policy's temperature; at 1 the logits are read as they are (no division).

    Returns:
        (...) log-probabilities.
    """
    if temperature != 1:
        logits = logits / temperature
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return -flat.view(targets.shape)


def shift_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets and their mask: position t of the output predicts labels[:, t + 1].

    Args:
        labels: (B, T) token ids with -100 where no loss is taken.

    Returns:
        targets (B, T-1) with -100 replaced by 0, and mask (B, T-1) bool.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return targets.masked_fill(~mask, 0), mask


def head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
                  ) -> torch.Tensor:
    """log p(target) from hidden states (N, H) through the output head: the vocabulary projection and its
    log-softmax, the step's largest tensors, at ``temperature`` (the log-softmax of logits / temperature). A function
    of its own so that it can be compiled as one graph (``torch.compile`` then fuses the float32 upcast and the
    log-softmax into the reads of the logits)."""
    return gather_logprobs(head(hidden), targets, temperature)


def tempered(head_fn, temperature: float):
    """``head_fn`` (``head_logprobs`` or its compiled version) reading the policy at ``temperature``: itself at 1, so
    an untempered read calls it exactly as before temperatures existed."""
    return head_fn if temperature == 1 else functools.partial(head_fn, temperature=temperature)


def compile_head(model: torch.nn.Module) -> None:
    """Make every ``token_logprobs`` of ``model`` use ``head_logprobs`` compiled by ``torch.compile`` (--compile-head):
    the projection, float32 upcast and log-softmax run as one graph that never writes the float32 logits. Compiled
    for any number of selected positions (``dynamic=True``), so batches of other sizes reuse the graph."""
    model.logprob_head = torch.compile(head_logprobs, dynamic=True)


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor, head_fn=None, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label | prefix) of a causal LM, computing the vocabulary projection only where labels are.

    The output head is the largest matrix of a small model (49k x 576 for SmolLM2); skipping it on
    prompt and padding positions saves memory and time without changing any value. ``head_fn`` computes
    the log-probabilities of the selected positions: by default ``head_logprobs``, or its compiled version where
    ``compile_head(model)`` set one. ``temperature`` reads the tempered policy, softmax(logits / temperature): online
    RL's loss at its sampling temperature.

    Returns:
        logps (B, T-1), 0 where masked; mask (B, T-1) bool.
    """
    targets, mask = shift_labels(labels)
    head_fn = head_fn or getattr(model, "logprob_head", head_logprobs)
    head = model.get_output_embeddings()
    if head is None or transforms_logits(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
        return gather_logprobs(logits, targets, temperature) * mask, mask
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    selected = hidden[:, :-1][mask]  # (N, H), N = answer tokens
    logps = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    logps[mask] = tempered(head_fn, temperature)(head, selected, targets[mask])
    return logps, mask


def cache_kwarg(model) -> str:
    """The name a model's forward takes its KV cache by: ``cache`` from transformers 5.24 on (``past_key_values``
    is deprecated there), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def cache_rows(cache, rows: torch.Tensor, out):
    """The empty KV cache ``out``, filled with rows ``rows`` (with repeats) of ``cache``; ``cache`` itself is left as
    it is."""
    for layer_index, layer in enumerate(cache.layers):
        out.update(layer.keys[rows], layer.values[rows], layer_index)
    return out


def shared_prompt_exact(model: torch.nn.Module, width: int | None = None) -> bool:
    """Whether ``shared_prompt_logprobs`` reads ``model``'s ``token_logprobs`` numbers (up to float rounding) for
    prompt + answer widths up to ``width`` (None: any): a decoder and an output head applied as is
    (``transforms_logits`` False), every layer full causal attention. A sliding-window layer counts the prompt's
    padding between prompt and answer as distance, so it is exact only where the window covers ``width``; chunked,
    linear or recurrent layers never are."""
    if getattr(model, "get_output_embeddings", lambda: None)() is None or not hasattr(model, "get_decoder"):
        return False
    if transforms_logits(model):
        return False
    config = model.config
    if getattr(config, "attention_chunk_size", None):
        return False
    layer_types = set(getattr(config, "layer_types", None) or ())
    if not layer_types <= {"full_attention", "sliding_attention"}:
        return False
    window = getattr(config, "sliding_window", None)
    windowed = "sliding_attention" in layer_types or (not layer_types and window and getattr(config, "use_sliding_window", True))
    return not windowed or (width is not None and window is not None and width <= window)


def shared_prompt_logprobs(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           answer_ids: torch.Tensor, answer_mask: torch.Tensor, group: torch.Tensor,
                           head_fn=None, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log p(answer token | prompt, earlier answer tokens) of N answers to P prompts, each prompt run once.

    ``token_logprobs`` over prompt + answer runs a prompt's tokens once per answer; online RL has K answers to each
    prompt, and its prompts (SmolLM2's chat template with its system turn: 55-80 tokens) are longer than many answers.
    Here the P prompts run through the decoder once and leave their KV cache; its rows are copied to the answers
    (answer i reads prompt ``group[i]``'s), and the answers run over the copies. Answer token 0 is predicted by the
    prompt's last position, token j > 0 by answer position j - 1. The copies are differentiable, so the gradient of
    each answer's log-probs reaches the prompt's pass and the weights exactly as through the full sequence: the
    log-probs and their gradients are ``token_logprobs``'s up to float rounding, for P prompt passes instead of N.
    Right padding throughout (the prompts' padding sits between prompt and answer, masked), so no query row is fully
    masked. For the models ``shared_prompt_exact`` accepts.

    Args:
        prompt_ids, prompt_mask: (P, Lp) prompts, right-padded.
        answer_ids, answer_mask: (N, A) answers, right-padded.
        group: (N,) long, the prompt of each answer.
        head_fn, temperature: as in ``token_logprobs``.

    Returns:
        (N, A) log-probabilities, 0 where ``answer_mask`` is 0.
    """
    from transformers import DynamicCache

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    head_fn = head_fn or getattr(model, "logprob_head", head_logprobs)
    kw = cache_kwarg(decoder)
    prompt_lengths = prompt_mask.sum(-1)  # (P,)
    positions = torch.arange(prompt_ids.shape[1], device=prompt_ids.device)
    cache = DynamicCache()
    prompt_hidden = decoder(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions.expand_as(prompt_ids),
                            use_cache=True, **{kw: cache}).last_hidden_state  # (P, Lp, H)
    if cache.get_seq_length() != prompt_ids.shape[1]:
        raise RuntimeError("the decoder left no KV cache of the prompts (activation checkpointing turns it off), so "
                           "they cannot be run once for all their answers: train with --no-share-prompt-pass")
    last = prompt_hidden[torch.arange(len(prompt_ids), device=prompt_ids.device), prompt_lengths - 1]  # (P, H)
    answer_positions = prompt_lengths[group, None] + torch.arange(answer_ids.shape[1], device=answer_ids.device)
    hidden = decoder(input_ids=answer_ids, attention_mask=torch.cat([prompt_mask[group], answer_mask], 1),
                     position_ids=answer_positions, use_cache=True,
                     **{kw: cache_rows(cache, group, DynamicCache())}).last_hidden_state  # (N, A, H)
    predictors = torch.cat([last[group, None], hidden[:, :-1]], 1)  # (N, A, H): the position before each token
    selected = answer_mask.bool()
    logps = torch.zeros(answer_ids.shape, dtype=torch.float32, device=answer_ids.device)
    logps[selected] = tempered(head_fn, temperature)(head, predictors[selected], answer_ids[selected])
    return logps
