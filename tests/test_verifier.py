"""GenRM-CoT: the two-part loss by hand (lambda 0, 0.1 and 1, and over an accumulation window), p("Yes") against a
manual softmax and against a from-scratch forward pass, the adaptive-K loop driven by a scripted sampler (stops at
K_min when samples agree, grows to K_max when they do not, never beyond), shared-prefix sampling against per-sample
prompts, the verifier's data, batch 4 = 4 accumulated batches of 1, and a tiny verifier trained through train.run
scoring held-out correct solutions above incorrect ones."""

from __future__ import annotations

import math

import pytest
import torch

from extension.verifier import adaptive_k, compute_verifier_scores, p_yes_variance, yes_probabilities
from losses.sft import genrm_loss, genrm_part_sums
from metrics import auc

# ---- the loss ---------------------------------------------------------------------------------------------

def _genrm_batch():
    """Three rows of two target positions each: rows 0 and 1 verification (row 1's second position masked),
    row 2 a correct solution.

    L_verify  = (1 + 2 + 3) / 3 = 2.0      (tokens with log-probs -1, -2, -3)
    L_correct = (0.5 + 1.5) / 2 = 1.0      (tokens with log-probs -0.5, -1.5)
    """
    logps = torch.tensor([[-1.0, -2.0], [-3.0, -9.0], [-0.5, -1.5]])
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    part = torch.tensor([0, 0, 1])
    return logps, mask, part


def test_genrm_part_sums_by_hand():
    """S_verify = 1 + 2 + 3 = 6 over 3 tokens, S_correct = 0.5 + 1.5 = 2 over 2 tokens."""
    sums, tokens = genrm_part_sums(*_genrm_batch())
    torch.testing.assert_close(sums, torch.tensor([6.0, 2.0]))
    assert tokens.tolist() == [3, 2]


@pytest.mark.parametrize(("lam", "expected"), [(0.0, 2.0), (0.1, 2.1), (1.0, 3.0)])
def test_genrm_loss_by_hand(lam, expected):
    """L = L_verify + lambda * L_correct = 6 / 3 + lambda * 2 / 2 = 2.0 + lambda * 1.0."""
    loss = genrm_loss(*genrm_part_sums(*_genrm_batch()), lam)
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_genrm_loss_without_correct_rows_is_the_verification_loss():
    logps, mask, part = _genrm_batch()
    sums, tokens = genrm_part_sums(logps[:2], mask[:2], part[:2])
    assert int(tokens[1]) == 0
    torch.testing.assert_close(genrm_loss(sums, tokens, 0.5), torch.tensor(2.0))


def test_genrm_loss_over_a_window_weighs_each_token_once():
    """Two micro-batches of one accumulation window: the window loss is each part's sum over the window's tokens.
    Batch A = rows 0-1 (verify: 1 + 2 + 3 = 6 over 3 tokens), batch B = row 2 (correct: 2 over 2 tokens).
    Window: L = 6 / 3 + 0.1 * 2 / 2 = 2.1, the loss of the whole batch; each micro-batch's term uses the window's
    counts (3, 2), as the module does."""
    logps, mask, part = _genrm_batch()
    window = torch.tensor([3.0, 2.0])
    a = genrm_loss(genrm_part_sums(logps[:2], mask[:2], part[:2])[0], window, 0.1)
    b = genrm_loss(genrm_part_sums(logps[2:], mask[2:], part[2:])[0], window, 0.1)
    torch.testing.assert_close(a + b, torch.tensor(2.1))


# ---- p("Yes") and the adaptive-K loop ----------------------------------------------------------------------

def test_yes_probability_is_the_softmax_at_the_yes_token():
    torch.manual_seed(0)
    logits = torch.randn(3, 11)
    p_yes, p_normalized = yes_probabilities(logits, yes_id=4, no_id=7)
    for row in range(3):
        exp = [math.exp(v) for v in logits[row].tolist()]
        manual = exp[4] / sum(exp)
        assert p_yes[row].item() == pytest.approx(manual, rel=1e-5)
        assert p_normalized[row].item() == pytest.approx(exp[4] / (exp[4] + exp[7]), rel=1e-5)


class ScriptedSampler:
    """Returns the next values of a fixed p("Yes") stream per prompt, and records every call."""

    def __init__(self, streams: list[list[float]]):
        self.streams = streams
        self.used = [0] * len(streams)
        self.calls: list[tuple[list[int], int]] = []

    def __call__(self, indices: list[int], n: int):
        self.calls.append((list(indices), n))
        out = []
        for i in indices:
            values = self.streams[i][self.used[i]:self.used[i] + n]
            assert len(values) == n, "the loop asked for more samples than K_max allows"
            self.used[i] += n
            out.append([(v, v, f"rationale {i}") for v in values])
        return out


def test_adaptive_k_stops_at_k_min_when_samples_agree():
    sampler = ScriptedSampler([[0.9] * 32, [0.1] * 32])
    scores = compute_verifier_scores(sampler, 2, k_min=8, k_max=32, tau=0.05)
    assert [s.k for s in scores] == [8, 8]
    assert sampler.calls == [([0, 1], 8)]  # one group, both prompts in one call
    assert scores[0].score == pytest.approx(0.9)


def test_adaptive_k_grows_to_k_max_when_samples_disagree_and_never_beyond():
    """Alternating 0/1 has variance 0.25 >= tau at every K: groups of 8 until K_max."""
    sampler = ScriptedSampler([[0.0, 1.0] * 16])
    (score,) = compute_verifier_scores(sampler, 1, k_min=8, k_max=32, tau=0.05)
    assert score.k == 32
    assert sampler.calls == [([0], 8)] * 4
    assert score.score == pytest.approx(0.5)


def test_adaptive_k_cuts_the_last_group_to_k_max():
    sampler = ScriptedSampler([[0.0, 1.0] * 10])
    (score,) = compute_verifier_scores(sampler, 1, k_min=8, k_max=20, tau=0.05)
    assert score.k == 20
    assert [n for _, n in sampler.calls] == [8, 8, 4]


def test_adaptive_k_stops_once_the_variance_falls_below_tau():
    """First 8: 0.2/0.8 alternating, variance 0.09 >= 0.05. Then 8 x 0.5: variance over 16 is
    (8 * 0.09 + 8 * 0) / 16 = 0.045 < 0.05, so it stops at 16. The other prompt agrees at once and leaves
    after the first group."""
    stream = [0.2, 0.8] * 4 + [0.5] * 8 + [0.0, 1.0] * 8
    sampler = ScriptedSampler([stream, [1.0] * 32])
    scores = compute_verifier_scores(sampler, 2, k_min=8, k_max=32, tau=0.05)
    assert p_yes_variance(stream[:16]) == pytest.approx(0.045)
    assert [s.k for s in scores] == [16, 8]
    assert sampler.calls == [([0, 1], 8), ([0], 8)]
    # adaptive_k replays the same rule on a K_max stream, as the Best-of-N script and the bench do.
    assert adaptive_k(stream, 8, 32, 0.05) == 16
    assert adaptive_k([0.0, 1.0] * 16, 8, 32, 0.05) == 32
    assert adaptive_k([1.0] * 32, 8, 32, 0.05) == 8


def test_adaptive_k_rejects_bad_bounds():
    with pytest.raises(ValueError, match="K_min"):
        compute_verifier_scores(ScriptedSampler([[0.5] * 8]), 1, k_min=8, k_max=4)


def test_auc_by_hand():
    """Positives {0.9, 0.8}, negatives {0.8, 0.3}: pairs 0.9>0.8, 0.9>0.3, 0.8=0.8 (half), 0.8>0.3 -> 3.5 / 4."""
    assert auc([0.9, 0.8, 0.3, 0.8], [True, False, False, True]) == pytest.approx(0.875)
    assert auc([0.1, 0.2], [True, True]) is None


# ---- sampling from a model ---------------------------------------------------------------------------------

def test_verdict_tokens_of_a_character_tokenizer(char_tokenizer):
    from extension.verifier import verdict_tokens

    verdict = verdict_tokens(char_tokenizer)
    # Character by character, "? Yes" and "? No" first differ after the space: the space belongs to the question.
    assert verdict.suffix == "Verification: Is the answer correct (Yes/No)? "
    assert (verdict.yes_id, verdict.no_id) == tuple(char_tokenizer.convert_tokens_to_ids(["Y", "N"]))
    assert char_tokenizer.decode(list(verdict.question_ids)) == "\n" + verdict.suffix


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from models import load_causal_lm, load_tokenizer

    return load_causal_lm(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))


def test_sampled_p_yes_equals_a_full_forward_pass(tiny_lm):
    """The shared-prefix cache, left padding, batch compaction and the appended question give exactly the
    numbers of running prompt + rationale + question through the model from scratch."""
    from extension.verifier import RationaleSampler, verdict_tokens, verification_prompt_ids

    model, tokenizer = tiny_lm
    prompts = [verification_prompt_ids(tokenizer, "What is 2 + 3?", "2 + 3 = 5.\n#### 5"),
               verification_prompt_ids(tokenizer, "Tom has 12 apples and eats 4. How many are left?", "12 - 4 = 8.\n#### 8")]
    sampler = RationaleSampler(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, seed=3)
    results = sampler([1, 0], 3)
    question = list(verdict_tokens(tokenizer).question_ids)
    verdict = verdict_tokens(tokenizer)
    assert [len(r) for r in results] == [3, 3]
    for prompt_index, samples, generated in zip([1, 0], results, sampler.last_generated, strict=True):
        for (p_yes, p_normalized, _), tokens in zip(samples, generated, strict=True):
            ids = torch.tensor([prompts[prompt_index] + tokens + question])
            probs = torch.softmax(model(input_ids=ids).logits[0, -1].double(), dim=-1)
            assert p_yes == pytest.approx(probs[verdict.yes_id].item(), rel=1e-4)
            assert p_normalized == pytest.approx((probs[verdict.yes_id] / (probs[verdict.yes_id] + probs[verdict.no_id])).item(),
                                                 rel=1e-4)
    assert sampler.prompt_tokens_run == sum(len(p) - 1 for p in prompts)  # each prompt ran once, for all 6 samples


def test_shared_prefix_and_per_sample_prompts_give_the_same_greedy_verdicts(tiny_lm):
    from extension.verifier import RationaleSampler, verification_prompt_ids

    model, tokenizer = tiny_lm
    prompts = [verification_prompt_ids(tokenizer, "What is 7 * 3?", "7 * 3 = 21.\n#### 21"),
               verification_prompt_ids(tokenizer, "What is 9 - 4?", "9 - 4 = 6.\n#### 6")]
    shared = RationaleSampler(model, tokenizer, prompts, max_new_tokens=5, temperature=0.0)
    naive = RationaleSampler(model, tokenizer, prompts, max_new_tokens=5, temperature=0.0, share_prefix=False)
    a, b = shared([0, 1], 4), naive([0, 1], 4)
    assert [[round(p, 5) for p, _, _ in row] for row in a] == [[round(p, 5) for p, _, _ in row] for row in b]
    assert naive.prompt_tokens_run == 4 * shared.prompt_tokens_run  # the naive way runs each prompt per sample


@pytest.mark.parametrize("share_prefix", [True, False])
def test_static_cache_rationales_are_the_dynamic_paths(tiny_lm, share_prefix):
    """The static-cache decoding (a GPU replays its step as a CUDA graph) keeps finished rows in the batch; rationales,
    verdict probabilities and the random stream after them must be the dynamic path's. With no stop token every row
    runs to the budget and then the whole question: the static cache's bound (budget + question + verdict) is exact."""
    from extension.verifier import RationaleSampler, verification_prompt_ids

    model, tokenizer = tiny_lm
    prompts = [verification_prompt_ids(tokenizer, "What is 7 * 3?", "7 * 3 = 21.\n#### 21"),
               verification_prompt_ids(tokenizer, "Tom has 12 apples and eats 4. How many are left?", "12 - 4 = 8.\n#### 8")]
    many = set(range(0, model.config.vocab_size, 4))  # a quarter of the vocabulary ends a rationale
    for temperature, stop_ids in ((1.0, many), (1.0, set()), (0.0, many)):
        runs = []
        for static in (False, True):
            sampler = RationaleSampler(model, tokenizer, prompts, max_new_tokens=7, temperature=temperature, seed=5,
                                       share_prefix=share_prefix, static_cache=static)
            sampler.stop_ids = stop_ids
            results = sampler([1, 0], 3)
            runs.append((results, sampler.last_generated, sampler.generator.get_state()))
            assert not sampler.graphed  # no CUDA graph on the CPU
        (dynamic, generated, state), (static_results, static_generated, static_state) = runs
        assert static_generated == generated
        assert [[text for *_, text in row] for row in static_results] == [[text for *_, text in row] for row in dynamic]
        for got, want in zip(static_results, dynamic, strict=True):
            assert [p for p, _, _ in got] == pytest.approx([p for p, _, _ in want], rel=1e-4, abs=1e-6)
            assert [q for _, q, _ in got] == pytest.approx([q for _, q, _ in want], rel=1e-4, abs=1e-6)
        assert torch.equal(static_state, state)
        lengths = {len(tokens) for row in generated for tokens in row}
        if stop_ids:  # rows ended at different steps, so the static path kept finished rows
            assert temperature == 0.0 or len(lengths) > 1
        else:
            assert lengths == {7}


# ---- data and training -------------------------------------------------------------------------------------

def _verifier_cfg(tiny_run_args, *extra):
    from config import resolve

    # Character-level verification prompts and rationales are long: about 550 tokens for a level-1 problem.
    return resolve([*tiny_run_args, "--training-type", "sft_verifier", "--max-length", "700", *extra])[0]


def test_synthetic_verifier_data_never_trains_on_the_sft_test_problems(tiny_run_args):
    """--test-dataset-length 8: SFT is evaluated on the first 8 problems of the stream. The verifier's validation
    rows come from those 8 problems and its training rows from the later ones, interleaving the two parts."""
    import synthetic_math
    from custom_dataset import CustomDataset

    cfg = _verifier_cfg(tiny_run_args)
    train_set, val_set = CustomDataset.splits(cfg)
    sft_test = synthetic_math.build_dataset(32, 8, seed=cfg.seed, levels=cfg.levels())["test"]
    sft_questions = set(sft_test["question"])
    assert (len(train_set.rows), len(val_set.rows)) == (32, 8)
    assert [r["part"] for r in train_set.rows[:4]] == ["verify", "correct", "verify", "correct"]
    val_questions = {r["messages"][0]["content"] for r in val_set.rows if r["part"] == "correct"}
    train_questions = {r["messages"][0]["content"] for r in train_set.rows if r["part"] == "correct"}
    assert val_questions <= sft_questions and not train_questions & sft_questions
    labels = [r["label"] for r in train_set.rows if r["part"] == "verify"]
    assert set(labels) == {"Yes", "No"}
    assert all(r["reference"].endswith(f"(Yes/No)? {r['label']}") for r in train_set.rows if r["part"] == "verify")


def test_verifier_reads_the_output_of_data_preparation(tiny_run_args, tmp_path, capsys):
    from custom_dataset import CustomDataset
    from extension import data_preparation as prep

    summary = prep.main(["--source", "synthetic", "--num-problems", "40", "--val-fraction", "0.25",
                         "--output-dir", str(tmp_path / "prep")])
    cfg = _verifier_cfg(tiny_run_args, "--dataset-name", str(tmp_path / "prep"), "--train-dataset-length", "1000",
                        "--test-dataset-length", "1000")
    train_set, val_set = CustomDataset.splits(cfg)
    kept = summary["kept"]
    for dataset, verify, correct in ((train_set, "verify_train", "correct_train"),
                                     (val_set, "verify_validation", "correct_validation")):
        labels = [r["label"] for r in dataset.rows if r["part"] == "verify"]
        assert {label: labels.count(label) for label in ("Yes", "No")} == kept[verify]
        assert sum(r["part"] == "correct" for r in dataset.rows) == kept[correct]["rows"]


def test_verifier_data_without_genrm_splits_is_named(tiny_run_args, tmp_path):
    from conftest import write_jsonl

    from custom_dataset import CustomDataset, DataError

    path = write_jsonl(tmp_path / "v.jsonl", [{"question": "q", "solution": "s", "prompt": "p", "rationale": "r",
                                                "label": "Maybe"}] * 4)
    with pytest.raises(DataError, match=r"row \d+: verification row: 'label' must be 'Yes' or 'No'"):
        CustomDataset.splits(_verifier_cfg(tiny_run_args, "--dataset-name", str(path)))


@pytest.mark.slow
def test_verifier_batch_of_four_equals_four_accumulated_batches_of_one(tiny_run_args):
    """The two-part loss averages each part over its own tokens in the whole accumulation window, so the
    gradient of one step does not depend on how the window is cut into micro-batches."""
    from conftest import Recorder

    import train

    base = ["--training-type", "sft_verifier", "--train-dataset-length", "4", "--val-generate-samples", "0",
            "--gradient-clip-val", "0", "--lambda", "0.3"]
    big, small = Recorder(), Recorder()
    train.run(_verifier_cfg(tiny_run_args, *base, "--batch-size", "4", "--name", "big"), callbacks=[big])
    train.run(_verifier_cfg(tiny_run_args, *base, "--batch-size", "1", "--accumulate-grad-batches", "4", "--name", "small"),
              callbacks=[small])
    assert len(big.grads) == len(small.grads) == 1
    torch.testing.assert_close(torch.tensor(big.losses[0]), torch.tensor(sum(small.losses)), rtol=1e-5, atol=1e-6)
    for name, grad in big.grads[0].items():
        torch.testing.assert_close(small.grads[0][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_verifier_run_logs_both_losses_and_the_verifier_score(tiny_run_args):
    import csv
    import json

    import train

    cfg = _verifier_cfg(tiny_run_args, "--max-steps", "2", "--lambda", "0.5", "--log-every-n-steps", "1",
                        "--max-new-tokens", "8", "--verifier-k-min", "2", "--verifier-k-max", "4", "--verifier-tau", "0")
    results = train.run(cfg)
    after = results["after"]
    assert after["val/loss"] == pytest.approx(after["val/verify_loss"] + 0.5 * after["val/correct_loss"], abs=2e-4)
    assert {"val/verifier_accuracy", "val/verifier_auc", "val/verifier_score_yes", "val/verifier_score_no"} <= set(after)
    # tau 0 never stops early: every solution takes both groups of 2, up to --verifier-k-max 4.
    assert after["val/verifier_rationales"] == 4
    rows = list(csv.DictReader(open(next((cfg.run_dir / "csv").glob("*/metrics.csv")))))
    assert any(r.get("train/verify_loss") for r in rows) and any(r.get("train/correct_loss") for r in rows)
    generations = [json.loads(line) for line in (cfg.run_dir / "generations" / "step-2.jsonl").read_text().splitlines()]
    assert len(generations) == 4 and all(len(g["rationales"]) == len(g["p_yes"]) == 4 for g in generations)  # --val-generate-samples 4
    assert {g["label"] for g in generations} == {"Yes", "No"}


def _count_rows(n: int, start: int, values: int, rng) -> tuple[list[dict], list[dict]]:
    """Synthetic verification data a 2-layer model can learn in a minute: "Tom has x pens", a solution claiming y
    (= x for every other row), and a rationale that reads both and compares them."""
    from extension.data_preparation import VERDICT, build_prompt

    verify, correct = [], []
    for i in range(n):
        x, ok = rng.randrange(values), i % 2 == 0
        y = x if ok else rng.choice([v for v in range(values) if v != x])
        question, solution = f"Tom has {x} pens. How many pens?", f"{y} pens.\n#### {y}"
        rationale = f"{x} vs {y}: {'right' if ok else 'wrong'}.\n{VERDICT} {'Yes' if ok else 'No'}"
        verify.append({"question_id": str(start + i), "question": question, "solution": solution,
                       "prompt": build_prompt(question, solution), "rationale": rationale, "label": "Yes" if ok else "No"})
        correct.append({"question_id": str(start + i), "question": question, "solution": f"{x} pens.\n#### {x}"})
    return verify, correct


@pytest.mark.slow
def test_a_tiny_verifier_scores_held_out_correct_solutions_above_incorrect_ones(tmp_path):
    """A 2-layer Llama (hidden 128) trained with --training-type sft_verifier through train.run (40 epochs, about a
    minute), then scored by the real sampler (greedy rationale, p("Yes") after it) on 64 held-out rows it never saw."""
    import random

    from conftest import make_tiny_llama

    import train
    from config import resolve
    from extension.data_preparation import to_dataset_dict
    from extension.verifier import score_solutions
    from models import load_causal_lm, load_tokenizer

    rng = random.Random(0)
    (verify_train, correct_train), (verify_val, correct_val) = _count_rows(200, 0, 3, rng), _count_rows(64, 1000, 3, rng)
    to_dataset_dict({"verify_train": verify_train, "correct_train": correct_train, "verify_validation": verify_val,
                     "correct_validation": correct_val}).save_to_disk(tmp_path / "data")
    model_dir = make_tiny_llama(tmp_path / "model", hidden_size=128)
    cfg, _ = resolve(["--model-name", str(model_dir), "--dataset-name", str(tmp_path / "data"), "--training-type",
                      "sft_verifier", "--max-length", "400", "--batch-size", "16", "--lr", "2e-3", "--max-epochs", "40",
                      "--warmup-steps", "5", "--val-generate-samples", "0", "--num-sanity-val-steps", "0",
                      "--storage-path", str(tmp_path / "runs"), "--name", "verifier", "--no-verbose", "--seed", "0"])
    train.run(cfg)
    final = cfg.run_dir / "final_model"
    model, tokenizer = load_causal_lm(str(final)).eval(), load_tokenizer(str(final))
    scores = score_solutions(model, tokenizer, [r["question"] for r in verify_val], [r["solution"] for r in verify_val],
                             k_min=1, k_max=1, temperature=0.0, max_new_tokens=120)
    labels = [r["label"] == "Yes" for r in verify_val]
    values = [s.score for s in scores]
    mean_yes = sum(v for v, y in zip(values, labels) if y) / labels.count(True)
    mean_no = sum(v for v, y in zip(values, labels) if not y) / labels.count(False)
    # An untrained verifier scores both alike (its p("Yes") does not depend on the label); this one accepts correct
    # solutions about twice as often as wrong ones: with 32 of each, a gap of 0.2 is about 2 standard errors.
    assert mean_yes > mean_no + 0.2, (mean_yes, mean_no)
    assert auc(values, labels) > 0.6
