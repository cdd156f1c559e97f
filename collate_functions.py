"""Tokenization with assistant-only labels, padding, and length-grouped batching.

The SFT mask comes from the tokenizer's own chat template: the conversation is rendered once,
and for each assistant turn the character span between "prompt so far + generation header"
and "prompt including this turn" is the answer. Tokens starting inside such a span are learned,
including the template's end-of-turn token (``<|im_end|>`` for ChatML); everything else (system and
user turns, role headers, the newline after end-of-turn, padding) gets label -100.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from losses.logprobs import IGNORE_INDEX
from losses.sft import VERIFIER_PARTS

INVALID_PROMPT = "invalid: the prompt alone fills --max-length"


class ChatTemplateError(ValueError):
    """The chat template does not render conversations as prefixes of each other, so masks can't be derived."""


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of every assistant answer.

    An answer's span ends after the template's end-of-turn marker but before trailing whitespace,
    so the model learns to emit end-of-turn and nothing after it.
    """
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ChatTemplateError("a conversation cannot start with an assistant turn")
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not (text.startswith(prompt) and text.startswith(upto) and len(upto) > len(prompt)):
            raise ChatTemplateError(
                "the chat template does not render earlier turns identically when later turns are added "
                "(e.g. it rewrites past assistant turns); assistant-only masks cannot be derived for it"
            )
        end = len(upto)
        while end > len(prompt) and upto[end - 1].isspace():
            end -= 1
        spans.append((len(prompt), end))
    return text, spans


def tokenize_chat(tokenizer, messages: list[dict], max_length: int, overlong: str) -> tuple[dict | None, str]:
    """``input_ids`` and ``labels`` of one conversation, and what happened: 'ok', 'truncated' or a drop reason."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [
        tok if any(start <= s < end for start, end in spans) and e > s else IGNORE_INDEX
        for tok, (s, e) in zip(ids, offsets)
    ]
    first_answer = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    if first_answer >= max_length:
        return None, INVALID_PROMPT
    status = "ok"
    if len(ids) > max_length:
        if overlong == "drop":
            return None, "dropped: longer than --max-length"
        ids, labels, status = ids[:max_length], labels[:max_length], "truncated"
    return {"input_ids": ids, "labels": labels}, status


def tokenize_sft(tokenizer, row: dict, max_length: int, overlong: str) -> tuple[dict | None, str]:
    """A normalised row's conversation, as ``tokenize_chat`` does it."""
    return tokenize_chat(tokenizer, row["messages"], max_length, overlong)


def tokenize_pair(tokenizer, row: dict, max_length: int, overlong: str) -> tuple[dict | None, str]:
    """Chosen and rejected answers to the same prompt, each tokenized and masked exactly as for SFT."""
    chosen, chosen_status = tokenize_chat(tokenizer, row["messages"], max_length, overlong)
    rejected_chat = [*row["messages"][:-1], {"role": "assistant", "content": row["rejected"]}]
    rejected, rejected_status = tokenize_chat(tokenizer, rejected_chat, max_length, overlong)
    if chosen is None or rejected is None:
        return None, chosen_status if chosen is None else rejected_status
    feature = {"chosen_input_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
               "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"]}
    return feature, "truncated" if "truncated" in (chosen_status, rejected_status) else "ok"


def tokenize_verifier(tokenizer, row: dict, max_length: int, overlong: str) -> tuple[dict | None, str]:
    """A GenRM-CoT row (verification rationale or correct solution) as for SFT, plus its ``part`` (0 or 1)."""
    feature, status = tokenize_chat(tokenizer, row["messages"], max_length, overlong)
    if feature is not None:
        feature["part"] = VERIFIER_PARTS.index(row["part"])
    return feature, status


def generation_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the conversation up to (and including) the header of the final assistant answer."""
    prompt = render(tokenizer, messages[:-1], add_generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class BatchPlan:
    """Indices of one micro-batch, and the loss units (answer tokens, or pairs; per part for a loss of several parts)
    of its whole accumulation window (all workers), counted by the objective's ``units``. The loss summed over a
    micro-batch is divided by the window's count, so that every answer token (or pair) weighs the same whatever the
    batch size, accumulation or worker count.
    """

    indices: tuple[int, ...]
    window_units: int | tuple[int, ...]


class SFTCollator:
    """Right-pads a micro-batch: ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding), to the longest row's
    width rounded up to a multiple of ``multiple`` (``precision.sequence_multiple``: 8 under FP8, else 1)."""

    def __init__(self, pad_token_id: int, multiple: int = 1):
        self.pad_token_id, self.multiple = pad_token_id, multiple

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = -(-max(len(f["input_ids"]) for f in features) // self.multiple) * self.multiple  # rounded up
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PreferenceCollator(SFTCollator):
    """A batch of B pairs as one padded batch of 2B sequences: chosen answers in rows 0..B-1, rejected in B..2B-1,
    so both go through the model in one forward pass. Precomputed reference log-probs come along as ``ref_logps`` (2B,)."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [{"input_ids": f[f"{side}_input_ids"], "labels": f[f"{side}_labels"]}
                     for side in ("chosen", "rejected") for f in features]
        batch = super().__call__(sequences)
        if "ref_logps" in features[0]:
            batch["ref_logps"] = torch.tensor([f["ref_logps"][side] for side in (0, 1) for f in features])
        return batch


class VerifierCollator(SFTCollator):
    """An SFT batch plus ``part`` (B,): 0 for verification rows, 1 for correct-solution rows, whose answer tokens
    the GenRM-CoT loss averages over separately."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(features)
        batch["part"] = torch.tensor([f["part"] for f in features])
        return batch


def target_count(feature: dict) -> int:
    """Tokens the loss is computed on (the first position is never predicted)."""
    return sum(1 for label in feature["labels"][1:] if label != IGNORE_INDEX)


def feature_length(feature: dict) -> int:
    """Padded width a feature needs (the longer side of a pair)."""
    return max(len(value) for key, value in feature.items() if key.endswith("input_ids"))


class LengthGroupedBatchSampler:
    """Batches of similar length (little padding), in a seeded random order that is new each epoch.

    Indices are shuffled, cut into mega-batches of ``group`` global batches (small enough that batches
    differ between epochs even on a few hundred rows), sorted by length inside each,
    then cut into global batches (``batch_size`` x ``world_size`` rows) whose order is shuffled again. With
    ``shuffle=False`` batches are sorted by length. Resumable: ``skip_batches(epoch, n)`` makes the iteration of
    ``epoch`` start at batch ``n``. With ``repeat`` > 1 every accumulation window comes that many times in a row.
    Distributed: each step's global batch is split into ``world_size`` consecutive
    slices, rank r taking slice r; so the rows of every optimizer step are the same for 2 workers of batch B as for
    1 worker of batch 2B, and only the arithmetic is spread out.
    """

    def __init__(self, lengths: list[int], targets: list[int], batch_size: int, accumulate: int = 1,
                 shuffle: bool = True, seed: int = 0, group: int = 16, rank: int = 0, world_size: int = 1,
                 repeat: int = 1):
        self.lengths, self.targets, self.repeat = lengths, targets, repeat
        self.batch_size, self.accumulate, self.shuffle = batch_size, accumulate, shuffle
        self.seed, self.group, self.rank, self.world_size = seed, group, rank, world_size
        self.epoch = 0
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_batches(self, epoch: int, n: int) -> None:
        self._skip = (epoch, n)

    def plan(self, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch`` (all ranks' rows of each step), in order."""
        size = self.batch_size * self.world_size
        order = list(range(len(self.lengths)))
        if not self.shuffle:
            order.sort(key=lambda i: -self.lengths[i])
            return [order[i:i + size] for i in range(0, len(order), size)]
        rng = random.Random(self.seed * 1_000_003 + epoch)
        rng.shuffle(order)
        mega = size * self.group
        batches = []
        for m in range(0, len(order), mega):
            chunk = sorted(order[m:m + mega], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + size] for i in range(0, len(chunk), size)]
        rng.shuffle(batches)
        return batches

    def _slices(self, batch: list[int]) -> list[list[int]]:
        """A global batch split into ``world_size`` slices of ``batch_size`` (a short last batch: as even as can be)."""
        per, extra = divmod(len(batch), self.world_size)
        bounds = [r * per + min(r, extra) for r in range(self.world_size + 1)]
        return [batch[bounds[r]:bounds[r + 1]] for r in range(self.world_size)]

    def _steps(self) -> list[list[list[int]]]:
        # A short global batch with fewer rows than ranks would leave a rank without data: it is left out.
        steps = [self._slices(b) for b in self.plan(self.epoch) if len(b) >= self.world_size]
        if self.repeat == 1:
            return steps
        # Each whole accumulation window ``repeat`` times in a row (online RL's --updates-per-rollout: several
        # optimizer steps on one batch of rollouts); a last, short window is left out, or its repeats would merge.
        a = self.accumulate
        return [s for w in range(0, len(steps) - a + 1, a) for _ in range(self.repeat) for s in steps[w:w + a]]

    def __len__(self) -> int:
        n, size = len(self.lengths), self.batch_size * self.world_size
        steps = n // size + (n % size >= self.world_size)
        return steps if self.repeat == 1 else steps // self.accumulate * self.accumulate * self.repeat

    def __iter__(self) -> Iterator[BatchPlan]:
        steps = self._steps()
        start = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            start, self._skip = self._skip[1], None
        for k in range(start, len(steps)):
            w0 = k - k % self.accumulate
            window = steps[w0:w0 + self.accumulate]
            units = [self.targets[i] for group in window for batch in group for i in batch]
            total = tuple(map(sum, zip(*units))) if isinstance(units[0], tuple) else sum(units)  # per part, if parts
            yield BatchPlan(tuple(steps[k][self.rank]), total)


class PlannedDataset(torch.utils.data.Dataset):
    """Turns a ``BatchPlan`` into a collated batch: the bridge between the sampler and the collator."""

    def __init__(self, features: list[dict], collator: SFTCollator):
        self.features, self.collator = features, collator

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, plan: BatchPlan) -> dict[str, torch.Tensor]:
        batch = self.collator([self.features[i] for i in plan.indices])
        batch["window_units"] = torch.tensor(plan.window_units)
        return batch
