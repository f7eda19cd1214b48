"""Helpers for the learner tests: an in-process, world-size-1 Trainer and hand-made trajectories."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from configs.loader import load_config
from launcher.local import free_port
from protocol import messages as m


def learner_config(model_dir: str, run_dir, *overrides: str):
    """The demo config shrunk for in-process tests: 1 rank, 2 prompts x 4 chains per step,
    no validation or checkpoints."""
    val = Path(run_dir) / "val.jsonl"
    val.parent.mkdir(parents=True, exist_ok=True)
    val.write_text('{"question": "1+1", "answer": "2"}\n')
    return load_config(
        ["demo"],
        [
            f"actor_rollout_ref.model.path={model_dir}",
            f"trainer.default_local_dir={run_dir}",
            f"data.val_files=[{val}]",
            "trainer.val_before_train=false",
            "trainer.test_freq=-1",
            "trainer.save_freq=-1",
            "trainer.n_gpus_per_node=1",
            "trainer.logger=[jsonl]",
            "trainer.total_training_steps=4",
            "data.train_batch_size=2",
            "agent.num_chains=4",
            "actor_rollout_ref.actor.ppo_mini_batch_size=1",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3",
            f"transport.port={free_port(pairs=2)}",
            *overrides,
        ],
    )


@contextlib.contextmanager
def trainer_world_1(cfg, rows=None):
    """A set-up Trainer in this process (gloo, world size 1); cleaned up on exit."""
    from learner.trainer import Trainer

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    trainer = Trainer(cfg, rows or [{"question": f"q{i}", "answer": "1"} for i in range(8)])
    try:
        trainer.setup()
        yield trainer
    finally:
        if torch.distributed.is_initialized():
            trainer.cleanup()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_traj(sample_id: str, chain: int, reward: float, seed: int, greedy: bool = False, version: int = 0) -> m.Trajectory:
    """A two-turn episode: 6 prompt tokens, 5 sampled, 3 observation, 4 sampled tokens."""
    rng = np.random.default_rng(seed)
    mask = [1] * 5 + [0] * 3 + [1] * 4
    ids = rng.integers(10, 500, size=len(mask))
    logprobs = np.where(np.array(mask) == 1, -rng.uniform(4.0, 8.0, size=len(mask)), 0.0)
    return m.Trajectory(
        actor_id="a0",
        sample_id=sample_id,
        chain=chain,
        prompt_ids=m.pack(rng.integers(10, 500, size=6), "int32"),
        response_ids=m.pack(ids, "int32"),
        loss_mask=m.pack(mask, "uint8"),
        logprobs=m.pack(logprobs, "float32"),
        versions=m.pack([version if k else -1 for k in mask], "int32"),
        reward=reward,
        reward_components={"reward": reward},
        stats=m.EpisodeStats(num_turns=2, tool_calls={"calculator": 1}),
        greedy=greedy,
    )


def make_trajs(greedy: bool = False) -> list[m.Trajectory]:
    """Two prompts x 4 chains with mixed rewards (plus one greedy rollout per prompt)."""
    rewards = {"0:0": [1.0, 0.0, 0.0, 1.0], "0:1": [0.0, 0.0, 1.0, 0.0]}
    out = [make_traj(sid, c, r, seed=10 * g + c) for g, (sid, rs) in enumerate(rewards.items()) for c, r in enumerate(rs)]
    if greedy:
        out += [make_traj("0:0", 4, 1.0, seed=90, greedy=True), make_traj("0:1", 4, 0.0, seed=91, greedy=True)]
    return out


def state(model) -> dict[str, torch.Tensor]:
    """A full, detached copy of a (world-size-1) FSDP model's parameters."""
    from learner.model import full_state_arrays

    return {k: torch.from_numpy(np.array(v)) for k, v in full_state_arrays(model)}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def run_ranks(fn, args: tuple, what: str, nprocs: int = 2, timeout_s: float = 300.0) -> None:
    """``fn(rank, *args)`` in ``nprocs`` spawned processes (torch's ``start_processes``); the test
    fails naming ``what`` when they are not done within ``timeout_s`` (they are killed), and a
    rank's exception is raised here."""
    import time

    import pytest

    ctx = torch.multiprocessing.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what} did not finish within {timeout_s:g} s")



def sync_engine_over_zmq(engine, port: int, actor_id: str, timeout_s: float = 30.0) -> None:
    """Register ``actor_id`` with the learner at ``127.0.0.1:port``, fetch its newest version over
    the zmq weight channel and load it into ``engine`` (what an actor's ``sync_weights`` does)."""
    import asyncio

    from protocol.transport import ActorClient
    from protocol.weights import make_receiver

    client = ActorClient("127.0.0.1", port)

    async def sync():
        welcome = await client.call(m.Register(actor_id=actor_id, host="localhost", pid=os.getpid(), engine=type(engine).__name__),
                                    timeout_s=timeout_s)
        rx = make_receiver("zmq", welcome, client=client, actor_id=actor_id, weights_dir=None, timeout_s=timeout_s)
        version, stream = await rx.fetch(engine.version, timeout_s=timeout_s)
        await asyncio.to_thread(engine.load_weights, stream, version)

    try:
        asyncio.run(sync())
    finally:
        client.close()
