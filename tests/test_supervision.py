"""`relay train` leaves no process behind: when a child dies, and on Ctrl-C."""

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from envs.tasks import arithmetic


def start_train(tmp_path, model_dir, *extra, sigint_ignored=False):
    """``relay train`` on the tiny model; ``sigint_ignored``: started as a shell's ``cmd &`` starts it,
    with SIGINT ignored (Python then installs no KeyboardInterrupt handler of its own)."""
    train, test = arithmetic.write_splits(tmp_path / "data", n_train=64, n_test=8)
    cmd = [
        sys.executable, "-m", "launcher.cli", "train", "-c", "demo",
        f"actor_rollout_ref.model.path={model_dir}", f"data.train_files=[{train}]", f"data.val_files=[{test}]",
        # 1000 steps over 50 epochs of 32: the run outlives every signal these tests send (32 steps take ~7 s)
        "trainer.total_training_steps=1000", "trainer.total_epochs=50", f"trainer.default_local_dir={tmp_path / 'run'}",
        "data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2", "agent.num_chains=2",
        "agent.max_tokens_per_turn=8", "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=-1", "trainer.n_gpus_per_node=2", "actor_rollout_ref.rollout.num_actors=2", *extra,
    ]
    if sigint_ignored:
        # exec'd through a small Python that ignores SIGINT (the ignored disposition survives exec), not a
        # preexec_fn: that forks this whole pytest process, and the fork failed with ENOMEM late in a CI run
        cmd = [sys.executable, "-c", IGNORE_SIGINT_AND_EXEC, *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


IGNORE_SIGINT_AND_EXEC = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); os.execv(sys.argv[1], sys.argv[1:])"


def wait_for_children(proc, names, timeout=240):
    """The launcher's children by role name, once they all run and training has started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            for n in names:
                if f"--actor-id {n}" in cmd or (n.startswith("learner") and "learner.main" in cmd and n not in found):
                    found.setdefault(n, p)
        if set(found) == set(names):
            return found
        time.sleep(0.5)
    raise TimeoutError(f"children {names} did not all start within {timeout}s")


def all_descendants(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_an_actor_that_keeps_dying_is_named_and_nothing_is_left_behind(tmp_path, tiny_model_dir):
    proc = start_train(tmp_path, tiny_model_dir, "trainer.max_actor_restarts=1")
    kids = wait_for_children(proc, ["actor-0", "actor-1", "learner"])
    everyone = [k for k in all_descendants(proc.pid)]
    time.sleep(3)
    kids["actor-1"].kill()
    first = kids["actor-1"].pid
    deadline = time.monotonic() + 120
    while (again := wait_for_children(proc, ["actor-1"])["actor-1"]).pid == first and time.monotonic() < deadline:
        time.sleep(0.5)  # the supervisor starts it again after its backoff
    everyone += all_descendants(proc.pid)
    time.sleep(2)
    again.kill()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "actor-1 died (killed by SIGKILL); restarting it in 1s (restart 1 of 1)" in err
    assert "actor-1 failed after 1 restart(s) (killed by SIGKILL)" in err
    time.sleep(1)
    assert not [p for p in everyone if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_sigterm_stops_every_process_with_a_message(tmp_path, tiny_model_dir):
    proc = start_train(tmp_path, tiny_model_dir)
    wait_for_children(proc, ["actor-0", "actor-1", "learner"])
    everyone = all_descendants(proc.pid)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM: stopping every process" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["failure"] == "terminated (SIGTERM)"
    time.sleep(1)
    assert not [p for p in everyone if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["foreground", "started-with-sigint-ignored"])
def test_ctrl_c_stops_every_process(tmp_path, tiny_model_dir, sigint_ignored):
    proc = start_train(tmp_path, tiny_model_dir, sigint_ignored=sigint_ignored)
    wait_for_children(proc, ["actor-0", "actor-1", "learner"])
    everyone = all_descendants(proc.pid)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    time.sleep(1)
    assert not [p for p in everyone if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
