"""Win rate of a model's answers against a baseline's, judged by a reward model.

Both answer files are inference.py outputs over the same prompts (joined by ``id``). For each prompt the judge
scores (prompt, answer) for both; the model wins if its reward is higher, ties count half. Reported: the win
rate with a 95% confidence interval (normal approximation over the per-prompt outcomes 0, 0.5, 1), wins, ties,
losses; every per-prompt score is saved.

Judges:
- ``--judge local --judge-model <folder>``: a Bradley-Terry reward model trained with ``train.py --training-type
  bt`` (offline; the default).
- ``--judge api``: an OpenAI-compatible reward endpoint, by default ``nvidia/llama-3.1-nemotron-70b-reward``,
  which answers a user + assistant conversation with ``reward:<float>`` as the message content. Base URL from
  ``JUDGE_BASE_URL`` (default https://integrate.api.nvidia.com/v1), API key from ``JUDGE_API_KEY``, else
  ``NVIDIA_API_KEY``, else ``OPENAI_API_KEY``. Calls run ``--concurrency`` at a time and are retried with
  exponential backoff on 429, 5xx and dropped connections (``Retry-After`` honoured, in seconds or as an HTTP
  date); every reward is cached in the output folder, so a rerun never pays twice; if more than
  ``--max-failure-rate`` of the calls still fail (or answer something unparseable), the run stops with the count
  instead of reporting a biased win rate. Below that rate the prompts whose calls failed are left out, and the
  summary says how many.

    python win_rate.py --candidates runs/inference/sft.jsonl --baseline runs/inference/base.jsonl \\
        --judge local --judge-model runs/bt-smollm2-math/final_model --output-dir runs/win-rate-sft
"""

from __future__ import annotations

import argparse
import datetime
import email.utils
import hashlib
import http.client
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from config import redact
from errors import ArgumentParser, fail
from secrets_guard import excerpt, redact_output, refuse_secret_args, write_json, write_jsonl

DEFAULT_API_JUDGE = "nvidia/llama-3.1-nemotron-70b-reward"
DEFAULT_BASE_URL = "https://integrate.api.nvidia.com/v1"
API_KEY_VARS = ("JUDGE_API_KEY", "NVIDIA_API_KEY", "OPENAI_API_KEY")
_REWARD = re.compile(r"reward\s*:\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")


class JudgeError(RuntimeError):
    """Too many judge calls failed; the message gives the count."""


# ---- judges ----------------------------------------------------------------------------------------------

def parse_reward(content: str) -> float:
    """The float of a ``reward:<float>`` reply; ValueError if there is none."""
    match = _REWARD.search(content or "")
    if match is None:
        raise ValueError(f"no 'reward:<float>' in the judge's reply {excerpt(content, 80)!r}")
    return float(match.group(1))


def retry_after(value: str | None, default: float) -> float:
    """Seconds to wait from a ``Retry-After`` header: a number of seconds or an HTTP date (RFC 9110 10.2.3);
    ``default`` when it is absent or unreadable."""
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    if when.tzinfo is None:  # HTTP dates are GMT; a date without a zone is read the same way
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


class ApiJudge:
    """An OpenAI-compatible chat-completions endpoint returning ``reward:<float>``."""

    def __init__(self, model: str, base_url: str, api_key: str | None, retries: int = 5, backoff: float = 1.0,
                 timeout: float = 60.0):
        self.model, self.url = model, base_url.rstrip("/") + "/chat/completions"
        self.api_key, self.retries, self.backoff, self.timeout = api_key, retries, backoff, timeout

    def reward(self, prompt: list[dict], response: str) -> float:
        body = json.dumps({"model": self.model, "messages": [*prompt, {"role": "assistant", "content": response}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            wait = self.backoff * 2 ** attempt
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    payload = json.loads(reply.read())
                return parse_reward(payload["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as exc:  # before URLError, its base class
                if (exc.code != 429 and exc.code < 500) or attempt == self.retries:
                    raise RuntimeError(f"judge HTTP {exc.code}") from None
                wait = retry_after(exc.headers.get("Retry-After"), wait)
            # A connection the server or a proxy drops mid-request is transient like a 503: urlopen wraps errors
            # while sending in URLError, but one while reading the reply (RemoteDisconnected, a ConnectionResetError,
            # or IncompleteRead) comes through unwrapped.
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException, TimeoutError) as exc:
                if attempt == self.retries:
                    raise RuntimeError(f"judge unreachable ({type(exc).__name__}: {exc})") from None
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
                raise ValueError(f"unparseable judge reply ({type(exc).__name__})") from None
            time.sleep(wait)
        raise AssertionError("unreachable")


class LocalJudge:
    """A Bradley-Terry reward model trained with this project (``models.score_responses``)."""

    def __init__(self, model_name: str, batch_size: int = 8):
        import torch

        from models import load_reward_model, load_tokenizer

        self.model = load_reward_model(model_name).to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self.tokenizer, self.batch_size = load_tokenizer(model_name), batch_size

    def rewards(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        from models import score_responses

        return score_responses(self.model, self.tokenizer, prompts, responses, self.batch_size)


# ---- scoring with a cache ------------------------------------------------------------------------------------

class RewardCache:
    """Rewards already paid for, keyed by judge, prompt and response; appended to a jsonl file as they come."""

    def __init__(self, path: Path, judge: str):
        from resumable import read_rows

        self.path, self.judge, self.lock = path, judge, threading.Lock()
        self.values: dict[str, float] = {row["key"]: row["reward"] for row in read_rows(path, keys=("key", "reward"))}

    def key(self, prompt: list[dict], response: str) -> str:
        return hashlib.sha256(json.dumps([self.judge, prompt, response]).encode()).hexdigest()

    def put(self, key: str, reward: float) -> None:
        from resumable import append_rows

        with self.lock:
            self.values[key] = reward
            append_rows(self.path, [{"key": key, "reward": reward}])


def score_all(pairs: list[tuple[list[dict], str]], cache: RewardCache, judge, concurrency: int,
              max_failure_rate: float, progress: bool = True) -> list[float]:
    """The reward of every (prompt, response), from the cache or the judge; raises JudgeError if too many fail."""
    from tqdm import tqdm

    keys = [cache.key(p, r) for p, r in pairs]
    todo = sorted({k: i for i, k in enumerate(keys) if k not in cache.values}.values())
    failures: list[str] = []
    if todo and isinstance(judge, LocalJudge):
        rewards = judge.rewards([pairs[i][0] for i in todo], [pairs[i][1] for i in todo])
        for i, reward in zip(todo, rewards):
            cache.put(keys[i], reward)
    elif todo:
        def call(i: int) -> None:
            try:
                cache.put(keys[i], judge.reward(*pairs[i]))
            except (RuntimeError, ValueError) as exc:
                failures.append(str(exc))

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(tqdm(pool.map(call, todo), total=len(todo), desc="judging", unit="call", disable=not progress))
    if failures and len(failures) > max_failure_rate * len(todo):
        reasons = sorted(set(failures))[:3]
        raise JudgeError(f"{len(failures)} of {len(todo)} judge calls failed (more than --max-failure-rate "
                         f"{max_failure_rate:.0%}; e.g. {'; '.join(reasons)}): no win rate reported. The {len(todo) - len(failures)} "
                         "rewards obtained are cached; rerun to retry only the failed ones")
    return [cache.values.get(k, float("nan")) for k in keys]


def win_rate(candidate: list[float], baseline: list[float]) -> dict:
    """Win rate (ties half) with a 95% normal-approximation interval over the per-prompt outcomes. A prompt with a
    NaN reward (its judge call failed, within --max-failure-rate) is left out and counted in
    ``dropped_failed_judge``."""
    outcomes = [1.0 if c > b else 0.5 if c == b else 0.0 for c, b in zip(candidate, baseline, strict=True)
                if c == c and b == b]  # NaN (a failed call within the allowed rate) drops the prompt
    n = len(outcomes)
    mean = sum(outcomes) / n if n else 0.0
    var = sum((o - mean) ** 2 for o in outcomes) / (n - 1) if n > 1 else 0.0
    half = 1.96 * (var / n) ** 0.5 if n else 0.0
    return {"win_rate": mean, "ci95": [max(0.0, mean - half), min(1.0, mean + half)], "prompts": n,
            "wins": outcomes.count(1.0), "ties": outcomes.count(0.5), "losses": outcomes.count(0.0),
            "dropped_failed_judge": len(candidate) - n}


def validation_win_rate(prompts: list[list[dict]], answers: list[str], baseline_path: str, judge_spec: str,
                        cache_dir: Path, judges: dict) -> dict:
    """Win rate of validation answers against --win-rate-baseline's (matched by prompt conversation), for
    ``train.py --calculate-win-rate``. ``judge_spec`` is a reward model folder, or 'api' / 'api:<model>';
    ``judges`` keeps the loaded judge between validations."""
    baseline = {json.dumps(row["prompt"]): row["completion"] for row in read_answers(baseline_path).values()}
    matched = [(p, a, baseline[json.dumps(p)]) for p, a in zip(prompts, answers) if json.dumps(p) in baseline]
    if not matched:
        raise ValueError(f"--win-rate-baseline {baseline_path}: none of the {len(prompts)} validation prompts is in it "
                         "(generate it with inference.py on the same dataset)")
    if judge_spec not in judges:
        kind, _, model = judge_spec.partition(":") if judge_spec.startswith("api") else ("local", "", judge_spec)
        judges[judge_spec] = make_judge(kind, model or None)
    judge, name = judges[judge_spec]
    cache_dir.mkdir(parents=True, exist_ok=True)
    rewards = score_all([(p, a) for p, a, _ in matched] + [(p, b) for p, _, b in matched],
                        RewardCache(cache_dir / "reward_cache.jsonl", name), judge, 8, 0.05, progress=False)
    return win_rate(rewards[: len(matched)], rewards[len(matched):])


# ---- the script --------------------------------------------------------------------------------------------

def read_answers(path: str) -> dict[str, dict]:
    """{prompt, completion} by id of the rows inference.py wrote to ``path``."""
    from custom_dataset import DataError
    from resumable import read_rows

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file (write it with inference.py)")
    rows = read_rows(Path(path), keys=("id", "prompt", "completion"))
    if not rows:
        raise DataError(f"{path}: holds no rows (write it with inference.py)")
    return {str(row["id"]): {"prompt": row["prompt"], "completion": row["completion"]}
            for row in rows}


def make_judge(kind: str, model: str | None) -> tuple[object, str]:
    """(judge, its cache name)."""
    if kind == "local":
        if not model:
            raise ValueError("--judge local needs --judge-model, a reward model folder (train.py --training-type bt)")
        return LocalJudge(model), f"local:{model}"
    model = model or DEFAULT_API_JUDGE
    key = next((os.environ[v] for v in API_KEY_VARS if os.environ.get(v)), None)
    return ApiJudge(model, os.environ.get("JUDGE_BASE_URL", DEFAULT_BASE_URL), key), f"api:{model}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="win_rate.py", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", required=True, help="inference.py output of the model evaluated.")
    parser.add_argument("--baseline", required=True, help="inference.py output of the baseline, same prompt ids.")
    parser.add_argument("--judge", choices=("local", "api"), default="local", help="Where rewards come from.")
    parser.add_argument("--judge-model", help=f"local: a reward model folder; api: the model name (default {DEFAULT_API_JUDGE}).")
    parser.add_argument("--concurrency", type=int, default=8, help="API calls in flight.")
    parser.add_argument("--max-failure-rate", type=float, default=0.05, help="Stop if more judge calls than this fail.")
    parser.add_argument("--output-dir", required=True, help="per_prompt.jsonl, summary.json and the reward cache.")
    args = parser.parse_args(argv)
    refuse_secret_args(parser, args)  # an API key belongs in JUDGE_API_KEY, not in --judge-model
    if args.judge == "local" and args.judge_model:
        from models import model_folder_problem

        if problem := model_folder_problem(args.judge_model, "--judge-model"):
            parser.error(problem)
    return args


def main(argv: list[str] | None = None) -> dict:
    redact_output()  # everything printed or logged from here on passes through secrets_guard.redact
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        candidates, baseline = read_answers(args.candidates), read_answers(args.baseline)
        ids = [i for i in candidates if i in baseline]
        if not ids:
            raise ValueError(f"--candidates and --baseline share no prompt id ({len(candidates)} and {len(baseline)} rows)")
        judge, name = make_judge(args.judge, args.judge_model)
        cache = RewardCache(out / "reward_cache.jsonl", name)
        pairs = [(candidates[i]["prompt"], candidates[i]["completion"]) for i in ids]
        pairs += [(candidates[i]["prompt"], baseline[i]["completion"]) for i in ids]
        rewards = score_all(pairs, cache, judge, args.concurrency, args.max_failure_rate)
    except (ValueError, OSError, JudgeError) as exc:  # bad input (DataError is a ValueError): one line, status 2
        fail("win_rate.py", redact(str(exc)))
    ours, theirs = rewards[: len(ids)], rewards[len(ids):]
    summary = {**win_rate(ours, theirs), "judge": name, "unmatched_ids": len(candidates) - len(ids)}
    per_prompt = [{"id": i, "prompt": candidates[i]["prompt"], "candidate": candidates[i]["completion"],
                   "baseline": baseline[i]["completion"], "candidate_reward": c, "baseline_reward": b}
                  for i, c, b in zip(ids, ours, theirs)]
    write_jsonl(out / "per_prompt.jsonl", per_prompt)
    write_json(out / "summary.json", summary)
    low, high = summary["ci95"]
    dropped = summary["dropped_failed_judge"]
    print(f"win rate {100 * summary['win_rate']:.1f}% (95% CI {100 * low:.1f}-{100 * high:.1f}%) over {summary['prompts']} "
          f"prompts: {summary['wins']} wins, {summary['ties']} ties, {summary['losses']} losses; judge {name}"
          + (f"; {dropped} prompt{'s' * (dropped != 1)} dropped because a judge call failed" if dropped else ""))
    if summary["unmatched_ids"]:
        print(f"{summary['unmatched_ids']} of the {len(candidates)} --candidates ids are not in --baseline "
              f"({len(baseline) - len(ids)} of its {len(baseline)} not in --candidates): those prompts were left out")
    return summary


if __name__ == "__main__":
    main()
