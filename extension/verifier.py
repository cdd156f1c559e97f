"""Serving a GenRM-CoT verifier: sample verification rationales from one shared prefill per prompt, read p("Yes").

``score_solutions`` is the entry point: it builds the verification prompt of each (question, solution), and hands
``compute_verifier_scores`` (the adaptive-K loop) a ``RationaleSampler`` that draws its groups.

How one group of rationales is drawn (``RationaleSampler``, on ``sampling.PrefixSampler``: the decoding loop online
RL's rollouts use too):

1. At construction, the prompts (question + solution + "Let's verify step by step.", as a chat prompt) are
   left-padded and run through the model once, all but their last token: the prefix KV cache.
2. A call for n rationales of some prompts copies their cache rows n times and decodes all rows together,
   token by token, with temperature sampling. The prompt is never re-run, whatever K.
3. A rationale is over when its text ends with the verdict question "Verification: Is the answer correct
   (Yes/No)?" (the trained verifier asks it itself), or at end-of-turn or --max-new-tokens, in which case the
   question is appended token by token. The next-token distribution after the question gives p("Yes").
4. Finished rows leave the batch (their cache rows are dropped), so short rationales do not wait for long ones.

With ``static_cache=True`` (``--cuda-graphs`` on a GPU) step 2 runs ``PrefixSampler.decode_static`` instead: every
row stays in the batch until the last verdict, and on a CUDA device each token's forward pass is one CUDA graph
replay. The rationales, verdicts and random stream are the dynamic path's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from config import VERIFIER_K_MAX, VERIFIER_K_MIN, VERIFIER_TAU, VERIFIER_TEMPERATURE
from extension.data_preparation import VERDICT, build_prompt
from sampling import PrefixSampler

# ---- the score: p("Yes") after a rationale, averaged over an adaptive number of rationales ----------------

def yes_probabilities(logits: torch.Tensor, yes_id: int, no_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The verifier's verdict at the position after "Is the answer correct (Yes/No)?":

        p_yes = softmax(logits)[Yes]                  (r_CoT of the paper, eq. 5: the score used everywhere)
        p_normalized = p_yes / (p_yes + p_no)          (reported beside it; ignores mass on other tokens)

    Args:
        logits: (N, V) next-token logits, upcast to float32.

    Returns:
        p_yes (N,), p_normalized (N,).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    p_yes, p_no = probs[:, yes_id], probs[:, no_id]
    return p_yes, p_yes / (p_yes + p_no).clamp(min=torch.finfo(torch.float32).tiny)


@dataclass
class VerifierScore:
    """The verdicts of K sampled rationales on one (problem, solution) and their mean (r_MajV@K, eq. 6)."""

    p_yes: list[float]
    p_normalized: list[float]
    rationales: list[str] = field(default_factory=list)

    @property
    def k(self) -> int:
        return len(self.p_yes)

    @property
    def score(self) -> float:
        """r_MajV@K = (1 / K) * sum_k p_yes_k: the verifier's score."""
        return sum(self.p_yes) / len(self.p_yes)

    @property
    def normalized(self) -> float:
        """The mean of Yes / (Yes + No), for comparison."""
        return sum(self.p_normalized) / len(self.p_normalized)

    @property
    def variance(self) -> float:
        return p_yes_variance(self.p_yes)


def p_yes_variance(values: list[float]) -> float:
    """Population variance (1 / K) * sum (p_k - mean)^2 of the p("Yes") values so far (0 for one value)."""
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


def should_stop(values: list[float], k_min: int, k_max: int, tau: float) -> bool:
    """Adaptive K's rule: stop at K_max, or from K_min on as soon as the variance of p("Yes") is below tau."""
    return len(values) >= k_max or (len(values) >= k_min and p_yes_variance(values) < tau)


def adaptive_k(values: list[float], k_min: int, k_max: int, tau: float) -> int:
    """How many of ``values`` (a stream of p("Yes") samples) the adaptive loop of ``compute_verifier_scores``
    would have used: the first group boundary (K_min, 2 K_min, ..., K_max) at which ``should_stop`` holds.
    Lets one run of K_max samples tell what adaptive K would have decided on the same samples."""
    k = 0
    while True:
        k = min(k + k_min, k_max, len(values))
        if should_stop(values[:k], k_min, k_max, tau) or k == len(values):
            return k


# A sampler draws ``n`` more rationales for each of the given prompt indices and returns, per index, their
# (p_yes, p_normalized, rationale text) triples.
Sampler = Callable[[list[int], int], list[list[tuple[float, float, str]]]]


def compute_verifier_scores(sample: Sampler, n_prompts: int, k_min: int = VERIFIER_K_MIN, k_max: int = VERIFIER_K_MAX,
                            tau: float = VERIFIER_TAU) -> list[VerifierScore]:
    """r_MajV@K with adaptive K for ``n_prompts`` verification prompts.

    Rationales are drawn in groups of K_min for every prompt still undecided; a prompt stops as soon as the
    variance of its p("Yes") values is below tau, or at K_max (the last group is cut to fit). Prompts are
    sampled together, so a group is one batched call of ``sample`` (``extension.verifier.RationaleSampler``
    decodes the group from one shared prefill of each prompt).

    Args:
        sample: draws rationales; tests script it.
        n_prompts: prompts are the indices 0..n_prompts-1 of ``sample``.
        k_min: group size and the fewest rationales per prompt (8 in our users' runs).
        k_max: the most rationales per prompt (32).
        tau: the variance threshold (0.05).

    Returns:
        One ``VerifierScore`` per prompt, with every sampled verdict.
    """
    if not 1 <= k_min <= k_max:
        raise ValueError(f"need 1 <= K_min <= K_max, got K_min={k_min}, K_max={k_max}")
    if tau < 0:
        raise ValueError(f"tau must be 0 or more, got {tau}")
    scores = [VerifierScore([], []) for _ in range(n_prompts)]
    active = list(range(n_prompts))
    while active:
        n = min(k_min, k_max - scores[active[0]].k)  # active prompts advance in step: all have the same K
        drawn = sample(active, n)
        for index, samples in zip(active, drawn, strict=True):
            if len(samples) != n:
                raise ValueError(f"the sampler returned {len(samples)} rationales for prompt {index}, not {n}")
            for p_yes, p_normalized, text in samples:
                scores[index].p_yes.append(float(p_yes))
                scores[index].p_normalized.append(float(p_normalized))
                scores[index].rationales.append(text)
        active = [i for i in active if not should_stop(scores[i].p_yes, k_min, k_max, tau)]
    return scores


# ---- drawing rationales ------------------------------------------------------------------------------------

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


class RationaleSampler(PrefixSampler):
    """Draws verification rationales and their verdicts for a fixed list of prompts (see the module docstring):
    ``sampling.PrefixSampler``'s shared prefill and decoding loop, with the verdict question asked at the end.

    Args:
        model, tokenizer: the verifier.
        prompts: token ids of each prompt (e.g. ``verification_prompt_ids``).
        max_new_tokens: rationale budget; the question is appended after it if needed.
        temperature: sampling temperature (0: greedy).
        share_prefix: run each prompt once and copy its cache to the samples (True), or run the prompt again for
            every sample, as ``generate(num_return_sequences=K)`` does (False, for the benchmark).
        seed: seeds the sampling (a ``torch.Generator`` on the model's device).
        progress: a ``models.token_bar`` the decoding counts its tokens into, step by step (None: no bar).
        static_cache: decode over a static KV cache, each token's forward pass replayed as a CUDA graph on a CUDA
            device (``sampling.PrefixSampler.decode_static``); the same rationales and verdicts as the dynamic cache.
    """

    def __init__(self, model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 256, temperature: float = VERIFIER_TEMPERATURE,
                 share_prefix: bool = True, seed: int = 0, progress=None, static_cache: bool = False):
        if not prompts or any(len(p) < 2 for p in prompts):
            raise ValueError("every verification prompt needs at least 2 tokens")
        from models import stop_token_ids

        self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens
        self.verdict = verdict_tokens(tokenizer)
        self.stop_ids = stop_token_ids(tokenizer)
        super().__init__(model, prompts, tokenizer.pad_token_id, temperature, share_prefix=share_prefix, seed=seed,
                         progress=progress, static_cache=static_cache)

    def __call__(self, indices: list[int], n: int) -> list[list[tuple[float, float, str]]]:
        """``n`` rationales for each prompt in ``indices``: per prompt, (p_yes, p_normalized, rationale) triples."""
        cache, rows = self.rows(indices, n)
        results, generated = self._rationales(cache, rows)
        self.last_generated = [generated[i * n:(i + 1) * n] for i in range(len(indices))]  # token ids, for tests
        return [results[i * n:(i + 1) * n] for i in range(len(indices))]

    def _rationales(self, cache, rows: torch.Tensor) -> tuple[list[tuple[float, float, str]], list[list[int]]]:
        verdict, total = self.verdict, rows.shape[0]
        generated: list[list[int]] = [[] for _ in range(total)]
        forced: list[list[int]] = [[] for _ in range(total)]  # question tokens still to append
        asked = [False] * total  # the token being fed ends the question: its output is the verdict
        results: list[tuple[float, float, str] | None] = [None] * total

        def choose(alive: list[int], sampled: list[int], logits: torch.Tensor) -> list[int | None]:
            p_yes, p_normalized = yes_probabilities(logits, verdict.yes_id, verdict.no_id)
            chosen: list[int | None] = []
            for b, sample in enumerate(alive):
                if asked[sample]:
                    text = self.tokenizer.decode(generated[sample], skip_special_tokens=True)
                    text = text.strip().removesuffix(verdict.suffix.strip()).strip()  # the rationale, without the question
                    results[sample] = (float(p_yes[b]), float(p_normalized[b]), text)
                    chosen.append(None)
                    continue
                token = sampled[b]
                if not forced[sample]:
                    if token in self.stop_ids or len(generated[sample]) >= self.max_new_tokens:
                        forced[sample] = list(verdict.question_ids)  # end-of-turn or budget: ask the question
                    else:
                        generated[sample].append(token)
                        tail = self.tokenizer.decode(generated[sample][-len(verdict.question_ids) - 4:])
                        asked[sample] = tail.endswith(verdict.suffix)
                if forced[sample]:
                    token = forced[sample].pop(0)
                    asked[sample] = not forced[sample]
                chosen.append(token)
            return chosen

        if self.static_cache:  # a row feeds at most the budget, then the question, then reads the verdict
            self.decode_static(cache, rows, choose, self.max_new_tokens + len(verdict.question_ids) + 1)
        else:
            self.decode(cache, rows, choose)
        return results, generated


def score_prompts(model, tokenizer, prompts: list[list[int]], k_min: int = VERIFIER_K_MIN, k_max: int = VERIFIER_K_MAX,
                  tau: float = VERIFIER_TAU, temperature: float = VERIFIER_TEMPERATURE, max_new_tokens: int = 256, prompts_per_batch: int = 8, seed: int = 0,
                  share_prefix: bool = True, progress=False, static_cache: bool = False) -> list[VerifierScore]:
    """Verifier scores (r_MajV@K, adaptive K) of verification prompts (token ids), ``prompts_per_batch`` at a time:
    one ``RationaleSampler`` (one prefill) per batch, whose groups decode up to prompts_per_batch * K_min rows.
    ``progress``: show the rationale tokens as they are decoded (True), or count them into the caller's
    ``models.token_bar``. ``static_cache``: decode as CUDA graphs on a GPU (``RationaleSampler``).

    See ``compute_verifier_scores`` for K_min, K_max and tau, ``RationaleSampler`` for the rest.
    """
    import contextlib

    from models import token_bar

    scores: list[VerifierScore] = []
    own = isinstance(progress, bool)
    with token_bar("verifying (rationale tokens)", progress) if own else contextlib.nullcontext(progress) as bar:
        for start in range(0, len(prompts), prompts_per_batch):
            chunk = prompts[start:start + prompts_per_batch]
            sampler = RationaleSampler(model, tokenizer, chunk, max_new_tokens, temperature, share_prefix, seed=seed + start,
                                       progress=bar, static_cache=static_cache)
            scores += compute_verifier_scores(sampler, len(chunk), k_min, k_max, tau)
            if own:
                bar.set_postfix_str(f"{len(scores)}/{len(prompts)} solutions")
    return scores


def score_solutions(model, tokenizer, questions: list[str], solutions: list[str], **kwargs) -> list[VerifierScore]:
    """Verifier scores of each (question, solution): ``score_prompts`` of their verification prompts."""
    prompts = [verification_prompt_ids(tokenizer, q, s) for q, s in zip(questions, solutions, strict=True)]
    return score_prompts(model, tokenizer, prompts, **kwargs)
