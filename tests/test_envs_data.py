import json
from pathlib import Path

import pytest

from envs.data import DataError, load_rows

GSM8K = Path("/work/shared/data/gsm8k")


def test_jsonl_and_json_list(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"question": "q1", "answer": "1"}\n\n{"question": "q2", "extra": [1]}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"question": "q3"}, {"question": "q4", "answer": 4}], indent=2))
    rows = load_rows([tmp_path / "a.jsonl", str(tmp_path / "b.json")])
    assert rows == [
        {"question": "q1", "answer": "1"},
        {"question": "q2", "extra": [1]},
        {"question": "q3"},
        {"question": "q4", "answer": 4},
    ]
    (tmp_path / "c.jsonl").write_text('{"prompt": "p"}\n')
    assert load_rows(tmp_path / "c.jsonl", prompt_key="prompt") == [{"prompt": "p"}]


@pytest.mark.parametrize(
    "content,line,problem",
    [
        ('{"question": "ok"}\n{"question": "bad"\n', 2, "invalid JSON"),
        ('{"question": "ok"}\n[1, 2]\n', 2, "expected an object"),
        ('\n{"answer": "1"}\n', 2, "no 'question' field"),
        ('{"question": ""}\n', 1, "non-empty string"),
        ('{"question": 3}\n', 1, "non-empty string"),
    ],
)
def test_bad_jsonl_rows_name_file_and_line(tmp_path, content, line, problem):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_rows(path)
    err = info.value
    assert err.path == str(path) and err.line == line and problem in err.problem
    assert f"{path}:{line}" in str(err)


def test_bad_json_list_item_names_its_line(tmp_path):
    path = tmp_path / "e.json"
    path.write_text('[\n  {"question": "a"},\n  {"question": "b"},\n  "oops"\n]\n')
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert info.value.line == 4 and "str" in info.value.problem


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_rows(tmp_path / "empty.jsonl")


@pytest.mark.skipif(not (GSM8K / "test.jsonl").exists(), reason="GSM8K not at /work/shared/data/gsm8k")
def test_gsm8k_loads_as_is():
    rows = load_rows(GSM8K / "test.jsonl")
    assert len(rows) == 1319
    assert rows[0]["question"].startswith("Janet")
    assert rows[0]["answer"].rstrip().endswith("#### 18")
    if (GSM8K / "train.jsonl").exists():
        assert len(load_rows(GSM8K / "train.jsonl")) == 7473
