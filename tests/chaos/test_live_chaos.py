"""A real `relay train` (2 learner ranks, 2 actors, real sockets) under attack and accident:
a flood of malformed frames, a paused actor, a killed actor. Each test asserts a number."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import zmq

from envs.tasks import arithmetic
from launcher.local import free_port
from protocol import messages as m
from protocol.auth import DATA, REQUEST, FrameMac, secret_from_env
from tests.chaos.frames import fuzz_frames


def start_train(tmp_path, model_dir, steps, *extra):
    train, test = arithmetic.write_splits(tmp_path / "data", n_train=400, n_test=8)
    run = tmp_path / "run"
    port = free_port(pairs=2)
    cmd = [
        sys.executable, "-m", "launcher.cli", "train", "-c", "demo",
        f"actor_rollout_ref.model.path={model_dir}", f"data.train_files=[{train}]", f"data.val_files=[{test}]",
        f"trainer.total_training_steps={steps}", f"trainer.default_local_dir={run}", f"transport.port={port}",
        "data.shuffle=false", "data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "agent.num_chains=2", "agent.max_tokens_per_turn=8", "actor_rollout_ref.rollout.response_length=32",
        "actor_rollout_ref.rollout.max_concurrent_episodes=4",
        "trainer.val_before_train=false", "trainer.test_freq=-1", f"trainer.save_freq={steps}", "trainer.n_gpus_per_node=2", "actor_rollout_ref.rollout.num_actors=2", *extra,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), run, port


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}")
        time.sleep(0.2)


def steps_done(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip() and '"step"' in line]


def actor_process(proc, actor_id):
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if f"--actor-id {actor_id}" in " ".join(p.cmdline()):
                return p
        except psutil.Error:
            continue
    return None


def check_ledger(run: Path, steps: int, batch: int = 2) -> list[str]:
    """No sample trained twice, none lost: every sample granted so far was trained or is pending
    in the final checkpoint's coordinator state (and never both)."""
    ledger = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    trained = [sid for rec in ledger for sid in rec["samples"]]
    assert len(trained) == len(set(trained)) == steps * batch, trained
    state = json.loads((run / "checkpoints" / f"global_step_{steps}" / "coordinator.json").read_text())
    assert state["epoch"] == 0
    granted = {f"0:{i}" for i in range(state["pos"])}
    pending = set(state["requeue"])
    assert not pending & set(trained)
    assert granted == set(trained) | pending, sorted(granted - set(trained) - pending)
    return trained


def _bad(frame: bytes) -> bool:
    try:
        m.decode(frame)
    except m.ProtocolError:
        return True
    return False


@pytest.mark.slow
def test_a_thousand_malformed_frames_mid_run_are_counted_and_training_finishes(tmp_path, tiny_model_dir):
    proc, run, port = start_train(tmp_path, tiny_model_dir, 6)
    bad = [f for f in fuzz_frames(seed=99, n=2500) if _bad(f)][:1100]
    n_data, n_control, n_unsigned = 700, 400, 100
    assert len(bad) == n_data + n_control
    mac = FrameMac(secret_from_env())
    try:
        wait_for(lambda: "learner listening" in _read(run / "logs" / "learner-0.log"), 240, "the learner to listen")
        ctx = zmq.Context()
        push, dealer = ctx.socket(zmq.PUSH), ctx.socket(zmq.DEALER)
        push.setsockopt(zmq.SNDHWM, 0)
        for s in (push, dealer):
            s.setsockopt(zmq.LINGER, 5000)
        push.connect(f"tcp://127.0.0.1:{port + 1}")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        for frame in bad[:n_data]:
            push.send_multipart([mac.tag(DATA, frame), frame])
        replies = 0
        for frame in bad[n_data:]:
            dealer.send_multipart([mac.tag(REQUEST, frame), frame])
            if dealer.poll(10_000):
                dealer.recv_multipart()
                replies += 1
        for frame in bad[:n_unsigned]:
            push.send(frame)
            dealer.send_multipart([b"\x00" * 16, frame])
        unanswered = dealer.poll(1000) == 0
        push.close()
        dealer.close()
        ctx.term()
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert replies == n_control and unanswered  # each signed bad request got an Error reply; unsigned ones nothing
    steps = steps_done(run)
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[-1]["transport/bad_messages"] == n_data + n_control
    assert steps[-1]["transport/unauthenticated"] == 2 * n_unsigned
    print(f"RESULT chaos_fuzz sent_bad={n_data + n_control} counted_bad={steps[-1]['transport/bad_messages']} "
          f"sent_unsigned={2 * n_unsigned} counted_unsigned={steps[-1]['transport/unauthenticated']}")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_an_actor_paused_past_its_peer_timeout_comes_back_and_nothing_is_trained_twice_or_lost(tmp_path, tiny_model_dir):
    steps = 80
    proc, run, _ = start_train(tmp_path, tiny_model_dir, steps, "transport.peer_timeout_s=4", "transport.heartbeat_interval_s=0.5")
    learner_log = run / "logs" / "learner-0.log"
    try:
        wait_for(lambda: len(steps_done(run)) >= 1, 300, "the first step")
        victim = actor_process(proc, "actor-1")
        victim.send_signal(signal.SIGSTOP)
        wait_for(lambda: "actor actor-1 silent" in _read(learner_log), 60, "actor-1 declared dead")
        dead_at = len(steps_done(run))
        victim.send_signal(signal.SIGCONT)
        wait_for(lambda: "actor actor-1, declared dead, is back" in _read(learner_log), 60, "actor-1 to register again")
        back_at = len(steps_done(run))
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["restarts"] == []  # it came back on its own, not by a restart
    assert "registering again" in _read(run / "logs" / "actor-1.log")
    assert summary["exit_codes"]["actor-1"] == 0 and back_at < steps, (dead_at, back_at)
    check_ledger(run, steps)
    print(f"RESULT chaos_pause steps={steps} declared_dead_at_step={dead_at} back_at_step={back_at} restarts=0")


@pytest.mark.slow
def test_a_killed_actor_is_restarted_and_the_run_completes(tmp_path, tiny_model_dir):
    proc, run, _ = start_train(tmp_path, tiny_model_dir, 6)
    try:
        wait_for(lambda: len(steps_done(run)) >= 1, 300, "the first step")
        actor_process(proc, "actor-1").kill()
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "actor-1 died (killed by SIGKILL); restarting it" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["restarts"] == [{"child": "actor-1", "cause": "killed by SIGKILL"}]
    assert summary["exit_codes"]["actor-1"] == 0
    check_ledger(run, 6)


def learner_process(proc, rank):
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "learner.main" in " ".join(p.cmdline()) and p.environ().get("RANK") == str(rank):
                return p
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_a_stalled_learner_rank_is_named_by_the_watchdog_with_the_stacks_of_the_others(tmp_path, tiny_model_dir):
    stall_s = 45  # start-up counts too: it must fit in this
    proc, run, _ = start_train(tmp_path, tiny_model_dir, 400, f"trainer.stall_timeout_s={stall_s}")
    try:
        wait_for(lambda: len(steps_done(run)) >= 1, 300, "the first step")
        victim = learner_process(proc, 1)
        victim.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=300)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == 1, err[-3000:]
    assert "STALL: no step or validation finished" in err
    assert "stuck: learner-1 (stopped" in err
    report = (run / "stall-report.txt").read_text()
    learner0 = report.split("== learner-0 (stack dump)")[1].split("\n== ")[0]
    assert "File " in learner0 and "trainer.py" in learner0  # rank 0's stack: where it waits for rank 1
    assert '"actors"' in report  # the coordinator's state
    summary = json.loads((run / "summary.json").read_text())
    assert summary["failure"].startswith("[relay] STALL")
    print(f"RESULT chaos_stall stall_timeout_s={stall_s} reported_and_stopped_after_s={elapsed:.1f}")
