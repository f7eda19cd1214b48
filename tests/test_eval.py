"""`relay eval`: pass@k by hand, and the CLI reports what the demo's in-process evaluation reports."""

import json
import subprocess
import sys
from math import comb

import pytest

from actors.evaluate import pass_at_k, pass_at_k_report
from envs.tasks import arithmetic


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - comb(3, 2) / comb(4, 2))  # 0.5
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)
    assert pass_at_k(4, 1, 4) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_pass_at_k_report_averages_prompts_and_pass_at_1_is_accuracy():
    report = pass_at_k_report([0, 1, 4], n=4)
    assert list(report) == ["pass@1", "pass@2", "pass@4"]
    assert report["pass@1"] == pytest.approx((0 + 0.25 + 1) / 3)
    assert report["pass@2"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert report["pass@4"] == pytest.approx(2 / 3)
    assert list(pass_at_k_report([1, 2], n=3)) == ["pass@1", "pass@2", "pass@3"]


def test_relay_eval_matches_the_demo_code_path(tmp_path, tiny_model_dir):
    """The demo evaluates with ``launcher.commands.evaluate``; ``relay eval`` must report the same."""
    from configs.loader import load_config
    from launcher import commands

    _, test = arithmetic.write_splits(tmp_path / "data", n_train=4, n_test=6)
    overrides = ["agent.max_tokens_per_turn=16", "actor_rollout_ref.rollout.response_length=48"]
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "eval", "-c", "demo", *overrides, "--model", tiny_model_dir,
         "--data", str(test), "--num-chains", "4", "--temperature", "0", "--out", str(out), "--dump", str(tmp_path / "samples.jsonl")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = json.loads(out.read_text())
    assert cli["n_prompts"] == 6 and {"pass@1", "pass@2", "pass@4"} <= set(cli)
    assert cli["pass@1"] == pytest.approx(cli["accuracy"])
    assert cli["pass@1"] <= cli["pass@2"] <= cli["pass@4"]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["index"], r["chain"]) for r in samples] == [(i, c) for i in range(6) for c in range(4)]
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    assert all(r["prompt"] == rows[r["index"]]["question"] and isinstance(r["response"], str) for r in samples)
    assert sum(r["reward"] >= 1.0 for r in samples) / len(samples) == pytest.approx(cli["accuracy"])

    cfg = load_config(["demo"], overrides)
    direct = commands.evaluate(cfg, tiny_model_dir, str(test), 0, 4, 0.0, None)
    for key in ("accuracy", "reward_mean", "tool_use_rate", "turns_mean", "pass@4"):
        assert direct[key] == pytest.approx(cli[key]), key
