"""Coordinator: admission credits, the stale drop, and nothing lost when an actor dies."""

import pytest

from learner.coordinator import Coordinator, DataStream
from protocol import messages as m
from protocol.transport import TransportTimeout


def traj(sid, chain, version, actor="a0"):
    return m.Trajectory(
        actor_id=actor, sample_id=sid, chain=chain,
        prompt_ids=m.pack([1, 2], "int32"), response_ids=m.pack([5, 6], "int32"),
        loss_mask=m.pack([1, 1], "uint8"), logprobs=m.pack([-1.0, -1.0], "float32"),
        versions=m.pack([version, version], "int32"), reward=1.0, reward_components={"reward": 1.0},
        stats=m.EpisodeStats(num_turns=1, tool_calls={}),
    )


def coordinator(staleness, batch_groups=2, group_size=2, rows=10, timeout=60.0):
    c = Coordinator(DataStream([{"question": f"q{i}"} for i in range(rows)], shuffle=False, seed=0),
                    batch_groups=batch_groups, group_size=group_size, max_staleness=staleness, peer_timeout_s=timeout)
    c.on_request("p", m.Register(actor_id="a0", host="h", pid=1, engine="x"))
    return c


def ask(c, version, n=10):
    return c.on_request("p", m.WorkRequest(actor_id="a0", version=version, max_groups=n))


def finish(c, grant, version):
    for item in grant.items:
        for k in range(item.group_size):
            c.on_trajectory(traj(item.sample_id, k, version))


def test_synchronous_admission_grants_one_batch_per_version():
    c = coordinator(staleness=0)
    g = ask(c, 0)
    assert [i.sample_id for i in g.items] == ["0:0", "0:1"]  # exactly one batch of 2 groups
    assert ask(c, 0).items == []  # no more credit until the learner steps
    finish(c, g, 0)
    batch, info = c.take_batch(timeout_s=1)
    assert [sid for sid, _ in batch] == ["0:0", "0:1"] and info["groups_dropped_stale"] == 0
    c.advance(1)
    refused = ask(c, 0)
    assert refused.items == [] and "update weights" in refused.reason
    assert len(ask(c, 1).items) == 2


def test_staleness_one_admits_two_batches_ahead():
    c = coordinator(staleness=1)
    assert len(ask(c, 0).items) + len(ask(c, 0).items) == 4  # (0 + 1 + 1) * 2 groups, a batch per request
    assert ask(c, 0).items == []


def test_stale_group_is_dropped_counted_and_requeued():
    c = coordinator(staleness=1)
    g = ask(c, 0, n=1)
    c.advance(2)  # the learner moved on by two versions meanwhile
    finish(c, g, 0)
    fresh = ask(c, 2, n=2)
    finish(c, fresh, 2)
    batch, info = c.take_batch(timeout_s=1)
    assert info["groups_dropped_stale"] == 1 and c.counters["groups_dropped_stale"] == 1
    assert "0:0" not in [sid for sid, _ in batch]
    assert c.stream.next() == "0:0"  # the dropped sample comes back, nothing is lost


def test_dead_actor_work_is_requeued():
    c = coordinator(staleness=0, timeout=5.0)
    g = ask(c, 0)
    c.on_tick(c.actors["a0"].last_seen + 6.0)
    assert "a0" in c.dead_actors and not c.outstanding
    assert [c.stream.next(), c.stream.next()] == [i.sample_id for i in g.items]


def test_take_batch_timeout_says_what_it_waited_for_and_loses_nothing():
    c = coordinator(staleness=0)
    g = ask(c, 0)
    finish(c, m.WorkGrant(items=g.items[:1], learner_version=0), 0)
    with pytest.raises(TransportTimeout, match="2 trajectory groups.*have 1 complete, 1 in flight"):
        c.take_batch(timeout_s=0.2)
    assert len(c.complete) == 1 and c.consumed == 0


def test_unexpected_trajectory_is_counted_not_trained():
    c = coordinator(staleness=0)
    c.on_trajectory(traj("9:9", 0, 0))
    assert c.counters["trajectories_unexpected"] == 1 and not c.complete


def test_unregistered_actor_gets_an_error_reply():
    c = coordinator(staleness=0)
    reply = c.on_request("p", m.WorkRequest(actor_id="ghost", version=0, max_groups=1))
    assert isinstance(reply, m.Error) and "register first" in reply.message


def test_no_work_until_min_actors_registered_then_fair_shares():
    c = Coordinator(DataStream([{"question": f"q{i}"} for i in range(10)], shuffle=False, seed=0),
                    batch_groups=4, group_size=2, max_staleness=0, peer_timeout_s=60, min_actors=2)
    c.on_request("p", m.Register(actor_id="a0", host="h", pid=1, engine="x"))
    early = ask(c, 0)
    assert early.items == [] and "waiting for 2 actors (1 registered)" in early.reason
    c.on_request("p", m.Register(actor_id="a1", host="h", pid=2, engine="x"))
    assert len(ask(c, 0).items) == 2  # a0 holds its share of the batch ...
    assert ask(c, 0).items == []  # ... and no more, however often it asks
    second = c.on_request("p", m.WorkRequest(actor_id="a1", version=0, max_groups=10))
    assert len(second.items) == 2  # a1 gets the other half


def test_a_fast_actor_does_not_take_a_slow_actors_share_of_a_version():
    # max_staleness=0: one batch per version, so each of two actors rolls out half of every batch.
    # A fast actor that finished its half before the other asked gets nothing more until the
    # learner steps (it once took the whole batch and a slow-loading actor never got work).
    c = Coordinator(DataStream([{"question": f"q{i}"} for i in range(20)], shuffle=False, seed=0),
                    batch_groups=4, group_size=2, max_staleness=0, peer_timeout_s=60)
    for aid in ("a0", "a1"):
        c.on_request("p", m.Register(actor_id=aid, host="h", pid=1, engine="x"))
    for version in (0, 1):
        fast = ask(c, version)
        assert len(fast.items) == 2
        finish(c, fast, version)
        assert ask(c, version).items == []  # its half is waiting for the learner: still its share
        slow = c.on_request("p", m.WorkRequest(actor_id="a1", version=version, max_groups=10))
        assert len(slow.items) == 2
        for item in slow.items:
            for k in range(item.group_size):
                c.on_trajectory(traj(item.sample_id, k, version, actor="a1"))
        batch, _ = c.take_batch(timeout_s=1)
        assert sorted(g[0].actor_id for _, g in batch) == ["a0", "a0", "a1", "a1"]
        c.advance(version + 1)


def test_work_an_actor_cannot_roll_out_is_dropped_counted_and_never_granted_again():
    c = coordinator(staleness=0)
    g = ask(c, 0)
    bad = g.items[0].sample_id
    reply = c.on_request("p", m.WorkFailed(actor_id="a0", sample_id=bad, reason="prompt of 600 tokens leaves no room"))
    assert isinstance(reply, m.HeartbeatAck)
    assert c.counters["groups_failed"] == 1 and bad not in c.outstanding
    assert c.failed_samples == [(bad, "prompt of 600 tokens leaves no room")]
    assert [i.sample_id for i in ask(c, 0).items] == ["0:2"]  # the batch fills from new samples
    finish(c, m.WorkGrant(items=[g.items[1], m.WorkItem(sample_id="0:2", row={}, group_size=2)], learner_version=0), 0)
    batch, info = c.take_batch(timeout_s=1)
    assert [sid for sid, _ in batch] == ["0:1", "0:2"] and info["groups_failed_total"] == 1


def test_server_holds_registrations_until_the_learner_is_ready():
    import asyncio

    from launcher.local import free_port
    from protocol.transport import ActorClient, LearnerServer

    c = Coordinator(DataStream([{"question": "q"}], shuffle=False, seed=0), batch_groups=1, group_size=1, max_staleness=0, peer_timeout_s=60)
    port = free_port(pairs=2)
    server = LearnerServer(c, "127.0.0.1", port, ready=False)
    client = ActorClient("127.0.0.1", port)

    async def register():
        return await client.call(m.Register(actor_id="a0", host="h", pid=1, engine="x"), timeout_s=5)

    async def scenario():
        task = asyncio.ensure_future(register())
        await asyncio.sleep(0.5)
        assert not task.done() and "a0" not in c.actors  # held, not answered
        server.mark_ready()
        return await task

    try:
        welcome = asyncio.run(scenario())
        assert isinstance(welcome, m.Welcome) and "a0" in c.actors
    finally:
        client.close()
        server.close()


def scored(sid, chain, reward, actor="a0", version=0):
    import msgspec

    return msgspec.structs.replace(traj(sid, chain, version, actor), reward=reward, reward_components={"reward": reward})


def test_dynamic_sampling_drops_every_zero_variance_group_and_still_fills_the_batch():
    from configs.schema import FilterGroupsConfig

    c = coordinator(staleness=0, batch_groups=2, group_size=2, rows=20)
    c.filter_groups = FilterGroupsConfig(enable=True, max_num_gen_batches=0)
    rewards = {0: (1, 1), 1: (0, 0), 2: (0, 1), 3: (1, 1), 4: (0, 0), 5: (1, 0)}  # by row: 2 and 5 carry signal
    for _ in range(6):
        for item in ask(c, 0, n=1).items:  # each zero-variance drop frees credit for one more prompt
            for chain, r in enumerate(rewards[int(item.sample_id.split(":")[1])]):
                c.on_trajectory(scored(item.sample_id, chain, float(r)))
    batch, info = c.take_batch(timeout_s=1)
    assert [sid for sid, _ in batch] == ["0:2", "0:5"]
    assert info["groups_zero_variance_dropped"] == 4 and c.consumed == 2
    assert ask(c, 0).items == []  # the batch is full: no credit left at v0


def test_dynamic_sampling_cap_trains_on_what_arrives():
    from configs.schema import FilterGroupsConfig

    c = coordinator(staleness=0, batch_groups=1, group_size=2, rows=20)
    c.filter_groups = FilterGroupsConfig(enable=True, max_num_gen_batches=2)  # at most 2 drops per step
    for _ in range(3):
        item = ask(c, 0, n=1).items[0]
        for chain in range(2):
            c.on_trajectory(scored(item.sample_id, chain, 1.0))
    batch, info = c.take_batch(timeout_s=1)
    assert [sid for sid, _ in batch] == ["0:2"] and info["groups_zero_variance_dropped"] == 2


def test_a_group_with_a_misaligned_chain_is_requeued_whole_then_dropped_after_its_cap():
    import msgspec

    c = coordinator(staleness=0, batch_groups=1, group_size=2, rows=5)
    c.max_group_refusals = 1
    bad = msgspec.structs.replace(traj("x", 1, 0), logprobs=m.pack([-1.0, -1.0], "float32"), loss_mask=m.pack([1, 0], "uint8"),
                                  versions=m.pack([0, 0], "int32"))  # an observation token with a version and a log-prob
    for attempt in range(2):
        item = ask(c, 0, n=1).items[0]
        assert item.sample_id == "0:0"  # the refused group comes back first
        c.on_trajectory(traj(item.sample_id, 0, 0))
        c.on_trajectory(msgspec.structs.replace(bad, sample_id=item.sample_id))
        assert not c.complete and c.counters["groups_refused"] == attempt + 1
    assert c.failed_samples and c.failed_samples[0][0] == "0:0"
    assert ask(c, 0, n=1).items[0].sample_id == "0:1"  # dropped after its cap, never granted again


def test_validation_waits_for_the_actors_to_register_first():
    import threading

    c = Coordinator(DataStream([{"question": "q"}], shuffle=False, seed=0), batch_groups=1, group_size=1,
                    max_staleness=0, peer_timeout_s=60, min_actors=2)
    c.on_request("p", m.Register(actor_id="a0", host="h", pid=1, engine="x"))
    threading.Timer(0.3, c.on_request, args=("p", m.Register(actor_id="a1", host="h", pid=2, engine="x"))).start()
    assert c.wait_for_actors(timeout_s=10) >= 0.25
    with pytest.raises(TransportTimeout, match="3 actors to register"):
        c.min_actors = 3
        c.wait_for_actors(timeout_s=0.2)
