"""Batch inference, win rate, math accuracy and the Hub export: resumable, offline, with numbers worked by hand."""

from __future__ import annotations

import email.utils
import json
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import write_jsonl

import evaluate_math
import inference
import train
import upload_to_hub
import win_rate
from config import resolve
from secrets_guard import SECRET_ENV_VARS, redact

# ---- math accuracy -------------------------------------------------------------------------------------------


def test_math_accuracy_with_equivalent_forms_and_a_wilson_interval(tmp_path):
    """4 problems, 3 right: '0.5' = \\frac{1}{2} (MATH), '1,000' = 1000 (GSM8K), 7 = \\boxed{7}; 8 != 9.
    Wilson 95% for 3/4: centre (0.75 + 1.96^2/8) / (1 + 1.96^2/4) = 0.6275, half-width
    1.96 * sqrt(0.75 * 0.25 / 4 + 1.96^2 / 64) / 1.9604 = 0.3269 -> [0.3006, 0.9544]."""
    rows = [
        {"id": "a", "completion": "Half of it: 0.5", "reference": "So the answer is $\\boxed{\\frac{1}{2}}$."},
        {"id": "b", "completion": "Total is 1,000.\n#### 1,000", "reference": "10 * 100 = 1000\n#### 1000"},
        {"id": "c", "completion": "The answer is $\\boxed{7}$", "reference": "3 + 4 = 7\n#### 7"},
        {"id": "d", "completion": "#### 8", "reference": "#### 9"},
    ]
    summary = evaluate_math.main(["--predictions", str(write_jsonl(tmp_path / "p.jsonl", rows)), "--output-dir", str(tmp_path / "out")])
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in results] == [True, True, True, False]
    assert summary["accuracy"] == 0.75
    assert summary["ci95"] == pytest.approx([0.3006, 0.9544], abs=1e-4)


def test_pass_at_k_is_the_share_of_k_subsets_holding_a_right_answer():
    """Against counting every k-subset of n answers (c of them right) that holds a right one."""
    from itertools import combinations

    from metrics import pass_at_k

    for n, c, k in [(4, 1, 2), (5, 2, 3), (6, 2, 3), (8, 0, 4), (8, 7, 2), (3, 3, 1), (7, 3, 1)]:
        subsets = list(combinations([True] * c + [False] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3, 2) / C(4, 2) = 1 - 3/6
    with pytest.raises(ValueError, match="0 < k <= n"):
        pass_at_k(4, 1, 5)


def test_math_accuracy_of_several_samples_adds_pass_at_k(tmp_path, capsys):
    """Problem a: 1 of 4 samples right (pass@1 1/4, pass@2 1 - C(3,2)/C(4,2) = 1/2, pass@4 1); problem b: 3 of 4
    (3/4, 1 - 0/6 = 1, 1); c: none. Means: pass@1 (0.25 + 0.75 + 0) / 3 = 1/3, pass@2 1/2, pass@4 2/3."""
    rows = [{"id": "a", "completions": ["#### 3", "#### 4", "#### 5", "#### 6"], "reference": "#### 4"},
            {"id": "b", "completions": ["#### 2", "#### 2", "#### 2.0", "#### 1"], "reference": "#### 2"},
            {"id": "c", "completions": ["#### 0", "#### 1", "#### 1", "#### 1"], "reference": "#### 9"}]
    rows = [{**r, "completion": r["completions"][0]} for r in rows]
    summary = evaluate_math.main(["--predictions", str(write_jsonl(tmp_path / "p.jsonl", rows)), "--output-dir", str(tmp_path / "out")])
    assert summary["accuracy"] == pytest.approx(1 / 3)  # the first sample of each: wrong, right, wrong
    assert summary["samples_per_problem"] == 4
    assert summary["pass_at_k"] == pytest.approx({"1": 1 / 3, "2": 1 / 2, "4": 2 / 3})
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["samples_correct"] for r in results] == [1, 3, 0]
    assert "pass@1 33.3%, pass@2 50.0%, pass@4 66.7%" in capsys.readouterr().out


def test_math_accuracy_names_a_row_without_a_final_answer(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "x", "completion": "5", "reference": "no final answer here"}])
    with pytest.raises(SystemExit):
        evaluate_math.main(["--predictions", str(path), "--output-dir", str(tmp_path / "out")])
    assert "row 0 (id x)" in capsys.readouterr().err


# ---- batch inference -------------------------------------------------------------------------------------------

def _prompts(tmp_path, n=5):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": f"What is {i} + {i}?"} for i in range(n)])


def test_inference_resumes_without_duplicating_or_losing_rows(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "out.jsonl"
    args = ["--model-name", str(tiny_model_dir), "--prompts", str(_prompts(tmp_path)), "--output", str(out),
            "--batch-size", "2", "--max-new-tokens", "4", "--n", "2", "--temperature", "0.9", "--backend", "transformers"]
    real = inference.TransformersBackend.generate
    calls = {"n": 0}

    def crash_on_second_batch(self, batch, args_, seed, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash mid-run")
        return real(self, batch, args_, seed, **kwargs)

    monkeypatch.setattr(inference.TransformersBackend, "generate", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        inference.main(args)
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in first] == ["p0", "p1"]  # the first batch was on disk before the crash
    with out.open("a") as handle:
        handle.write('{"id": "p2", "prom')  # and a line cut mid-write is dropped, not kept
    monkeypatch.setattr(inference.TransformersBackend, "generate", real)
    assert inference.main(args)["written"] == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["p0", "p1", "p2", "p3", "p4"]
    assert rows[:2] == first  # untouched
    assert all(len(r["completions"]) == 2 and r["completion"] == r["completions"][0] for r in rows)
    assert rows[0]["settings"] == {"n": 2, "temperature": 0.9, "top_p": 1.0, "max_new_tokens": 4, "seed": 42,
                                   "chat_template": True}
    assert rows[0]["backend"] == "transformers" and rows[0]["prompt"] == [{"role": "user", "content": "What is 0 + 0?"}]
    assert inference.main(args)["written"] == 0  # nothing left to do


@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "raw-text"])
def test_inference_through_vllm_asks_for_the_flags_settings_and_writes_its_answers(tmp_path, monkeypatch, chat):
    """--backend vllm with a stand-in for the vllm package (vLLM needs a GPU): the engine is built on the resolved
    model folder, asked per batch for --n answers with --temperature, --top-p, --max-new-tokens and a seed that
    moves with the batch, through ``chat`` (the conversation) or ``generate`` (the raw last turn), and its answers
    are written stripped, with the backend named."""
    import importlib.machinery
    import sys
    from types import ModuleType, SimpleNamespace

    calls = []

    class SamplingParams:
        def __init__(self, **settings):
            self.__dict__.update(settings)

    class LLM:
        def __init__(self, model):
            calls.append(("engine", model))

        def _answers(self, how, inputs, params, use_tqdm):
            calls.append((how, inputs, params))
            assert use_tqdm is False
            return [SimpleNamespace(outputs=[SimpleNamespace(text=f" {how} {i}.{j} ", token_ids=[1, 2, 3])
                                             for j in range(params.n)]) for i, _ in enumerate(inputs)]

        def chat(self, conversations, params, use_tqdm):
            return self._answers("chat", conversations, params, use_tqdm)

        def generate(self, prompts, params, use_tqdm):
            return self._answers("generate", prompts, params, use_tqdm)

    fake = ModuleType("vllm")
    fake.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    fake.LLM, fake.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "out.jsonl"
    inference.main(["--model-name", str(model), "--prompts", str(_prompts(tmp_path, 3)), "--output", str(out),
                    "--backend", "vllm", "--n", "2", "--temperature", "0.5", "--top-p", "0.9", "--max-new-tokens", "7",
                    "--seed", "3", "--batch-size", "2", *([] if chat else ["--no-chat-template"])])
    how = "chat" if chat else "generate"
    assert calls[0] == ("engine", str(model))
    batches = calls[1:]
    assert [c[0] for c in batches] == [how, how]
    expected_inputs = [[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(3)]
    if not chat:
        expected_inputs = [m[-1]["content"] for m in expected_inputs]
    assert batches[0][1] + batches[1][1] == expected_inputs
    assert [vars(c[2]) for c in batches] == [{"n": 2, "temperature": 0.5, "top_p": 0.9, "max_tokens": 7, "seed": seed}
                                             for seed in (3, 5)]  # --seed plus the batch's first row
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["completions"] for r in rows] == [[f"{how} 0.0", f"{how} 0.1"], [f"{how} 1.0", f"{how} 1.1"], [f"{how} 0.0", f"{how} 0.1"]]
    assert {r["backend"] for r in rows} == {"vllm"}


def test_inference_reads_a_dataset_and_keeps_its_references(tmp_path, tiny_model_dir):
    out = tmp_path / "out.jsonl"
    inference.main(["--model-name", str(tiny_model_dir), "--dataset-name", "synthetic-math", "--synthetic-levels", "1",
                    "--limit", "3", "--output", str(out), "--max-new-tokens", "3"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all("####" in r["reference"] for r in rows)
    assert rows[0]["prompt"][-1]["role"] == "user"


def test_transformers_sampling_turns_off_the_default_top_k(tiny_model_dir, monkeypatch):
    """transformers samples from the 50 likeliest tokens unless told otherwise; vLLM from all of them. The
    fallback must ask for top_k=0 so both draw from the distribution --temperature and --top-p describe (on the CPU
    the shared-prefix sampler then draws them: ``sampler_settings`` reads the same keywords)."""
    import sampling

    backend = inference.TransformersBackend(str(tiny_model_dir))
    seen = []
    real = sampling.generate_from_prompts

    def recording(model, tokenizer, prompts, max_new_tokens, progress=None, **kwargs):
        seen.append({"max_new_tokens": max_new_tokens, **kwargs})
        return real(model, tokenizer, prompts, max_new_tokens, progress=progress, **kwargs)

    monkeypatch.setattr(sampling, "generate_from_prompts", recording)
    batch = [{"messages": [{"role": "user", "content": "What is 1 + 1?"}]}]
    sampled = inference.parse_args(["--model-name", "m", "--prompts", "p", "--output", "o", "--n", "3",
                                    "--temperature", "0.7", "--top-p", "0.9", "--max-new-tokens", "3"])
    assert [len(answers) for answers in backend.generate(batch, sampled, seed=0)] == [3]
    assert seen[-1] == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "num_return_sequences": 3,
                        "max_new_tokens": 3}
    assert sampling.sampler_settings(backend.model, {k: v for k, v in seen[-1].items() if k != "max_new_tokens"}) == (0.7, 0.9, 3)
    greedy = inference.parse_args(["--model-name", "m", "--prompts", "p", "--output", "o", "--max-new-tokens", "3"])
    backend.generate(batch, greedy, seed=0)
    assert seen[-1] == {"do_sample": False, "num_return_sequences": 1, "max_new_tokens": 3}


def _written_rows(path, ids, settings, model):
    return write_jsonl(path, [{"id": i, "prompt": [], "completions": ["x"], "completion": "x", "reference": None,
                               "model": model, "backend": "transformers", "settings": settings} for i in ids])


def test_inference_refuses_a_corrupt_line_before_the_last_and_keeps_every_row(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    settings = {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 4, "seed": 42, "chat_template": True}
    _written_rows(out, ["p0"], settings, "m")
    with out.open("a") as handle:
        handle.write('{"id": "p1", "prom\n')  # corrupt, yet followed by a valid row: not a crash's torn last line
    _written_rows(tmp_path / "tail.jsonl", ["p2"], settings, "m")
    out.write_text(out.read_text() + (tmp_path / "tail.jsonl").read_text())
    before = out.read_text()
    with pytest.raises(SystemExit):
        inference.main(["--model-name", "m", "--prompts", str(_prompts(tmp_path, 3)), "--output", str(out),
                        "--max-new-tokens", "4"])
    assert f"{out} line 2 is not valid JSON" in capsys.readouterr().err
    assert out.read_text() == before  # the row after the bad line is still there


@pytest.mark.parametrize(("flags", "named"), [
    (["--n", "2"], "--n 1 -> 2"),
    (["--temperature", "0.5"], "--temperature 0.9 -> 0.5"),
    (["--top-p", "0.8"], "--top-p 1.0 -> 0.8"),
    (["--max-new-tokens", "5"], "--max-new-tokens 4 -> 5"),
    (["--seed", "7"], "--seed 42 -> 7"),
    (["--no-chat-template"], "--chat-template True -> False"),
    (["--model-name", "other"], "--model-name 'm' -> 'other'"),
])
def test_inference_refuses_to_resume_with_other_generation_settings(tmp_path, capsys, flags, named):
    out = tmp_path / "out.jsonl"
    settings = {"n": 1, "temperature": 0.9, "top_p": 1.0, "max_new_tokens": 4, "seed": 42, "chat_template": True}
    _written_rows(out, ["p0", "p1"], settings, "m")
    args = ["--model-name", "m", "--prompts", str(_prompts(tmp_path, 2)), "--output", str(out), "--temperature", "0.9",
            "--max-new-tokens", "4"]
    assert inference.main(args)["written"] == 0  # the same settings resume (here: nothing left to do)
    with pytest.raises(SystemExit):
        inference.main([*args, *flags])
    err = capsys.readouterr().err
    assert f"--output {out} holds rows made with other settings ({named})" in err
    assert len(out.read_text().splitlines()) == 2


# ---- win rate ------------------------------------------------------------------------------------------------

def test_win_rate_by_hand():
    """Outcomes 1, 1, 0.5, 0: mean 0.625, sample variance (3 * 0.375^2 ... ) = 0.2292, half-width
    1.96 * sqrt(0.2292 / 4) = 0.4692."""
    result = win_rate.win_rate([3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 5.0])
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert result["win_rate"] == pytest.approx(0.625)
    assert result["ci95"] == pytest.approx([0.625 - 0.4692, 1.0], abs=1e-4)


def test_retry_after_reads_seconds_and_http_dates():
    assert win_rate.retry_after("3", 1.0) == 3.0
    assert win_rate.retry_after(None, 1.5) == 1.5 and win_rate.retry_after("soon", 2.0) == 2.0
    in_30_s = email.utils.formatdate(time.time() + 30, usegmt=True)  # e.g. 'Sun, 01 Nov 2026 12:00:30 GMT'
    assert win_rate.retry_after(in_30_s, 1.0) == pytest.approx(30, abs=2)
    assert win_rate.retry_after(email.utils.formatdate(time.time() - 60, usegmt=True), 1.0) == 0.0


class JudgeServer:
    """An OpenAI-compatible reward endpoint on 127.0.0.1: reward = length of the assistant's answer; an answer
    containing 'garble' gets an unparseable reply. The first call for each answer fails, as ``first_reply`` says:
    '429' (Retry-After in seconds), '503' (Retry-After as an HTTP date), or 'drop' (the connection is closed
    without a reply)."""

    def __init__(self, first_reply: str = "429"):
        self.calls, self.seen, self.headers = [], set(), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                answer = body["messages"][-1]["content"]
                server.calls.append(answer)
                server.headers.append(self.headers.get("Authorization"))
                if answer not in server.seen:
                    server.seen.add(answer)
                    if first_reply == "drop":
                        self.close_connection = True  # the client sees RemoteDisconnected
                        return
                    self.send_response(int(first_reply))
                    self.send_header("Retry-After", "0" if first_reply == "429" else email.utils.formatdate(usegmt=True))
                    self.end_headers()
                    return
                content = "I cannot score that" if "garble" in answer else f"reward:{len(answer)}.5"
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def judge_server(monkeypatch, request):
    server = JudgeServer(getattr(request, "param", "429"))
    monkeypatch.setenv("JUDGE_BASE_URL", server.url)
    monkeypatch.setenv("JUDGE_API_KEY", "sk-test-secret-123")
    yield server
    server.httpd.shutdown()


def _answers(tmp_path, name, completions):
    return write_jsonl(tmp_path / f"{name}.jsonl", [{"id": str(i), "prompt": [{"role": "user", "content": f"q{i}"}],
                                                     "completion": c} for i, c in enumerate(completions)])


@pytest.mark.parametrize("judge_server", ["429", "503", "drop"], indirect=True)
def test_win_rate_against_an_openai_compatible_server_with_retries_and_a_cache(tmp_path, judge_server, monkeypatch):
    monkeypatch.setattr(win_rate.ApiJudge.__init__, "__defaults__", (5, 0.01, 60.0))  # fast backoff in tests
    ours = _answers(tmp_path, "ours", ["a long answer", "mid", "xx"])
    base = _answers(tmp_path, "base", ["short", "mid", "a much longer one"])
    args = ["--candidates", str(ours), "--baseline", str(base), "--judge", "api", "--output-dir", str(tmp_path / "wr")]
    summary = win_rate.main(args)
    # Rewards are lengths + 0.5: 13.5 > 5.5 (win), 3.5 = 3.5 (tie), 2.5 < 17.5 (loss).
    assert (summary["wins"], summary["ties"], summary["losses"]) == (1, 1, 1) and summary["win_rate"] == 0.5
    assert len(judge_server.calls) == 2 * 5  # 5 distinct answers, each a failure (429, 503 or dropped) then a success
    assert summary["dropped_failed_judge"] == 0
    assert set(judge_server.headers) == {"Bearer sk-test-secret-123"}
    per_prompt = [json.loads(line) for line in (tmp_path / "wr" / "per_prompt.jsonl").read_text().splitlines()]
    assert [p["candidate_reward"] for p in per_prompt] == [13.5, 3.5, 2.5]
    win_rate.main(args)
    assert len(judge_server.calls) == 10  # the rerun read every reward from the cache


def test_win_rate_refuses_when_too_many_judge_calls_fail(tmp_path, judge_server, monkeypatch, capsys):
    monkeypatch.setattr(win_rate.ApiJudge.__init__, "__defaults__", (5, 0.01, 60.0))
    ours = _answers(tmp_path, "ours", ["garble one", "garble two", "fine"])
    base = _answers(tmp_path, "base", ["ok", "okay", "fine too"])
    with pytest.raises(SystemExit):
        win_rate.main(["--candidates", str(ours), "--baseline", str(base), "--judge", "api", "--output-dir", str(tmp_path / "wr")])
    err = capsys.readouterr().err
    assert "2 of 6 judge calls failed" in err and "no 'reward:<float>'" in err
    assert "sk-test-secret-123" not in err
    assert not (tmp_path / "wr" / "summary.json").exists()


def test_win_rate_reports_the_prompts_dropped_for_a_failed_judge_call(tmp_path, judge_server, monkeypatch, capsys):
    """1 of 6 calls fails (unparseable), within --max-failure-rate 0.2: that prompt is left out and counted.
    Of the other two: 1.5 < 2.5 (loss), 2.5 < 8.5 (loss)."""
    monkeypatch.setattr(win_rate.ApiJudge.__init__, "__defaults__", (5, 0.01, 60.0))
    ours = _answers(tmp_path, "ours", ["garble one", "b", "cc"])
    base = _answers(tmp_path, "base", ["ok", "ok", "fine too"])
    summary = win_rate.main(["--candidates", str(ours), "--baseline", str(base), "--judge", "api", "--max-failure-rate",
                             "0.2", "--output-dir", str(tmp_path / "wr")])
    assert (summary["prompts"], summary["dropped_failed_judge"], summary["losses"]) == (2, 1, 2)
    assert json.loads((tmp_path / "wr" / "summary.json").read_text())["dropped_failed_judge"] == 1
    printed = capsys.readouterr().out
    assert "over 2 prompts" in printed and "; 1 prompt dropped because a judge call failed" in printed


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    from models import load_reward_model, load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-reward")
    load_reward_model(str(tiny_model_dir)).save_pretrained(folder)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_win_rate_with_the_local_judge_and_during_validation(tmp_path, tiny_model_dir, reward_model_dir, tiny_run_args):
    from models import load_reward_model, load_tokenizer, score_responses

    ours = _answers(tmp_path, "ours", ["12", "7"])
    base = _answers(tmp_path, "base", ["13", "7"])
    summary = win_rate.main(["--candidates", str(ours), "--baseline", str(base), "--judge-model", str(reward_model_dir),
                             "--output-dir", str(tmp_path / "wr")])
    model, tokenizer = load_reward_model(str(reward_model_dir)), load_tokenizer(str(reward_model_dir))
    r = score_responses(model, tokenizer, ["q0", "q1", "q0"], ["12", "7", "13"])
    assert summary["ties"] == 1 and summary["wins"] == int(r[0] > r[2])  # same answer to q1: a tie

    # --calculate-win-rate: the validation answers against a baseline's, judged during validation.
    baseline = tmp_path / "baseline.jsonl"
    inference.main(["--model-name", str(tiny_model_dir), "--dataset-name", "synthetic-math", "--synthetic-levels", "1",
                    "--limit", "8", "--output", str(baseline), "--max-new-tokens", "4", "--seed", "0"])  # tiny_run_args' data
    # The tiny model answers "" everywhere; other baseline answers make the outcomes more than ties.
    rows = [json.loads(line) for line in baseline.read_text().splitlines()]
    write_jsonl(baseline, [{**r, "completion": ["", "7", "#### 12", "I do not know"][k % 4]} for k, r in enumerate(rows)])
    cfg, _ = resolve([*tiny_run_args, "--max-steps", "1", "--calculate-win-rate", "--win-rate-baseline", str(baseline),
                      "--win-rate-judge", str(reward_model_dir)])
    after = train.run(cfg)["after"]
    # The same validation answers (saved by the run), judged by the standalone script against the same baseline.
    prompts = {row["prompt"][-1]["content"]: (i, row["prompt"]) for i, row in win_rate.read_answers(str(baseline)).items()}
    generations = [json.loads(line) for line in (cfg.run_dir / "generations" / "step-1.jsonl").read_text().splitlines()]
    candidates = write_jsonl(tmp_path / "validation.jsonl", [
        {"id": prompts[g["prompt"]][0], "prompt": prompts[g["prompt"]][1], "completion": g["generated"]} for g in generations])
    standalone = win_rate.main(["--candidates", str(candidates), "--baseline", str(baseline), "--judge-model",
                                str(reward_model_dir), "--output-dir", str(tmp_path / "wr-validation")])
    assert standalone["prompts"] == len(generations) == 4 and standalone["unmatched_ids"] == 0
    assert standalone["ties"] < 4  # all ties would give 0.5 whatever the validation path did
    assert after["val/win_rate"] == pytest.approx(standalone["win_rate"], abs=1e-4)  # train.py rounds to 4 decimals


# ---- export and upload ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_export_reloads_with_the_checkpoints_logits_and_upload_pushes_that_folder(tmp_path, tiny_run_args, monkeypatch):
    from transformers import AutoModelForCausalLM

    from models import load_causal_lm

    monkeypatch.setenv("HF_TOKEN", "hf_secretTOKEN123")
    cfg, _ = resolve([*tiny_run_args, "--max-steps", "2", "--val-generate-samples", "0"])
    train.run(cfg)
    ckpt = cfg.run_dir / "checkpoints" / "last.ckpt"
    reference = load_causal_lm(cfg.model_name)
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    reference.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=False)

    pushed = {}

    class FakeApi:
        def __init__(self, token):
            pushed["token"] = token

        def create_repo(self, repo_id, private, exist_ok, repo_type):
            pushed.update(repo_id=repo_id, private=private)

        def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
            from pathlib import Path

            pushed["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            pushed["card"] = (Path(folder_path) / "README.md").read_text()

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    folder = upload_to_hub.main(["--checkpoint-path", str(cfg.run_dir), "--repo-id", "me/tiny-sft", "--training-type", "sft",
                                 "--local-dir", str(tmp_path / "export")])
    exported = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(exported(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert not torch.equal(exported.model.embed_tokens.weight, load_causal_lm(cfg.model_name).model.embed_tokens.weight)
    assert pushed["repo_id"] == "me/tiny-sft" and pushed["private"] is True and pushed["token"] == "hf_secretTOKEN123"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= set(pushed["files"])
    assert "chat_template" in (folder / "tokenizer_config.json").read_text() or (folder / "chat_template.jinja").is_file()
    assert "hf_secretTOKEN123" not in pushed["card"] and "val/loss" in pushed["card"]


def test_export_refuses_a_mismatched_training_type(tmp_path, tiny_run_args, capsys):
    cfg, _ = resolve([*tiny_run_args, "--max-steps", "1", "--val-generate-samples", "0"])
    train.run(cfg)
    with pytest.raises(SystemExit):
        upload_to_hub.main(["--checkpoint-path", str(cfg.run_dir), "--training-type", "bt", "--local-dir", str(tmp_path / "x")])
    assert "was trained as sft" in capsys.readouterr().err


def test_export_of_a_reward_model_keeps_its_head(tmp_path, tiny_run_args):
    from transformers import AutoModelForSequenceClassification

    cfg, _ = resolve([*tiny_run_args, "--training-type", "bt", "--max-steps", "1", "--name", "bt"])
    train.run(cfg)
    folder = upload_to_hub.main(["--checkpoint-path", str(cfg.run_dir / "checkpoints" / "last.ckpt"), "--training-type", "bt",
                                 "--local-dir", str(tmp_path / "export")])
    exported = AutoModelForSequenceClassification.from_pretrained(folder)
    state = torch.load(cfg.run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    torch.testing.assert_close(exported.score.weight, state["model.score.weight"])
    assert exported.config.num_labels == 1


RAY_CHECKPOINT = "checkpoint_2026-01-01_00-00-00.000000"  # how Ray Train names a checkpoint folder (by time)


def _assert_exports_the_checkpoint(folder, state):
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(exported.model.embed_tokens.weight, state["model.model.embed_tokens.weight"])
    torch.testing.assert_close(exported.model.layers[1].mlp.down_proj.weight, state["model.model.layers.1.mlp.down_proj.weight"])


@pytest.mark.slow
def test_export_from_a_ray_run_folder_locally_and_on_s3(tmp_path, tiny_run_args, s3_env):
    """A Ray run keeps checkpoint_<time>/checkpoint.ckpt (the newest one is exported) and its logs elsewhere, so the
    model card's metrics come from the checkpoint itself."""
    cfg, _ = resolve([*tiny_run_args, "--val-generate-samples", "0"])  # one epoch: validated, then checkpointed
    train.run(cfg)
    source = (cfg.run_dir / "checkpoints" / "last.ckpt").resolve()
    checkpoint = torch.load(source, weights_only=False)
    assert "val/loss" in checkpoint["val_metrics"]
    run = tmp_path / "ray-run"
    (run / RAY_CHECKPOINT).mkdir(parents=True)
    shutil.copy(source, run / RAY_CHECKPOINT / "checkpoint.ckpt")
    (run / "checkpoint_2025-12-31_00-00-00.000000").mkdir()  # older: exporting it would fail
    (run / "checkpoint_2025-12-31_00-00-00.000000" / "checkpoint.ckpt").write_bytes(b"not a checkpoint")

    folder = upload_to_hub.main(["--checkpoint-path", str(run), "--training-type", "sft", "--local-dir", str(tmp_path / "a")])
    _assert_exports_the_checkpoint(folder, checkpoint["state_dict"])
    card = (folder / "README.md").read_text()
    assert f"| val/loss | {checkpoint['val_metrics']['val/loss']:.4g} |" in card

    s3_env.create_bucket(Bucket="exports")
    s3_env.upload_file(str(source), "exports", f"runs/ray-run/{RAY_CHECKPOINT}/checkpoint.ckpt")
    for n, uri in enumerate(["s3://exports/runs/ray-run", f"s3://exports/runs/ray-run/{RAY_CHECKPOINT}"]):
        folder = upload_to_hub.main(["--checkpoint-path", uri, "--training-type", "sft", "--local-dir", str(tmp_path / f"s3-{n}")])
        _assert_exports_the_checkpoint(folder, checkpoint["state_dict"])
        assert f"| val/loss | {checkpoint['val_metrics']['val/loss']:.4g} |" in (folder / "README.md").read_text()


def test_export_names_the_flag_for_a_missing_or_sharded_checkpoint(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    with pytest.raises(SystemExit):
        upload_to_hub.main(["--checkpoint-path", str(missing), "--training-type", "sft", "--local-dir", str(tmp_path / "x")])
    assert f"--checkpoint-path {missing}: no checkpoint there" in capsys.readouterr().err
    sharded = tmp_path / "run" / "checkpoints" / "last.ckpt"  # Lightning's FSDP sharded layout: a folder
    sharded.mkdir(parents=True)
    (sharded / "__0_0.distcp").write_bytes(b"shard")
    with pytest.raises(SystemExit):
        upload_to_hub.main(["--checkpoint-path", str(tmp_path / "run"), "--training-type", "sft", "--local-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert "is a sharded checkpoint" in err and "--state-dict-type full" in err and "final_model/" in err


def test_final_metrics_come_from_the_csv_logs_else_from_the_checkpoint(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    stored = {"val_metrics": {"val/loss": 1.25, "val/accuracy": 0.5}}
    assert upload_to_hub.final_metrics(ckpt, stored) == {"val/loss": 1.25, "val/accuracy": 0.5}
    assert upload_to_hub.final_metrics(ckpt, {}) == {}
    log = tmp_path / "run" / "csv" / "version_0" / "metrics.csv"
    log.parent.mkdir(parents=True)
    log.write_text("step,train/loss,val/loss\n1,2.0,\n2,,1.75\n3,1.5,\n")
    assert upload_to_hub.final_metrics(ckpt, stored) == {"val/loss": 1.75}  # the run's own logs win


def test_secrets_are_masked_in_the_model_card_even_when_their_variable_is_unset(monkeypatch):
    for var in SECRET_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    tokens = ["hf_" + "A1b2" * 6, "sk-proj-" + "x_Y-9" * 5, "nvapi-" + "Zz0_" * 6, "AKIA" + "ABCDEFGH12345678"]
    cfg = {"model_name": "m", "dataset_name": "d", "name": "run " + " ".join(tokens), "wandb_project": "task-" + "a" * 24}
    card = upload_to_hub.model_card(cfg, {}, "sft")
    assert not any(token in card for token in tokens) and card.count("***") == 4
    assert "task-" + "a" * 24 in card  # a word ending in 'sk-' is not a key
    assert redact("hf_short sk-short AKIAshort") == "hf_short sk-short AKIAshort"
    monkeypatch.setenv("JUDGE_API_KEY", "judge-key-of-any-shape")
    assert redact("key: judge-key-of-any-shape") == "key: ***"


def test_validation_accuracy_reads_math_format_data(tmp_path, tiny_run_args, monkeypatch):
    """MATH rows (problem, solution with \\boxed{}) train and validate, with the math-verify answer accuracy.
    The validation answers are scripted (the tiny model gets nothing right). For the 4 validation problems "What
    is i + 1?", in order: "$\\boxed{i+1}$" (right), "\\boxed{i+2}" (wrong), "\\boxed{\\frac{2i+2}{2}}" (right:
    the same number as a fraction), "I do not know" (wrong: no answer). By hand: 2 of 4 right, accuracy 0.5."""
    import module

    def scripted(model, tokenizer, prompts, max_new_tokens, **kwargs):
        answers = []
        for position, ids in enumerate(prompts):
            i = int(re.search(r"What is (\d+) \+ 1\?", tokenizer.decode(ids)).group(1))
            answers.append([f"$\\boxed{{{i + 1}}}$", f"\\boxed{{{i + 2}}}", f"\\boxed{{\\frac{{{2 * i + 2}}}{{2}}}}",
                            "I do not know"][position % 4])
        return answers

    monkeypatch.setattr(module, "generate_from_prompts", scripted)
    rows = [{"problem": f"What is {i} + 1?", "solution": f"{i} + 1 = {i + 1}, so the answer is $\\boxed{{{i + 1}}}$."}
            for i in range(12)]
    path = write_jsonl(tmp_path / "math.jsonl", rows)
    cfg, _ = resolve([*tiny_run_args, "--dataset-name", str(path), "--test-size", "0.34", "--max-steps", "1"])
    after = train.run(cfg)["after"]
    generations = [json.loads(g) for g in (cfg.run_dir / "generations" / "step-1.jsonl").read_text().splitlines()]
    assert [g["correct"] for g in generations] == [True, False, True, False]
    assert after["val/accuracy"] == 0.5


def test_win_rate_prints_the_prompt_ids_it_could_not_match(tmp_path, monkeypatch, capsys):
    """4 candidate ids, 3 baseline ids, 2 in common: the console says what summary.json says, 2 and 1 left out."""

    class LengthJudge:
        def reward(self, prompt, response):
            return float(len(response))

    monkeypatch.setattr(win_rate, "make_judge", lambda kind, model: (LengthJudge(), "length"))
    ours = _answers(tmp_path, "ours", ["aa", "b", "c", "d"])  # ids 0-3
    base = write_jsonl(tmp_path / "base.jsonl", [{"id": i, "prompt": [{"role": "user", "content": f"q{i}"}],
                                                  "completion": "a"} for i in ("0", "1", "9")])
    summary = win_rate.main(["--candidates", str(ours), "--baseline", str(base), "--output-dir", str(tmp_path / "wr")])
    assert (summary["prompts"], summary["wins"], summary["ties"], summary["unmatched_ids"]) == (2, 1, 1, 2)
    assert "2 of the 4 --candidates ids are not in --baseline (1 of its 3 not in --candidates)" in capsys.readouterr().out
