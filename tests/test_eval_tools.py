"""Batch inference, win rate, math accuracy and the Hub export: resumable, offline, with numbers worked by hand."""

from __future__ import annotations

import json
import threading
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

    def crash_on_second_batch(self, batch, args_, seed):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash mid-run")
        return real(self, batch, args_, seed)

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


def test_inference_reads_a_dataset_and_keeps_its_references(tmp_path, tiny_model_dir):
    out = tmp_path / "out.jsonl"
    inference.main(["--model-name", str(tiny_model_dir), "--dataset-name", "synthetic-math", "--synthetic-levels", "1",
                    "--limit", "3", "--output", str(out), "--max-new-tokens", "3"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all("####" in r["reference"] for r in rows)
    assert rows[0]["prompt"][-1]["role"] == "user"


# ---- win rate ------------------------------------------------------------------------------------------------

def test_win_rate_by_hand():
    """Outcomes 1, 1, 0.5, 0: mean 0.625, sample variance (3 * 0.375^2 ... ) = 0.2292, half-width
    1.96 * sqrt(0.2292 / 4) = 0.4692."""
    result = win_rate.win_rate([3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 5.0])
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert result["win_rate"] == pytest.approx(0.625)
    assert result["ci95"] == pytest.approx([0.625 - 0.4692, 1.0], abs=1e-4)


class JudgeServer:
    """An OpenAI-compatible reward endpoint on 127.0.0.1: reward = length of the assistant's answer; the first
    call for each answer gets a 429; an answer containing 'garble' gets an unparseable reply."""

    def __init__(self):
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
                    self.send_response(429)
                    self.send_header("Retry-After", "0")
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
def judge_server(monkeypatch):
    server = JudgeServer()
    monkeypatch.setenv("JUDGE_BASE_URL", server.url)
    monkeypatch.setenv("JUDGE_API_KEY", "sk-test-secret-123")
    yield server
    server.httpd.shutdown()


def _answers(tmp_path, name, completions):
    return write_jsonl(tmp_path / f"{name}.jsonl", [{"id": str(i), "prompt": [{"role": "user", "content": f"q{i}"}],
                                                     "completion": c} for i, c in enumerate(completions)])


def test_win_rate_against_an_openai_compatible_server_with_retries_and_a_cache(tmp_path, judge_server, monkeypatch):
    monkeypatch.setattr(win_rate.ApiJudge.__init__, "__defaults__", (5, 0.01, 60.0))  # fast backoff in tests
    ours = _answers(tmp_path, "ours", ["a long answer", "mid", "xx"])
    base = _answers(tmp_path, "base", ["short", "mid", "a much longer one"])
    args = ["--candidates", str(ours), "--baseline", str(base), "--judge", "api", "--output-dir", str(tmp_path / "wr")]
    summary = win_rate.main(args)
    # Rewards are lengths + 0.5: 13.5 > 5.5 (win), 3.5 = 3.5 (tie), 2.5 < 17.5 (loss).
    assert (summary["wins"], summary["ties"], summary["losses"]) == (1, 1, 1) and summary["win_rate"] == 0.5
    assert len(judge_server.calls) == 2 * 5  # 5 distinct answers, each a 429 then a success
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


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    from models import load_reward_model, load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-reward")
    load_reward_model(str(tiny_model_dir)).save_pretrained(folder)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(folder)
    return folder


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
    cfg, _ = resolve([*tiny_run_args, "--max-steps", "1", "--calculate-win-rate", "--win-rate-baseline", str(baseline),
                      "--win-rate-judge", str(reward_model_dir)])
    after = train.run(cfg)["after"]
    assert 0.0 <= after["val/win_rate"] <= 1.0


# ---- export and upload ------------------------------------------------------------------------------------------

def test_export_reloads_with_the_checkpoints_logits_and_upload_pushes_that_folder(tmp_path, tiny_run_args, monkeypatch):
    from transformers import AutoModelForCausalLM

    from models import load_causal_lm

    monkeypatch.setenv("HF_TOKEN", "hf_secretTOKEN123")
    cfg, _ = resolve([*tiny_run_args, "--max-steps", "2", "--val-generate-samples", "0", "--name", "hf_secretTOKEN123"])
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


def test_validation_accuracy_reads_math_format_data(tmp_path, tiny_run_args):
    """MATH rows (problem, solution with \\boxed{}) train and validate, with the math-verify answer accuracy."""
    rows = [{"problem": f"What is {i} + 1?", "solution": f"{i} + 1 = {i + 1}, so the answer is $\\boxed{{{i + 1}}}$."}
            for i in range(12)]
    path = write_jsonl(tmp_path / "math.jsonl", rows)
    cfg, _ = resolve([*tiny_run_args, "--dataset-name", str(path), "--test-size", "0.34", "--max-steps", "1"])
    after = train.run(cfg)["after"]
    assert 0.0 <= after["val/accuracy"] <= 1.0
    generations = (cfg.run_dir / "generations" / "step-1.jsonl").read_text().splitlines()
    assert all(json.loads(g)["correct"] in (True, False) for g in generations)
