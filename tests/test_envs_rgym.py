"""reasoning-gym tasks as datasets and rewards (``data.source=reasoning_gym:NAME``)."""

import json

import pytest

pytest.importorskip("reasoning_gym")

from configs.schema import RelayConfig
from envs.rewards import TrajectoryInfo, get_reward
from envs.tasks.rgym import generate_rows, main, source_rows


def info():
    return TrajectoryInfo(messages=[], num_turns=1, tool_calls=[], truncated=False, response_text="")


def test_rows_are_deterministic_json_and_scored_by_the_task():
    rows = source_rows("reasoning_gym:basic_arithmetic", {"size": 5, "seed": 3}, default_seed=0)
    assert rows == generate_rows("basic_arithmetic", size=5, seed=3) and len(rows) == 5
    assert json.loads(json.dumps(rows)) == rows
    assert rows != generate_rows("basic_arithmetic", size=5, seed=4)
    reward = get_reward("reasoning_gym")
    row = rows[0]
    assert reward(row["answer"], info(), **row)["reward"] == 1.0
    assert reward("not a number", info(), **row)["reward"] == 0.0


def test_generator_options_and_bad_names():
    rows = generate_rows("basic_arithmetic", size=20, seed=0, min_terms=2, max_terms=2)
    assert all(r["metadata"]["num_terms"] == 2 for r in rows)
    with pytest.raises(ValueError, match="no task 'basic_arithmetics'"):
        generate_rows("basic_arithmetics", size=2)
    with pytest.raises(ValueError, match="known source is reasoning_gym:NAME"):
        source_rows("gym:x", {}, 0)


def test_learner_prompts_come_from_the_source(tiny_model_dir, tmp_path):
    from learner.prompts import load_prompts

    cfg = RelayConfig.model_validate({
        "data": {"source": "reasoning_gym:basic_arithmetic", "source_options": {"size": 12}, "max_prompt_length": 512},
        "agent": {"reward_name": "reasoning_gym"},
        "actor_rollout_ref": {"model": {"path": tiny_model_dir}},
    })
    rows = load_prompts(cfg, cfg.data.train_files, "train")
    assert [r["question"] for r in rows] == [r["question"] for r in generate_rows("basic_arithmetic", size=12, seed=0)]
    out = tmp_path / "val.jsonl"
    assert main(["basic_arithmetic", "--size", "4", "--out", str(out)]) == 0
    assert [json.loads(l) for l in out.read_text().splitlines()] == generate_rows("basic_arithmetic", size=4, seed=1)
