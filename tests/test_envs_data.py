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


# --------------------------------------------------------------------------- verl / AgentFly layouts, parquet

VERL_ROWS = [
    {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": "Natalia sold 48 clips. How many? Let's think step by step."}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "72"},
        "extra_info": {"split": "train", "index": 0},
    },
    {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "4"},
        "extra_info": {"split": "train", "index": 1},
    },
]


def write_parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_verl_parquet_layout(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", VERL_ROWS)
    rows = load_rows(path)
    assert rows[0]["question"] == [{"role": "user", "content": VERL_ROWS[0]["prompt"][0]["content"]}]
    assert rows[1]["question"][0] == {"role": "system", "content": "Be brief."}
    assert [r["answer"] for r in rows] == ["72", "4"]
    assert [r["ground_truth"] for r in rows] == ["72", "4"]
    assert rows[1]["extra_info"] == {"split": "train", "index": 1} and rows[0]["data_source"] == "openai/gsm8k"
    # verl users often say data.prompt_key=prompt: the same rows under that key
    assert load_rows(path, prompt_key="prompt")[1]["prompt"][1] == {"role": "user", "content": "2+2?"}


def test_parquet_chosen_by_content_not_name(tmp_path):
    path = write_parquet(tmp_path / "rows.data", [{"question": "q1", "answer": "1"}])
    assert load_rows(path) == [{"question": "q1", "answer": "1"}]


def test_verl_layout_in_jsonl_and_agentfly_json(tmp_path):
    (tmp_path / "v.jsonl").write_text("\n".join(json.dumps(r) for r in VERL_ROWS) + "\n")
    assert [r["answer"] for r in load_rows(tmp_path / "v.jsonl")] == ["72", "4"]
    (tmp_path / "a.json").write_text(json.dumps([{"question": "What is 2+2?", "answer": "4"}]))
    assert load_rows(tmp_path / "a.json") == [{"question": "What is 2+2?", "answer": "4"}]


def test_own_answer_is_kept_over_ground_truth(tmp_path):
    (tmp_path / "v.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 3", "reward_model": {"ground_truth": "3"}}))
    row = load_rows(tmp_path / "v.jsonl")[0]
    assert (row["answer"], row["ground_truth"]) == ("#### 3", "3")


@pytest.mark.parametrize(
    "prompt, problem",
    [
        ([], "must end with a non-empty user message"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "must end with a non-empty user message"),
        ([{"role": "wizard", "content": "q"}], "role 'wizard'"),
        ([{"role": "user"}], "text 'role' and 'content'"),
        (7, "non-empty string or a chat list"),
    ],
)
def test_bad_chat_prompt_names_row(tmp_path, prompt, problem):
    rows = [VERL_ROWS[0], {**VERL_ROWS[1], "prompt": prompt}]
    (tmp_path / "v.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError) as info:
        load_rows(tmp_path / "v.jsonl")
    assert info.value.line == 2 and problem in info.value.problem


def test_bad_parquet_row_names_row(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", [VERL_ROWS[0], {**VERL_ROWS[1], "prompt": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert str(info.value).startswith(f"{path} row 2: a chat-list prompt must end with")


def test_missing_prompt_column_names_the_key_to_set(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"problem": "q", "solution": "1"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:1: row has no 'question' field .*set data\.prompt_key"):
        load_rows(tmp_path / "x.jsonl")
    assert load_rows(tmp_path / "x.jsonl", prompt_key="problem")[0]["problem"] == "q"


def test_undecodable_byte_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "ok"}\n{"question": "caf\xe9"}\n')
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert info.value.line == 2
    assert str(info.value) == f"{path}:2: not UTF-8 text: byte 0xe9 at column 18 (expected a JSON, JSONL or parquet file)"


def test_not_really_parquet(tmp_path):
    (tmp_path / "t.parquet").write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match="not a parquet file"):
        load_rows(tmp_path / "t.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1" + b"\0" * 20)
    with pytest.raises(DataError, match="cannot read parquet"):
        load_rows(tmp_path / "broken.parquet")


def test_agents_render_verl_chat_prompts(tmp_path):
    from envs.agents import make_agent
    from envs.tools import get_tool
    from launcher.tiny_model import build_tokenizer

    (tmp_path / "v.jsonl").write_text("\n".join(json.dumps(r) for r in VERL_ROWS) + "\n")
    rows = load_rows(tmp_path / "v.jsonl")
    tok = build_tokenizer()
    hf = make_agent("hf", tok, [get_tool("calculator")])
    assert hf.start(rows[0]).messages == VERL_ROWS[0]["prompt"]
    assert hf.start(rows[1]).messages == VERL_ROWS[1]["prompt"]
    react = make_agent("react", tok, [get_tool("calculator")])
    system, user = react.start(rows[1]).messages
    assert system["role"] == "system" and system["content"].endswith("\n\nBe brief.") and "calculator" in system["content"]
    assert user == {"role": "user", "content": "2+2?"}
    assert rows[1]["question"] == VERL_ROWS[1]["prompt"]  # the row itself is not changed
