"""The coordinator's side of checkpoints and validation, by hand (no processes)."""

import pytest

from learner.coordinator import Coordinator, DataStream
from learner.validation import validation_metrics
from protocol import messages as m
from protocol.transport import TransportTimeout


def traj(sid, chain, version, actor="a0", reward=1.0, validation=False):
    return m.Trajectory(
        actor_id=actor, sample_id=sid, chain=chain,
        prompt_ids=m.pack([1, 2], "int32"), response_ids=m.pack([5, 6], "int32"),
        loss_mask=m.pack([1, 1], "uint8"), logprobs=m.pack([-1.0, -1.0], "float32"),
        versions=m.pack([version, version], "int32"), reward=reward, reward_components={"reward": reward},
        stats=m.EpisodeStats(num_turns=1, tool_calls={"calculator": 1} if reward else {}), validation=validation,
    )


def coordinator(rows=10, shuffle=False, actors=("a0",)):
    c = Coordinator(DataStream([{"question": f"q{i}"} for i in range(rows)], shuffle=shuffle, seed=3),
                    batch_groups=2, group_size=2, max_staleness=1, peer_timeout_s=60)
    for a in actors:
        c.on_request("p", m.Register(actor_id=a, host="h", pid=1, engine="x"))
    return c


def ask(c, version, n=10, actor="a0"):
    return c.on_request("p", m.WorkRequest(actor_id=actor, version=version, max_groups=n))


def finish(c, items, version):
    for item in items:
        for k in range(item.group_size):
            c.on_trajectory(traj(item.sample_id, k, version))


def test_resume_grants_again_what_was_not_consumed_and_never_what_was():
    c = coordinator(rows=10, shuffle=True)
    g = ask(c, 0)  # 4 groups: 2 batches of credit (max_staleness 1)
    finish(c, g.items[:3], 0)  # 3 complete, 1 in flight
    batch, _ = c.take_batch(timeout_s=1)
    consumed = {sid for sid, _ in batch}
    c.advance(1)
    state = c.state_dict()
    assert state["consumed"] == 2 and state["version"] == 1
    pending = [i.sample_id for i in g.items if i.sample_id not in consumed]
    assert sorted(state["requeue"]) == sorted(pending)  # one buffered + one in flight

    resumed = coordinator(rows=10, shuffle=True)
    resumed.load_state_dict(state, consumed)
    granted = [i.sample_id for i in ask(resumed, 1, n=8).items]
    assert granted[: len(pending)] == [sid for sid in state["requeue"]]  # granted again, first
    assert not set(granted) & consumed
    # together with the consumed ones, the rest of the epoch comes exactly once
    rest = [resumed.stream.next() for _ in range(10 - len(consumed) - len(granted))]
    epoch0 = sorted([*consumed, *granted, *rest])
    assert epoch0 == sorted(f"0:{i}" for i in range(10))


def test_validation_items_go_first_to_actors_on_that_version_and_never_into_training():
    c = coordinator(actors=("a0", "a1"))
    items = [m.WorkItem(sample_id=f"val0:{i}", row={"question": "v"}, group_size=1, validation=True) for i in range(3)]
    c.advance(1)
    c.request_validation(items, version=1, per_grant=2)
    stale = ask(c, 0, actor="a1")  # serves v0: training work only
    assert stale.items and not any(i.validation for i in stale.items)
    g = ask(c, 1, n=3)
    assert [i.sample_id for i in g.items[:2]] == ["val0:0", "val0:1"] and all(i.validation for i in g.items[:2])
    assert not any(i.validation for i in g.items[2:])  # the rest of the room is training work
    g2 = ask(c, 1, n=5)
    assert [i.sample_id for i in g2.items if i.validation] == ["val0:2"]
    for k, item in enumerate(items):
        c.on_trajectory(traj(item.sample_id, 0, 1, reward=float(k == 0), validation=True))
    results = c.validation_results(timeout_s=1)
    assert [t.sample_id for t in results] == ["val0:0", "val0:1", "val0:2"]
    assert not c.complete and all(not sid.startswith("val") for sid in c.partial)
    metrics = validation_metrics(results)
    assert metrics["val/accuracy"] == pytest.approx(1 / 3) and metrics["val/n"] == 3
    assert metrics["val/tool_calls/calculator"] == pytest.approx(1 / 3)


def test_validation_wait_names_what_it_waited_for():
    c = coordinator()
    c.request_validation([m.WorkItem(sample_id="val5:0", row={}, group_size=1, validation=True)], version=5, per_grant=8)
    with pytest.raises(TransportTimeout, match="validation of v5: 0/1 done"):
        c.validation_results(timeout_s=0.2)


def test_dead_actor_gives_its_validation_items_back():
    c = coordinator()
    c.request_validation([m.WorkItem(sample_id="val0:0", row={}, group_size=1, validation=True)], version=0, per_grant=8)
    assert [i.sample_id for i in ask(c, 0).items if i.validation] == ["val0:0"]
    c.on_tick(c.actors["a0"].last_seen + 61)
    assert [i.sample_id for i in c.val_pending] == ["val0:0"]
