"""Overlong prompts are dropped when the learner loads its data (verl's data.filter_overlong_prompts)."""

import json
import logging

import pytest

from envs.data import DataError
from learner.prompts import drop_overlong, load_prompts, prompt_lengths
from tests.learner_support import learner_config


def test_drop_overlong_keeps_order_and_names_the_dropped():
    rows = [{"q": "a"}, {"q": "b"}, {"q": "c"}, {"q": "d"}]
    kept, dropped = drop_overlong(rows, [5, 9, 8, 10], max_tokens=8)
    assert kept == [{"q": "a"}, {"q": "c"}]
    assert dropped == [1, 3]


def test_drop_overlong_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="2 rows but 1 lengths"):
        drop_overlong([{}, {}], [1], 8)


def _write(tmp_path, questions):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": "1"}) + "\n" for q in questions))
    return str(path)


def test_prompt_length_counts_the_rendered_prompt(tmp_path, tiny_model_dir):
    cfg = learner_config(tiny_model_dir, tmp_path)
    short, long = prompt_lengths(cfg, [{"question": "1+1"}, {"question": "1+1" + "1" * 100}])
    # the tiny tokenizer splits digits: 100 more digits are exactly 100 more tokens
    assert long - short == 100
    assert short > 3  # template, system prompt and tool description count too


def test_load_prompts_drops_overlong_rows_and_says_so(tmp_path, tiny_model_dir, caplog):
    path = _write(tmp_path, ["1+1", "9" * 300, "2+2"])
    cfg = learner_config(tiny_model_dir, tmp_path, "data.max_prompt_length=200")
    with caplog.at_level(logging.WARNING):
        rows = load_prompts(cfg, [path], "train")
    assert [r["question"] for r in rows] == ["1+1", "2+2"]
    assert "train data: dropped 1 of 3 prompts longer than data.max_prompt_length=200 tokens" in caplog.text
    assert "first dropped: row 1" in caplog.text


def test_without_filtering_overlong_prompts_follow_truncation(tmp_path, tiny_model_dir):
    path = _write(tmp_path, ["1+1", "12" + "9" * 300 + "34"])
    off = ("data.max_prompt_length=200", "data.filter_overlong_prompts=false")
    with pytest.raises(DataError, match=r"1 train prompts are longer than data.max_prompt_length=200 tokens \(first: row 2"):
        load_prompts(learner_config(tiny_model_dir, tmp_path, *off), [path], "train")  # data.truncation=error
    for side, kept_end in (("left", "34"), ("right", "12")):
        cfg = learner_config(tiny_model_dir, tmp_path, *off, f"data.truncation={side}")
        rows = load_prompts(cfg, [path], "train")
        assert rows[0]["question"] == "1+1" and len(rows) == 2
        cut = rows[1]["question"]
        assert 0 < len(cut) < 304 and (cut.endswith(kept_end) if side == "left" else cut.startswith(kept_end))
        assert prompt_lengths(cfg, rows)[1] <= 200


def test_load_prompts_with_every_row_overlong_is_an_error(tmp_path, tiny_model_dir):
    path = _write(tmp_path, ["9" * 300])
    cfg = learner_config(tiny_model_dir, tmp_path, "data.max_prompt_length=200")
    with pytest.raises(DataError, match="every validation prompt is longer than data.max_prompt_length=200"):
        load_prompts(cfg, [path], "validation")
