"""`relay train` for real: 2 learner ranks (FSDP2 over gloo) and 2 actor processes over ZeroMQ."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from envs.tasks import arithmetic


@pytest.mark.slow
def test_relay_train_two_ranks_two_actors(tmp_path, tiny_model_dir):
    train, test = arithmetic.write_splits(tmp_path / "data", n_train=64, n_test=8)
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "launcher.cli", "train", "-c", "demo",
        f"actor_rollout_ref.model.path={tiny_model_dir}",
        f"data.train_files=[{train}]", f"data.val_files=[{test}]",
        "trainer.total_training_steps=4", f"trainer.default_local_dir={run}",
        "trainer.n_gpus_per_node=2", "actor_rollout_ref.rollout.num_actors=2",
        "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "agent.num_chains=4", "agent.max_tokens_per_turn=16", "actor_rollout_ref.rollout.response_length=48",
        "actor_rollout_ref.rollout.max_concurrent_episodes=8",
        "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=-1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["exit_codes"]) == {"learner-0", "learner-1", "actor-0", "actor-1"}
    assert all(code == 0 for code in summary["exit_codes"].values()), summary

    actors = json.loads((run / "actors.json").read_text())
    assert set(actors) == {"actor-0", "actor-1"}
    assert all(a["trajectories"] > 0 for a in actors.values()), actors
    versions = set().union(*(a["versions"] for a in actors.values()))
    assert len(versions) >= 2, actors

    steps = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(s["actor/pg_loss"]) for s in steps)
    assert all(s["staleness/max"] <= 1 for s in steps)
    ledger = [json.loads(l) for l in (run / "ledger.jsonl").read_text().splitlines()]
    trained = [sid for rec in ledger for sid in rec["samples"]]
    assert len(trained) == len(set(trained)) == 16  # 4 steps x 4 prompts, none twice
    assert (run / "final" / "config.json").exists()
