"""Serving a GenRM-CoT verifier: sample verification rationales from one shared prefill per prompt, read p("Yes").

``score_solutions`` is the entry point: it builds the verification prompt of each (question, solution), and hands
``losses.sft.compute_verifier_scores`` (the adaptive-K loop) a ``RationaleSampler`` that draws its groups.

How one group of rationales is drawn (``RationaleSampler``):

1. At construction, the prompts (question + solution + "Let's verify step by step.", as a chat prompt) are
   left-padded and run through the model once, all but their last token: the prefix KV cache.
2. A call for n rationales of some prompts copies their cache rows n times and decodes all rows together,
   token by token, with temperature sampling. The prompt is never re-run, whatever K.
3. A rationale is over when its text ends with the verdict question "Verification: Is the answer correct
   (Yes/No)?" (the trained verifier asks it itself), or at end-of-turn or --max-new-tokens, in which case the
   question is appended token by token. The next-token distribution after the question gives p("Yes").
4. Finished rows leave the batch (their cache rows are dropped), so short rationales do not wait for long ones.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: the repo root's modules

from extension.data_preparation import VERDICT, build_prompt  # noqa: E402
from losses.sft import VerifierScore, compute_verifier_scores, yes_probabilities  # noqa: E402


@dataclass(frozen=True)
class VerdictTokens:
    """How a tokenizer spells the verdict question and its two answers.

    ``question_ids`` are appended to a rationale that ends without the question; ``suffix`` is the text a
    rationale ends with when it asked the question itself; ``yes_id``/``no_id`` are the first tokens where
    "<question> Yes" and "<question> No" differ (" Yes"/" No" for SmolLM2; "Y"/"N" after a space token for
    character-level tokenizers, the space then being part of the question).
    """

    question_ids: tuple[int, ...]
    suffix: str
    yes_id: int
    no_id: int


def verdict_tokens(tokenizer, question: str = VERDICT) -> VerdictTokens:
    """The ``VerdictTokens`` of ``tokenizer``; raises ValueError if "Yes" and "No" cannot be told apart."""
    yes = tokenizer("\n" + question + " Yes", add_special_tokens=False)["input_ids"]
    no = tokenizer("\n" + question + " No", add_special_tokens=False)["input_ids"]
    common = 0
    while common < min(len(yes), len(no)) and yes[common] == no[common]:
        common += 1
    shared = tokenizer.decode(yes[:common])
    if common == min(len(yes), len(no)) or question not in shared:
        raise ValueError(f"the tokenizer does not split {question!r} from its ' Yes'/' No' answer: "
                         f"p('Yes') cannot be read at one position")
    suffix = shared[shared.index(question):]
    return VerdictTokens(tuple(yes[:common]), suffix, yes[common], no[common])


def verification_prompt_ids(tokenizer, question: str, solution: str) -> list[int]:
    """Chat-prompt token ids asking to verify ``solution``, as the verifier was trained (a user turn with
    ``build_prompt``'s text, then the assistant header)."""
    from collate_functions import generation_prompt_ids

    messages = [{"role": "user", "content": build_prompt(question, solution)}, {"role": "assistant", "content": ""}]
    return generation_prompt_ids(tokenizer, messages)


def _cache_rows(cache, rows: torch.Tensor):
    """A new cache holding rows ``rows`` (with repeats) of ``cache``; ``cache`` itself is left as it is."""
    from transformers import DynamicCache

    out = DynamicCache()
    for layer_index, layer in enumerate(cache.layers):
        out.update(layer.keys[rows], layer.values[rows], layer_index)
    return out


class RationaleSampler:
    """Draws verification rationales and their verdicts for a fixed list of prompts (see the module docstring).

    Args:
        model, tokenizer: the verifier.
        prompts: token ids of each prompt (e.g. ``verification_prompt_ids``).
        max_new_tokens: rationale budget; the question is appended after it if needed.
        temperature: sampling temperature (0: greedy).
        share_prefix: run each prompt once and copy its cache to the samples (True), or run the prompt again for
            every sample, as ``generate(num_return_sequences=K)`` does (False, for the benchmark).
        seed: seeds the sampling (a ``torch.Generator`` on the model's device).
    """

    def __init__(self, model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 256, temperature: float = 0.7,
                 share_prefix: bool = True, seed: int = 0):
        if not prompts or any(len(p) < 2 for p in prompts):
            raise ValueError("every verification prompt needs at least 2 tokens")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.share_prefix = max_new_tokens, temperature, share_prefix
        self.device = next(model.parameters()).device
        self.verdict = verdict_tokens(tokenizer)
        self.stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None, tokenizer.unk_token_id}
        self.generator = torch.Generator(self.device).manual_seed(seed)
        width = max(len(p) for p in prompts)
        self.ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)  # (P, W) left-padded
        self.mask = torch.zeros_like(self.ids)
        for row, p in enumerate(prompts):
            self.ids[row, width - len(p):] = torch.tensor(p)
            self.mask[row, width - len(p):] = 1
        self.ids, self.mask = self.ids.to(self.device), self.mask.to(self.device)
        self.prompt_tokens_run = 0  # prompt tokens the model processed: each prompt once when shared
        self.prefix = self._prefill(torch.arange(len(prompts), device=self.device)) if share_prefix else None

    @torch.no_grad()
    def _prefill(self, rows: torch.Tensor):
        """The KV cache of ``rows``' prompts without their last token."""
        from transformers import DynamicCache

        cache = DynamicCache()
        mask = self.mask[rows, :-1]
        self.model(input_ids=self.ids[rows, :-1], attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   past_key_values=cache, use_cache=True)
        self.prompt_tokens_run += int(mask.sum())
        return cache

    def __call__(self, indices: list[int], n: int) -> list[list[tuple[float, float, str]]]:
        """``n`` rationales for each prompt in ``indices``: per prompt, (p_yes, p_normalized, rationale) triples."""
        rows = torch.tensor(indices, device=self.device).repeat_interleave(n)  # (R,) prompt of each sample
        cache = _cache_rows(self.prefix, rows) if self.share_prefix else self._prefill(rows)
        results, generated = self._decode(cache, rows)
        self.last_generated = [generated[i * n:(i + 1) * n] for i in range(len(indices))]  # token ids, for tests
        return [results[i * n:(i + 1) * n] for i in range(len(indices))]

    @torch.no_grad()
    def _decode(self, cache, rows: torch.Tensor) -> tuple[list[tuple[float, float, str]], list[list[int]]]:
        was_training = self.model.training
        self.model.eval()
        verdict = self.verdict
        total = rows.shape[0]
        alive = list(range(total))  # sample of each batch row
        current = self.ids[rows, -1]  # (R,) the next token to feed: first the prompt's last one
        position = self.mask[rows].sum(-1) - 1  # (R,)
        attention = self.mask[rows]  # (R, W + generated so far)
        generated: list[list[int]] = [[] for _ in range(total)]
        forced: list[list[int]] = [[] for _ in range(total)]  # question tokens still to append
        asked = [False] * total  # the token being fed ends the question: its output is the verdict
        results: list[tuple[float, float, str] | None] = [None] * total
        while alive:
            logits = self.model(input_ids=current[:, None], attention_mask=attention, position_ids=position[:, None],
                                past_key_values=cache, use_cache=True).logits[:, -1]  # (R, V)
            if self.temperature > 0:
                probs = torch.softmax(logits.float() / self.temperature, dim=-1)
                sampled = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
            else:
                sampled = logits.argmax(-1)
            p_yes, p_normalized = yes_probabilities(logits, verdict.yes_id, verdict.no_id)
            next_tokens, keep = sampled.tolist(), []
            for b, sample in enumerate(alive):
                if asked[sample]:
                    text = self.tokenizer.decode(generated[sample], skip_special_tokens=True)
                    text = text.strip().removesuffix(verdict.suffix.strip()).strip()  # the rationale, without the question
                    results[sample] = (float(p_yes[b]), float(p_normalized[b]), text)
                    continue
                keep.append(b)
                if not forced[sample]:
                    token = next_tokens[b]
                    if token in self.stop_ids or len(generated[sample]) >= self.max_new_tokens:
                        forced[sample] = list(verdict.question_ids)  # end-of-turn or budget: ask the question
                    else:
                        generated[sample].append(token)
                        tail = self.tokenizer.decode(generated[sample][-len(verdict.question_ids) - 4:])
                        asked[sample] = tail.endswith(verdict.suffix)
                if forced[sample]:
                    next_tokens[b] = forced[sample].pop(0)
                    asked[sample] = not forced[sample]
            if not keep:
                break
            if len(keep) < len(alive):  # finished rows leave the batch and the cache
                index = torch.tensor(keep, dtype=torch.long, device=self.device)
                cache.batch_select_indices(index)
                attention, position = attention[index], position[index]
                alive = [alive[b] for b in keep]
            current = torch.tensor([next_tokens[b] for b in keep], device=self.device)
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            position = position + 1
        self.model.train(was_training)
        return results, generated


def score_prompts(model, tokenizer, prompts: list[list[int]], k_min: int = 8, k_max: int = 32, tau: float = 0.05,
                  temperature: float = 0.7, max_new_tokens: int = 256, prompts_per_batch: int = 8, seed: int = 0,
                  share_prefix: bool = True, progress: bool = False) -> list[VerifierScore]:
    """Verifier scores (r_MajV@K, adaptive K) of verification prompts (token ids), ``prompts_per_batch`` at a time:
    one ``RationaleSampler`` (one prefill) per batch, whose groups decode up to prompts_per_batch * K_min rows.

    See ``losses.sft.compute_verifier_scores`` for K_min, K_max and tau, ``RationaleSampler`` for the rest.
    """
    from tqdm import tqdm

    scores: list[VerifierScore] = []
    starts = range(0, len(prompts), prompts_per_batch)
    for start in tqdm(starts, desc="verifying", unit="batch", disable=not progress, leave=False):
        chunk = prompts[start:start + prompts_per_batch]
        sampler = RationaleSampler(model, tokenizer, chunk, max_new_tokens, temperature, share_prefix, seed=seed + start)
        scores += compute_verifier_scores(sampler, len(chunk), k_min, k_max, tau)
    return scores


def score_solutions(model, tokenizer, questions: list[str], solutions: list[str], **kwargs) -> list[VerifierScore]:
    """Verifier scores of each (question, solution): ``score_prompts`` of their verification prompts."""
    prompts = [verification_prompt_ids(tokenizer, q, s) for q, s in zip(questions, solutions, strict=True)]
    return score_prompts(model, tokenizer, prompts, **kwargs)
