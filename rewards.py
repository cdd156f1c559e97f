"""Reward sources of online RL (``--reward``), and how several combine (``--reward-weights``).

A source is called once per batch of rollouts with a ``RolloutBatch`` (prompts, completions, references and the
dataset's columns, one entry per completion) and returns one value per completion: a float, or None where it has
no reward to give (``math`` on a row without a checkable reference; ``genrm`` gated to where ``math`` cannot decide;
a user's function that abstains). The combined reward of a completion is

    r = sum over sources s that gave a value of  w_s * r_s

(a completion no source rewards gets 0, and is counted in ``rl/unrewarded``). Sources, as ``--reward`` spells them:

- ``math``: 1 if math-verify finds the completion's final answer equal to the reference's (GSM8K ``####``, MATH
  ``\\boxed{}``, synthetic-math), else 0; None where the reference states no final answer.
- ``format``: 1 if the completion ends with a final answer math-verify can read (``#### N`` or ``\\boxed{}``), else 0.
- ``bt:PATH``: a Bradley-Terry reward model of ours (``--training-type bt``) or any sequence-classification reward
  model: its scalar reward of (prompt, completion).
- ``genrm:PATH``: the GenRM-CoT verifier's r_MajV@K (mean p("Yes") over an adaptive number of sampled rationales,
  ``--verifier-k-min/-k-max/-tau``); with ``--genrm-gate`` only where ``math`` cannot decide (no reference, or
  math-verify says wrong), so false negatives of the checker can still earn credit. Lives in ``extension/genrm.py``.
- ``api[:MODEL]``: the OpenAI-compatible reward endpoint of ``win_rate.py`` (its retries, cache and concurrency; the
  key from the environment only).
- ``python:MODULE:FUNCTION``: a user's function ``f(prompts, completions, **columns) -> list[float | None]``, each
  column a list with one value per completion (``reference`` among them).
"""

from __future__ import annotations

import importlib
import json
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Sources defined outside the core, loaded on first use (the core never imports extension/).
EXTERNAL_SOURCES = {"genrm": "extension.genrm:GenRMReward"}
SOURCE_KINDS = ("math", "format", "bt", "genrm", "api", "python")


class RewardError(ValueError):
    """A --reward / --reward-weights setting that cannot work, or a source that returned something unusable."""


@dataclass
class RolloutBatch:
    """What a reward source sees: one entry per completion (prompt-major: the K completions of a prompt are adjacent).

    Attributes:
        prompts: the conversation up to the answer (user turns and earlier assistant turns).
        completions: the sampled answers, decoded without special tokens.
        references: the row's reference answer ("" where the row has none).
        columns: every other column of the dataset row, one value per completion.
    """

    prompts: list[list[dict]]
    completions: list[str]
    references: list[str]
    columns: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def questions(self) -> list[str]:
        """The last user turn of each prompt."""
        return [next(m["content"] for m in reversed(p) if m["role"] == "user") for p in self.prompts]


Source = Callable[[RolloutBatch], list[float | None]]


def math_reward(batch: RolloutBatch) -> list[float | None]:
    """1.0 / 0.0 by math-verify against the reference's final answer; None where the reference states none."""
    from metrics import answers_match, has_final_answer

    return [(1.0 if answers_match(c, r) else 0.0) if has_final_answer(r) else None
            for c, r in zip(batch.completions, batch.references, strict=True)]


def format_reward(batch: RolloutBatch) -> list[float | None]:
    """1.0 where the completion states a final answer math-verify can read ('#### N' or ``\\boxed{}``), else 0.0."""
    from metrics import answer_text, parse

    return [1.0 if ("####" in c or "\\boxed" in c) and parse(answer_text(c)) else 0.0 for c in batch.completions]


class ModelReward:
    """``bt:PATH``: the scalar reward of a sequence-classification reward model (``models.score_responses``), on
    ``device`` (the policy's: None keeps it on the CPU)."""

    def __init__(self, path: str, batch_size: int = 8, device: torch.device | str | None = None):
        from models import load_reward_model, load_tokenizer

        self.model = load_reward_model(path).eval().requires_grad_(False).to(device or "cpu")
        self.tokenizer, self.batch_size = load_tokenizer(path), batch_size

    def __call__(self, batch: RolloutBatch) -> list[float | None]:
        from models import score_responses

        return score_responses(self.model, self.tokenizer, batch.prompts, batch.completions, self.batch_size)


class ApiReward:
    """``api[:MODEL]``: the OpenAI-compatible reward endpoint of ``win_rate.py`` (``win_rate.make_judge``), its
    retries and concurrency, every reward cached in ``cache`` (a rerun or a resumed run never pays twice)."""

    def __init__(self, model: str | None, cache: Path, concurrency: int = 8, max_failure_rate: float = 0.05):
        from win_rate import RewardCache, make_judge

        self.judge, name = make_judge("api", model)
        cache.parent.mkdir(parents=True, exist_ok=True)
        self.cache, self.concurrency, self.max_failure_rate = RewardCache(cache, name), concurrency, max_failure_rate

    def __call__(self, batch: RolloutBatch) -> list[float | None]:
        from win_rate import score_all

        rewards = score_all(list(zip(batch.prompts, batch.completions)), self.cache, self.judge, self.concurrency,
                            self.max_failure_rate, progress=False)
        return [None if r != r else r for r in rewards]  # NaN: a failed call (within the rate) gives no reward


def python_reward(spec: str) -> Source:
    """``python:MODULE:FUNCTION`` -> a source calling ``FUNCTION(prompts, completions, reference=[...], **columns)``."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise RewardError(f"--reward python:{spec}: give python:MODULE:FUNCTION (e.g. python:my_rewards:length)")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise RewardError(f"--reward python:{spec}: cannot load {name} from {module} ({exc})") from exc

    def source(batch: RolloutBatch) -> list[float | None]:
        return function(batch.prompts, batch.completions, reference=batch.references, **batch.columns)

    source.__name__ = name
    return source


def rollout_seed(batch: RolloutBatch) -> int:
    """A seed that depends only on the batch's answers, for reward sources that sample (the verifier): the same
    rollout gets the same rewards in a resumed run."""
    return zlib.crc32(json.dumps([batch.questions, batch.completions]).encode())


def source_name(spec: str) -> str:
    """The name a source's metrics are logged under: its kind ('math', 'genrm', ...), or 'python.FUNCTION'."""
    kind, _, rest = spec.partition(":")
    return f"python.{rest.rpartition(':')[2]}" if kind == "python" else kind


def spec_problems(specs: Sequence[str], weights: str | None) -> list[str]:
    """What is wrong with --reward and --reward-weights, without loading anything (config validation)."""
    problems = []
    if not specs:
        problems.append("online RL needs at least one --reward (math, format, bt:PATH, genrm:PATH, api[:MODEL], "
                        "python:MODULE:FUNCTION)")
    for spec in specs:
        kind, _, rest = spec.partition(":")
        if kind not in SOURCE_KINDS:
            problems.append(f"--reward {spec}: unknown source {kind!r}; choose one of {', '.join(SOURCE_KINDS)}")
        elif kind in ("bt", "genrm") and not rest:
            problems.append(f"--reward {spec}: give the model folder, as {kind}:PATH")
        elif kind in ("math", "format") and rest:
            problems.append(f"--reward {spec}: {kind} takes no argument")
    names = [source_name(s) for s in specs]
    if len(set(names)) < len(names):
        problems.append(f"--reward names a source twice ({', '.join(specs)}): give each once, with its weight in "
                        "--reward-weights")
    if weights is not None:
        try:
            values = parse_weights(weights, len(specs))
        except RewardError as exc:
            problems.append(str(exc))
        else:
            if not any(values):
                problems.append(f"--reward-weights {weights}: all weights are 0, so every reward would be 0")
    return problems


def parse_weights(weights: str | None, n: int) -> list[float]:
    """'1,0.5' -> [1.0, 0.5]: one weight per --reward, in order (None: all 1)."""
    if weights is None:
        return [1.0] * n
    try:
        values = [float(w) for w in weights.split(",")]
    except ValueError:
        raise RewardError(f"--reward-weights {weights}: give comma-separated numbers, e.g. 1,0.5") from None
    if len(values) != n:
        raise RewardError(f"--reward-weights {weights}: {len(values)} weights for {n} --reward sources; give one each")
    return values


class Rewards:
    """The sources of a run with their weights: ``rewards(batch)`` -> (combined rewards, per-source values).

    Args:
        sources: name -> source (``build`` makes them from --reward specs; tests pass functions).
        weights: one per source, in the same order.
        gates: source name -> the source whose decided values switch it off: with ``{"genrm": "math"}`` the verifier
            is asked only about completions where ``math`` gave None or 0, and gives None elsewhere.
    """

    def __init__(self, sources: dict[str, Source], weights: Sequence[float], gates: dict[str, str] | None = None):
        if len(weights) != len(sources):
            raise RewardError(f"{len(weights)} weights for {len(sources)} reward sources")
        self.sources, self.gates = dict(sources), dict(gates or {})
        self.weights = dict(zip(sources, weights))
        for name, gate in self.gates.items():
            if gate not in self.sources:
                raise RewardError(f"reward source {name} is gated by {gate}, which is not among the sources")

    def __call__(self, batch: RolloutBatch) -> tuple[list[float], dict[str, list[float | None]]]:
        n = len(batch.completions)
        values: dict[str, list[float | None]] = {}
        for name in sorted(self.sources, key=lambda s: s in self.gates):  # a gating source before the ones it gates
            todo = list(range(n))
            if name in self.gates:  # only where the gating source could not decide, or said wrong
                todo = [i for i in todo if not values[self.gates[name]][i]]
            got: list[float | None] = [None] * n
            if todo:
                answer = list(self.sources[name](batch if len(todo) == n else subset(batch, todo)))
                if len(answer) != len(todo):
                    raise RewardError(f"reward source {name} returned {len(answer)} values for {len(todo)} completions")
                for i, value in zip(todo, answer):
                    if value is not None and (not isinstance(value, (int, float)) or value != value):
                        raise RewardError(f"reward source {name} returned {value!r} for completion {i}: give a float "
                                          "or None")
                    got[i] = None if value is None else float(value)
            values[name] = got
        combined = []
        for i in range(n):
            terms = [self.weights[name] * v[i] for name, v in values.items() if v[i] is not None]
            combined.append(sum(terms) if terms else 0.0)
        return combined, {name: values[name] for name in self.sources}


def subset(batch: RolloutBatch, index: list[int]) -> RolloutBatch:
    """The completions ``index`` of ``batch``."""
    return RolloutBatch([batch.prompts[i] for i in index], [batch.completions[i] for i in index],
                        [batch.references[i] for i in index], {k: [v[i] for i in index] for k, v in batch.columns.items()})


def build(specs: Sequence[str], weights: str | None, cfg, run_dir: Path, device: torch.device | str | None = None
          ) -> Rewards:
    """The ``Rewards`` of --reward / --reward-weights, loading the reward models and verifiers they name onto
    ``device`` (the policy's, so that a GPU run scores on its GPU; None: the CPU)."""
    if problems := spec_problems(specs, weights):
        raise RewardError("; ".join(problems))
    sources: dict[str, Source] = {}
    gates: dict[str, str] = {}
    for spec in specs:
        kind, _, rest = spec.partition(":")
        name = source_name(spec)
        if kind == "math":
            sources[name] = math_reward
        elif kind == "format":
            sources[name] = format_reward
        elif kind == "bt":
            sources[name] = ModelReward(rest, device=device)
        elif kind == "api":
            sources[name] = ApiReward(rest or None, run_dir / "reward_cache.jsonl")
        elif kind == "python":
            sources[name] = python_reward(rest)
        else:
            module, _, attr = EXTERNAL_SOURCES[kind].partition(":")
            sources[name] = getattr(importlib.import_module(module), attr)(rest, cfg, device)
    if getattr(cfg, "genrm_gate", False):
        if "genrm" not in sources or "math" not in sources:
            raise RewardError("--genrm-gate asks the verifier only where the math reward cannot decide: give both "
                              "--reward math and --reward genrm:PATH")
        gates["genrm"] = "math"
    return Rewards(sources, parse_weights(weights, len(specs)), gates)
