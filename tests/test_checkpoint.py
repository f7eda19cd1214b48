"""Kill `relay train` with SIGKILL after a checkpoint; `resume_mode=auto` continues with no sample trained twice."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from envs.tasks import arithmetic

N_TRAIN, BATCH, STEPS = 24, 4, 6  # one epoch: every training prompt exactly once


def train_cmd(tmp_path: Path, tiny_model_dir: str, run: Path, *extra: str) -> list[str]:
    train, test = arithmetic.write_splits(tmp_path / "data", n_train=N_TRAIN, n_test=4)
    return [
        sys.executable, "-m", "launcher.cli", "train", "-c", "demo",
        f"actor_rollout_ref.model.path={tiny_model_dir}",
        f"data.train_files=[{train}]", f"data.val_files=[{test}]", f"trainer.default_local_dir={run}",
        f"trainer.total_training_steps={STEPS}", f"data.train_batch_size={BATCH}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={BATCH}", "agent.num_chains=2",
        "agent.max_tokens_per_turn=16", "actor_rollout_ref.rollout.response_length=48",
        "trainer.n_gpus_per_node=2", "actor_rollout_ref.rollout.num_actors=1",
        "trainer.save_freq=2", "trainer.max_ckpt_to_keep=2", "trainer.test_freq=-1", "trainer.val_before_train=false",
        "trainer.logger=[jsonl]", *extra,
    ]


def run_processes(run: Path) -> list[psutil.Process]:
    """Learner ranks and actors of the run (their command line names its config)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(run) in part for part in p.info["cmdline"] or []) and p.pid != os.getpid():
                out.append(p)
        except psutil.Error:
            pass
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    cmd = train_cmd(tmp_path, tiny_model_dir, run)
    out1 = open(tmp_path / "run1.out", "wb")
    first = subprocess.Popen(cmd, stdout=out1, stderr=subprocess.STDOUT, start_new_session=True)
    marker = run / "checkpoints" / "global_step_2" / "COMPLETE"
    deadline = time.monotonic() + 400
    while not marker.exists():
        assert first.poll() is None, (tmp_path / "run1.out").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 400s"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the whole process group of `relay train`
    first.wait(timeout=30)
    # the learners and actors were in their own sessions: they must die with the supervisor
    deadline = time.monotonic() + 30
    while (left := run_processes(run)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left behind: {[p.cmdline() for p in left]}"

    ckpts = sorted(int(p.parent.name.split("_")[-1]) for p in (run / "checkpoints").glob("global_step_*/COMPLETE"))
    resumed_at = ckpts[-1]
    assert resumed_at < STEPS
    ledger1 = read_jsonl(run / "ledger.jsonl")
    log_sizes = {p.name: p.stat().st_size for p in (run / "logs").glob("*.log")}

    t0 = time.monotonic()
    second = subprocess.run(cmd + ["trainer.resume_mode=auto"], capture_output=True, text=True, timeout=600)
    resume_s = time.monotonic() - t0
    assert second.returncode == 0, second.stderr[-4000:]
    print(f"resumed at step {resumed_at}; second run {resume_s:.0f}s")

    learner_log = (run / "logs" / "learner-0.log").read_bytes()[log_sizes["learner-0.log"] :].decode()
    assert f"resumed from {run / 'checkpoints' / f'global_step_{resumed_at}'}: step {resumed_at}, policy v{resumed_at}" in learner_log
    # actors fetched the resumed weights when they registered
    actor_log = (run / "logs" / "actor-0.log").read_bytes()[log_sizes.get("actor-0.log", 0) :].decode()
    assert f"now serving v{resumed_at} " in actor_log, actor_log[-2000:]

    # metrics continue from the checkpoint's step and version
    metrics = read_jsonl(run / "metrics.jsonl")
    after = metrics[-(STEPS - resumed_at) :]  # the second run's records
    assert [m["step"] for m in after] == list(range(resumed_at + 1, STEPS + 1))
    assert [m["version"] for m in after] == list(range(resumed_at + 1, STEPS + 1))

    # ledgers: the first run's steps before the checkpoint are kept, the second run trains the rest,
    # and together they train every prompt exactly once (nothing repeated, nothing skipped)
    ledger2 = read_jsonl(run / "ledger.jsonl")
    assert ledger2[:resumed_at] == [r for r in ledger1 if r["step"] < resumed_at]
    assert [r["step"] for r in ledger2] == list(range(STEPS))
    kept = [s for r in ledger1 if r["step"] < resumed_at for s in r["samples"]]
    new = [s for r in ledger2[resumed_at:] for s in r["samples"]]
    assert not set(kept) & set(new), "a sample was trained in both runs"
    trained = kept + new
    assert len(trained) == len(set(trained)) == N_TRAIN
    assert set(trained) == {f"0:{i}" for i in range(N_TRAIN)}
    rolled = [r["step"] for r in ledger1 if r["step"] >= resumed_at]
    if rolled:
        assert [r["step"] for r in read_jsonl(run / "ledger.rolled_back.jsonl")] == rolled

    # the newest checkpoints are kept, complete, each with a loadable HF export
    ckpts = sorted(p.parent for p in (run / "checkpoints").glob("global_step_*/COMPLETE"))
    assert [p.name for p in ckpts] == ["global_step_4", "global_step_6"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    for p in ckpts:
        assert (p / "hf" / "config.json").exists() and (p / "hf" / "model.safetensors").exists()
        meta = json.loads((p / "meta.json").read_text())
        assert meta["version"] == int(p.name.split("_")[-1])
