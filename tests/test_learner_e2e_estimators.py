"""The demo still trains with each advantage estimator: `relay train` for a few steps from a
supervised warm start (so rewards are not all zero), reward finite and not collapsing, the
policy moves, no errors. Four steps on different prompts show no learning trend either way;
the per-step rewards are printed (-s)."""

import json
import math
import subprocess
import sys

import pytest
import torch

from envs.tasks import arithmetic


@pytest.fixture(scope="module")
def warm_start(tmp_path_factory, tiny_model_dir):
    """Data and a briefly fine-tuned tiny model (`relay sft`)."""
    root = tmp_path_factory.mktemp("e2e")
    train, test = arithmetic.write_splits(root / "data", n_train=200, n_test=8)
    out = root / "sft"
    cmd = [sys.executable, "-m", "launcher.cli", "sft", "-c", "demo", f"actor_rollout_ref.model.path={tiny_model_dir}",
           f"data.train_files=[{train}]", f"data.val_files=[{test}]", "--out", str(out), "--steps", "600", "--batch-size", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return train, test, out


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["grpo", "rloo", "gae", "reinforce_plus_plus"])
def test_demo_learns_with_each_estimator(tmp_path, warm_start, estimator):
    from safetensors.torch import load_file

    train, test, model = warm_start
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "launcher.cli", "train", "-c", "demo",
        f"actor_rollout_ref.model.path={model}", f"data.train_files=[{train}]", f"data.val_files=[{test}]",
        f"algorithm.adv_estimator={estimator}", f"trainer.default_local_dir={run}",
        "trainer.total_training_steps=4", "trainer.n_gpus_per_node=1", "actor_rollout_ref.rollout.num_actors=1",
        "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2", "agent.num_chains=8",
        "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=-1",
        # the demo preset's lr (1e-3, for a model trained from scratch) wrecks a warm start within
        # 3 steps (reward 0.9 -> 0, the same on the pre-algorithms skeleton); 1e-4 keeps it
        "actor_rollout_ref.actor.optim.lr=1e-4",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "reward/mean" in line]
    rewards = [s["reward/mean"] for s in steps]
    print(f"\n{estimator}: reward/mean per step {[round(r, 3) for r in rewards]}")
    assert len(steps) == 4
    assert all(math.isfinite(r) for r in rewards) and max(rewards) > 0
    assert rewards[-1] >= 0.5 * rewards[0]  # no collapse (each step sees different prompts)
    assert all(math.isfinite(s["actor/pg_loss"]) and s["actor/grad_norm"] > 0 for s in steps)
    if estimator == "gae":
        assert all(math.isfinite(s["critic/vf_loss"]) for s in steps)
    before, after = load_file(str(model / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    assert max(float((after[k] - before[k]).abs().max()) for k in after) > 1e-4
