"""The learner drops, counts and requeues trajectories older than max_staleness."""

import json

from learner.coordinator import Coordinator, DataStream
from protocol import messages as m
from tests.learner_support import learner_config, make_traj, trainer_world_1


def wire(t: m.Trajectory) -> m.Trajectory:
    """Through the real encoder/decoder, as the learner's socket delivers it."""
    return m.decode(m.encode(t))


def grant(c: Coordinator, version: int, n: int) -> list[str]:
    g = c.on_request("p", m.WorkRequest(actor_id="a0", version=version, max_groups=n))
    return [item.sample_id for item in g.items]


def complete(c: Coordinator, sample_ids: list[str], version: int, group_size: int = 4) -> None:
    for i, sid in enumerate(sample_ids):
        for chain in range(group_size):
            c.on_trajectory(wire(make_traj(sid, chain, reward=1.0, seed=100 * i + chain, version=version)))


def test_coordinator_drops_counts_and_requeues_groups_older_than_max_staleness():
    rows = [{"question": f"q{i}"} for i in range(20)]
    c = Coordinator(DataStream(rows, shuffle=False, seed=0), batch_groups=2, group_size=4, max_staleness=1, peer_timeout_s=60)
    c.on_request("p", m.Register(actor_id="a0", host="h", pid=1, engine="x"))
    old = grant(c, version=0, n=10)
    assert old == ["0:0", "0:1", "0:2", "0:3"]  # credit for versions 0 and 1: 2 batches of 2 groups
    complete(c, old[:2], version=0)
    c.advance(1)
    complete(c, old[2:], version=0)  # sampled by v0, trained at v1 at the earliest: age 1, allowed
    batch, info = c.take_batch(timeout_s=1)
    assert [sid for sid, _ in batch] == ["0:0", "0:1"] and info == {"groups_dropped_stale": 0, "groups_failed_total": 0, "groups_refused_total": 0, "groups_zero_variance_dropped": 0}
    c.advance(3)  # the learner moved on twice: "0:2"/"0:3" are now 3 versions old
    fresh = grant(c, version=3, n=2)
    complete(c, fresh, version=3)
    batch, info = c.take_batch(timeout_s=1)
    assert [sid for sid, _ in batch] == fresh
    assert info == {"groups_dropped_stale": 2, "groups_failed_total": 0, "groups_refused_total": 0, "groups_zero_variance_dropped": 0}
    assert c.counters["groups_dropped_stale"] == 2
    assert list(c.stream.requeue) == ["0:2", "0:3"]  # nothing lost: granted again next
    assert grant(c, version=3, n=2) == ["0:2", "0:3"]


def test_stale_drop_is_counted_in_the_step_metrics(tmp_path, tiny_model_dir):
    # synthetic trajectories with made-up log-probs: the engine log-prob guard reports only
    cfg = learner_config(tiny_model_dir, tmp_path, "algorithm.max_staleness=1", "data.shuffle=false", "actor_rollout_ref.rollout.max_logprob_diff=null")
    with trainer_world_1(cfg) as trainer:
        c = trainer.coordinator
        c.on_request("p", m.Register(actor_id="a0", host="h", pid=1, engine="x"))
        stale = grant(c, version=0, n=4)
        complete(c, stale, version=0)
        trainer.version = 2  # as if two steps had run on other data
        c.advance(2)
        fresh = grant(c, version=2, n=2)
        complete(c, fresh, version=2)
        trainer.total_steps = 3  # run exactly one step: v2 -> v3
        trainer.train()
        requeued = list(c.stream.requeue)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ledger = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert len(metrics) == 1
    assert metrics[0]["groups_dropped_stale"] == 4
    assert metrics[0]["staleness/hist_0"] == 1.0 and metrics[0]["staleness/max"] == 0
    assert ledger == [{"step": 2, "version": 3, "samples": sorted(fresh)}]
    assert sorted(requeued) == sorted(stale)
