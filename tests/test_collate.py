"""Exact SFT label masks (single-turn, multi-turn and system-prompt chats: which positions are learned, that the
assistant's end-of-turn token is, the newline after it is not), padding, the objectives' loss units, and the
length-grouped resumable sampler (its accumulation windows and rank sharding)."""

from __future__ import annotations

import torch

from collate_functions import (
    IGNORE_INDEX,
    BatchPlan,
    LengthGroupedBatchSampler,
    PlannedDataset,
    SFTCollator,
    generation_prompt_ids,
    tokenize_chat,
)
from objectives import SFT


def _learned(tokenizer, feature):
    """The learned tokens as a string, '_' for each masked one."""
    return "".join(tokenizer.convert_ids_to_tokens(t) if t != IGNORE_INDEX else "_" for t in feature["labels"])


def test_single_turn_learns_answer_and_end_of_turn_only(char_tokenizer):
    # <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n  -> 25 tokens, answer at 21..23
    f, status = tokenize_chat(char_tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                              100, "drop")
    assert status == "ok" and len(f["input_ids"]) == 25
    expected = [IGNORE_INDEX] * 25
    expected[21:24] = f["input_ids"][21:24]
    assert f["labels"] == expected
    assert _learned(char_tokenizer, f) == "_" * 21 + "Yo<|im_end|>_"


def test_system_prompt_is_masked(char_tokenizer):
    messages = [{"role": "system", "content": "Be"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    f, _ = tokenize_chat(char_tokenizer, messages, 100, "drop")
    # system: 1+6+1+2+1+1 = 12 tokens, user: 1+4+1+1+1+1 = 9, assistant header 1+9+1 = 11 -> answer at 32
    assert _learned(char_tokenizer, f) == "_" * 32 + "A<|im_end|>_"


def test_multi_turn_learns_every_assistant_turn(char_tokenizer):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    f, _ = tokenize_chat(char_tokenizer, messages, 100, "drop")
    # each user turn is 9 tokens, each assistant header 11 tokens, each answer 'x<|im_end|>' then '\n'
    assert _learned(char_tokenizer, f) == "_" * 20 + "b<|im_end|>" + "_" * 21 + "d<|im_end|>_"


def test_overlong_rows_are_dropped_or_truncated(char_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert tokenize_chat(char_tokenizer, messages, 22, "drop") == (None, "dropped: longer than --max-length")
    f, status = tokenize_chat(char_tokenizer, messages, 22, "truncate")
    assert status == "truncated" and _learned(char_tokenizer, f) == "_" * 21 + "Y"
    assert tokenize_chat(char_tokenizer, messages, 21, "truncate") == (None, "invalid: the prompt alone fills --max-length")


def test_generation_prompt_ends_with_the_assistant_header(char_tokenizer):
    ids = generation_prompt_ids(char_tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    assert char_tokenizer.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_collator_pads_right_and_masks_padding():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    batch = SFTCollator(pad_token_id=0)(features)
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 9, 0]]))
    torch.testing.assert_close(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 1, 0]]))
    torch.testing.assert_close(batch["labels"], torch.tensor([[-100, 6, 7], [-100, 9, -100]]))
    assert [SFT.units(f) for f in features] == [2, 1]  # the SFT loss averages over answer tokens (not position 0)


def test_planned_batches_carry_their_windows_units():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    batch = PlannedDataset(features, SFTCollator(pad_token_id=0))[BatchPlan(indices=(1,), window_units=7)]
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[8, 9]]))
    assert int(batch["window_units"]) == 7


def _sampler(**kw):
    lengths = [5, 50, 7, 48, 6, 52, 9, 44, 3, 41, 8, 60]
    args = {"lengths": lengths, "targets": [n // 2 for n in lengths], "batch_size": 2, "group": 3, "seed": 1}
    return LengthGroupedBatchSampler(**{**args, **kw})


def test_sampler_covers_every_row_once_groups_lengths_and_reshuffles_per_epoch():
    s = _sampler()
    epoch0 = [p.indices for p in s]
    assert sorted(i for b in epoch0 for i in b) == list(range(12))
    lengths = s.lengths
    # a mega-batch of 3 batches is sorted by length, so each batch pairs rows of neighbouring length
    assert sum(abs(lengths[a] - lengths[b]) for a, b in epoch0) < sum(abs(lengths[a] - lengths[b])
                                                                      for a, b in zip(range(0, 12, 2), range(1, 12, 2)))
    assert [p.indices for p in s] == epoch0  # same epoch, same order
    s.set_epoch(1)
    assert [p.indices for p in s] != epoch0


def test_sampler_window_units_and_skip():
    s = _sampler(accumulate=2)
    plans = list(s)
    for k, p in enumerate(plans):
        w0 = k - k % 2
        window = [i for q in plans[w0:w0 + 2] for i in q.indices]
        assert p.window_units == sum(s.targets[i] for i in window)
    s.skip_batches(0, 4)
    assert list(s) == plans[4:]
    assert list(s) == plans  # the skip applies once


def test_sampler_shards_ranks_with_global_window_units():
    """2 ranks of batch 2 see, step by step, the rows 1 rank of batch 4 sees: the first two to rank 0, the next two
    to rank 1; both normalise by the same (global) token count."""
    whole = [p.indices for p in _sampler(batch_size=4)]
    ranks = [list(_sampler(batch_size=2, rank=r, world_size=2)) for r in range(2)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == 3
    assert [p.indices for p in ranks[0]] == [b[:2] for b in whole]
    assert [p.indices for p in ranks[1]] == [b[2:] for b in whole]
    for p0, p1 in zip(*ranks):
        assert p0.window_units == p1.window_units == sum(_sampler().targets[i] for i in p0.indices + p1.indices)


def test_sampler_splits_a_short_last_batch_so_no_rank_is_idle():
    """13 rows, 2 ranks of batch 2: three full steps, then a last global batch of 1 row, which one rank cannot share
    and is left out; with 3 rows left over (15 rows), rank 0 gets 2 and rank 1 gets 1."""
    for rows, expected in ((13, [2, 2, 2]), (15, [2, 2, 2, 2])):
        ranks = [LengthGroupedBatchSampler(list(range(1, rows + 1)), [1] * rows, batch_size=2, rank=r, world_size=2,
                                           shuffle=False) for r in range(2)]
        assert len(ranks[0]) == len(expected) and [len(p.indices) for p in ranks[0]] == expected
        assert len(list(ranks[1])) == len(expected)
        seen = sorted(i for s in ranks for p in s for i in p.indices)
        assert seen == sorted(set(seen)) and len(seen) == (12 if rows == 13 else 15)


def test_fp8_pads_every_batch_to_a_width_of_a_multiple_of_8_and_changes_no_log_prob(tiny_model_dir):
    """Transformer Engine's FP8 GEMM needs batch x width to be a multiple of 8: under --precision transformer-engine
    the collators and online RL's answer batches pad their width to one; the padding is masked, so every answer
    token's log-prob is what it is unpadded."""
    from collate_functions import SFTCollator
    from losses.logprobs import token_logprobs
    from models import load_causal_lm
    from online_rl import answer_batch
    from precision import sequence_multiple

    assert sequence_multiple("transformer-engine") == sequence_multiple("transformer-engine-float16") == 8
    assert sequence_multiple("bf16-true") == sequence_multiple("32") == 1
    features = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
                {"input_ids": [5, 6, 10], "labels": [-100, 6, 10]}]
    plain, padded = SFTCollator(0)(features), SFTCollator(0, multiple=8)(features)
    assert plain["input_ids"].shape == (2, 5) and padded["input_ids"].shape == (2, 8)
    assert padded["labels"][:, 5:].eq(-100).all() and padded["attention_mask"][:, 5:].eq(0).all()
    for key in plain:
        assert torch.equal(padded[key][:, :5], plain[key])
    ids, attention, labels = answer_batch([[5, 6], [7]], [[1, 2], [3], [4], [8, 9, 10]], 2, pad_id=0, multiple=8)
    assert ids.shape == (4, 8) and labels[:, 4:].eq(-100).all() and attention[:, 4:].eq(0).all()

    model = load_causal_lm(str(tiny_model_dir)).eval()
    with torch.no_grad():
        a, mask_a = token_logprobs(model, plain["input_ids"], plain["attention_mask"], plain["labels"])
        b, mask_b = token_logprobs(model, padded["input_ids"], padded["attention_mask"], padded["labels"])
    assert torch.equal(mask_b[:, :4], mask_a) and not mask_b[:, 4:].any()
    torch.testing.assert_close(b[:, :4], a)
