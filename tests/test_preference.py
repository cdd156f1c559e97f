"""Preference data (formats, malformed rows), pair collation, the DPO forward pass and reference handling,
and short DPO / Bradley-Terry runs of the tiny model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import write_jsonl
from transformers import AutoModelForCausalLM

import train
from collate_functions import IGNORE_INDEX, PreferenceCollator, tokenize_chat, tokenize_pair
from config import resolve
from custom_dataset import CustomDataset, DataError
from losses.dpo import sequence_logps
from losses.logprobs import token_logprobs
from module import PostTrainingModule, precompute_reference_logps
from objectives import DPO


def _toy_pairs(n: int) -> list[dict]:
    """A preference with a pattern a tiny model can learn: the chosen answer is 'yes', the rejected one 'no'."""
    return [{"prompt": f"Is {i} fine?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(n)]


def _cfg(tmp_path, *flags):
    return resolve(["--storage-path", str(tmp_path / "runs"), "--name", "p", "--training-type", "dpo", *flags])[0]


def test_ultrafeedback_and_plain_rows_normalise_to_the_same_pair(tmp_path):
    ultra = {"prompt": "Hi?", "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello"}],
             "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away"}]}
    plain = {"prompt": "Hi?", "chosen": "Hello", "rejected": "Go away"}
    path = write_jsonl(tmp_path / "u.jsonl", [ultra] * 50)
    rows_u, _ = CustomDataset.splits(_cfg(tmp_path, "--dataset-name", str(path)))
    path = write_jsonl(tmp_path / "p.jsonl", [plain] * 50)
    rows_p, _ = CustomDataset.splits(_cfg(tmp_path, "--dataset-name", str(path)))
    expected = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello"}],
                "rejected": "Go away", "reference": "Hello"}
    assert {k: rows_u.rows[0][k] for k in expected} == expected == {k: rows_p.rows[0][k] for k in expected}


@pytest.mark.parametrize(("bad", "reason"), [({"rejected": None}, "missing 'rejected'"), ({"chosen": "  "}, "'chosen' is empty")])
def test_malformed_pair_is_an_error_or_skipped_and_counted(tmp_path, capsys, bad, reason):
    rows = _toy_pairs(60)
    rows[7] = {**rows[7], **bad}
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    flags = ["--dataset-name", str(path), "--test-size", "0.5", "--seed", "1"]
    with pytest.raises(DataError, match=rf"pairs.jsonl \[(train|test)\] row \d+: {reason}"):
        CustomDataset.splits(_cfg(tmp_path, *flags))
    train_set, test_set = CustomDataset.splits(_cfg(tmp_path, *flags, "--invalid-rows", "skip"))
    assert len(train_set) + len(test_set) == 59
    assert f"skipped 1 invalid row(s): {reason}" in capsys.readouterr().out


def test_prompt_filling_max_length_is_an_error_or_skipped(tiny_model_dir, tmp_path, capsys):
    rows = _toy_pairs(30)
    rows[3] = {**rows[3], "prompt": "x" * 300}
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    base = ["--model-name", str(tiny_model_dir), "--dataset-name", str(path), "--max-length", "128",
            "--sanity-train", "--max-steps", "1", "--val-generate-samples", "0", "--no-verbose"]
    with pytest.raises(SystemExit):
        train.main(["--storage-path", str(tmp_path), "--name", "a", "--training-type", "dpo", *base])
    assert "row 3: the prompt alone fills --max-length 128" in capsys.readouterr().err
    train.main(["--storage-path", str(tmp_path), "--name", "b", "--training-type", "dpo", "--invalid-rows", "skip", *base])
    # 30 rows less the 1 carved out as the test split (--test-size 0.02), less the invalid one
    assert "train: 28 rows kept (1 invalid: the prompt alone fills --max-length, 28 ok)" in capsys.readouterr().out


def test_pair_features_use_the_sft_masks(char_tokenizer):
    row = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}], "rejected": "bad"}
    feature, status = tokenize_pair(char_tokenizer, row, 100, "drop")
    chosen, _ = tokenize_chat(char_tokenizer, row["messages"], 100, "drop")
    rejected, _ = tokenize_chat(char_tokenizer, [row["messages"][0], {"role": "assistant", "content": "bad"}], 100, "drop")
    assert status == "ok"
    assert (feature["chosen_input_ids"], feature["chosen_labels"]) == (chosen["input_ids"], chosen["labels"])
    assert (feature["rejected_input_ids"], feature["rejected_labels"]) == (rejected["input_ids"], rejected["labels"])


def test_preference_collator_puts_chosen_rows_first():
    features = [
        {"chosen_input_ids": [1, 2, 3], "chosen_labels": [-100, 2, 3], "rejected_input_ids": [1, 4], "rejected_labels": [-100, 4],
         "ref_logps": (-1.0, -2.0)},
        {"chosen_input_ids": [5, 6], "chosen_labels": [-100, 6], "rejected_input_ids": [5, 7, 8, 9],
         "rejected_labels": [-100, -100, 8, 9], "ref_logps": (-3.0, -4.0)},
    ]
    batch = PreferenceCollator(pad_token_id=0)(features)
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[1, 2, 3, 0], [5, 6, 0, 0], [1, 4, 0, 0], [5, 7, 8, 9]]))
    torch.testing.assert_close(batch["labels"], torch.tensor(
        [[-100, 2, 3, -100], [-100, 6, -100, -100], [-100, 4, -100, -100], [-100, -100, 8, 9]]))
    torch.testing.assert_close(batch["ref_logps"], torch.tensor([-1.0, -3.0, -2.0, -4.0]))
    assert [DPO.units(f) for f in features] == [1, 1]  # the DPO loss averages over pairs


def _pairs_dataset(tokenizer, n=6):
    rows = [{"messages": [{"role": "user", "content": f"Q{i}" * (i + 1)}, {"role": "assistant", "content": "ok" * (i + 1)}],
             "rejected": "no" * (2 * i + 1)} for i in range(n)]
    dataset = CustomDataset(rows, "preference")
    dataset.features = [tokenize_pair(tokenizer, r, 200, "drop")[0] for r in rows]
    return dataset


def _module(tiny_model_dir, char_tokenizer, tmp_path, dataset, ref=True):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():  # make the policy differ from the reference
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir) if ref else None
    return PostTrainingModule(_cfg(tmp_path, "--beta", "0.5"), policy, char_tokenizer, dataset,
                              dataset, DPO, ref_model=reference)


def dpo_step(module, batch):
    """The module's DPO loss on one batch, as a mean over its pairs: (loss, metrics, pairs)."""
    loss_sum, pairs, metrics = module.loss_fn(module.model, batch, module.ref_model)
    return loss_sum / pairs, metrics, pairs


def test_concatenated_forward_equals_separate_passes(tiny_model_dir, char_tokenizer, tmp_path):
    dataset = _pairs_dataset(char_tokenizer)
    module = _module(tiny_model_dir, char_tokenizer, tmp_path, dataset)
    batch = module.collator(dataset.features)
    joint = sequence_logps(*token_logprobs(module.model, batch["input_ids"], batch["attention_mask"], batch["labels"]))
    from collate_functions import SFTCollator

    for side, rows in (("chosen", slice(0, 6)), ("rejected", slice(6, 12))):
        alone = SFTCollator(0)([{"input_ids": f[f"{side}_input_ids"], "labels": f[f"{side}_labels"]} for f in dataset.features])
        separate = sequence_logps(*token_logprobs(module.model, alone["input_ids"], alone["attention_mask"], alone["labels"]))
        torch.testing.assert_close(joint[rows], separate, rtol=1e-5, atol=1e-4)
    assert (batch["labels"][:, 1:] != IGNORE_INDEX).sum() > 0


def test_precomputed_reference_gives_the_live_loss_and_gradients_reach_only_the_policy(tiny_model_dir, char_tokenizer, tmp_path):
    dataset = _pairs_dataset(char_tokenizer)
    live = _module(tiny_model_dir, char_tokenizer, tmp_path, dataset)
    batch = live.collator(dataset.features)
    live_loss, live_metrics, pairs = dpo_step(live, batch)
    live_loss.backward()
    assert int(pairs) == 6 and float(live_loss) != pytest.approx(0.693147, abs=1e-4)
    assert all(p.grad is None for p in live.ref_model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in live.model.parameters())

    cache = tmp_path / "ref.pt"
    precompute_reference_logps(live.ref_model, [dataset], live.collator, 4, cache, verbose=False)
    assert cache.is_file()
    cached = _module(tiny_model_dir, char_tokenizer, tmp_path, dataset, ref=False)
    loss, metrics, _ = dpo_step(cached, cached.collator(dataset.features))
    torch.testing.assert_close(loss, live_loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["rewards/margin"], live_metrics["rewards/margin"], rtol=1e-5, atol=1e-5)
    # A second pass reads the same numbers back from the cache instead of running the reference.
    for f in dataset.features:
        del f["ref_logps"]
    precompute_reference_logps(None, [dataset], live.collator, 4, cache, verbose=False)
    assert all("ref_logps" in f for f in dataset.features)


def test_policy_equal_to_reference_gives_log_2(tiny_model_dir, char_tokenizer, tmp_path):
    dataset = _pairs_dataset(char_tokenizer)
    module = _module(tiny_model_dir, char_tokenizer, tmp_path, dataset)
    module.model = copy.deepcopy(module.ref_model)
    loss, metrics, _ = dpo_step(module, module.collator(dataset.features))
    torch.testing.assert_close(loss, torch.tensor(0.693147), atol=1e-5, rtol=0)
    assert float(metrics["rewards/chosen"]) == 0.0


def _toy_run(tiny_model_dir, tmp_path, training_type, *flags):
    path = write_jsonl(tmp_path / "toy.jsonl", _toy_pairs(48))
    args = ["--model-name", str(tiny_model_dir), "--dataset-name", str(path), "--training-type", training_type,
            "--test-size", "0.25", "--batch-size", "4", "--lr", "2e-3", "--max-epochs", "3", "--max-length", "64",
            "--val-generate-samples", "0", "--num-sanity-val-steps", "0", "--eval-before-training", "--no-verbose",
            "--storage-path", str(tmp_path / "runs"), "--name", training_type, "--seed", "0", *flags]
    return train.main(args)


@pytest.mark.slow
@pytest.mark.parametrize("precompute", [False, True], ids=["live-reference", "precomputed-reference"])
def test_short_dpo_run_raises_held_out_reward_accuracy(tiny_model_dir, tmp_path, precompute):
    results = _toy_run(tiny_model_dir, tmp_path, "dpo", "--beta", "0.5",
                       *(["--precompute-ref-logps"] if precompute else []))
    before, after = results["before"], results["after"]
    assert before["val/rewards/accuracy"] == 0.0 and before["val/loss"] == pytest.approx(0.6931, abs=1e-3)
    assert after["val/rewards/accuracy"] >= 0.9 and after["val/loss"] < 0.5
    assert after["val/rewards/margin"] > 0


@pytest.mark.slow
def test_short_bt_run_separates_chosen_from_rejected(tiny_model_dir, tmp_path):
    from models import load_reward_model, score_responses

    results = _toy_run(tiny_model_dir, tmp_path, "bt")
    assert results["after"]["val/rewards/accuracy"] >= 0.9 and results["after"]["val/loss"] < 0.5
    judge = load_reward_model(str(tmp_path / "runs" / "bt" / "final_model"))
    from models import load_tokenizer

    tokenizer = load_tokenizer(str(tmp_path / "runs" / "bt" / "final_model"))
    prompts = [f"Is {i} fine?" for i in range(100, 110)]  # unseen prompts
    good = score_responses(judge, tokenizer, prompts, [f"yes {i}" for i in range(100, 110)])
    bad = score_responses(judge, tokenizer, prompts, [f"no {i}" for i in range(100, 110)])
    assert sum(g > b for g, b in zip(good, bad)) >= 9


def test_ultrafeedback_layout_reads_prefs_splits_for_dpo_and_sft_splits_for_sft(tmp_path):
    import datasets

    def split(tag, n):
        return datasets.Dataset.from_list([{
            "prompt": f"{tag} {i}", "chosen": [{"role": "user", "content": f"{tag} {i}"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": f"{tag} {i}"}, {"role": "assistant", "content": "b"}],
            "messages": [{"role": "user", "content": f"{tag} {i}"}, {"role": "assistant", "content": "a"}]} for i in range(n)])

    folder = tmp_path / "uf"
    datasets.DatasetDict({"train_sft": split("sft", 5), "test_sft": split("tsft", 2), "train_prefs": split("prefs", 4),
                          "test_prefs": split("tprefs", 3)}).save_to_disk(str(folder))
    dpo_train, dpo_test = CustomDataset.splits(_cfg(tmp_path, "--dataset-name", str(folder)))
    assert (len(dpo_train), len(dpo_test), dpo_train.format) == (4, 3, "preference")
    sft_cfg = resolve(["--storage-path", str(tmp_path), "--name", "s", "--dataset-name", str(folder)])[0]
    sft_train, sft_test = CustomDataset.splits(sft_cfg)
    assert (len(sft_train), len(sft_test), sft_train.format) == (5, 2, "messages")
