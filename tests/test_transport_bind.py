"""The learner picks its own ports at bind time (no window in which another process can take them)."""

import asyncio

from learner.coordinator import Coordinator, DataStream
from protocol import messages as m
from protocol.transport import ActorClient, LearnerServer, read_endpoint_file


def test_port_zero_binds_a_free_pair_and_actors_find_it_through_the_endpoint_file(tmp_path):
    servers = []
    try:
        for i in range(3):
            c = Coordinator(DataStream([{"question": "q"}], shuffle=False, seed=0), batch_groups=1, group_size=1, max_staleness=0, peer_timeout_s=60)
            servers.append(LearnerServer(c, "127.0.0.1", 0))
            servers[-1].write_endpoint(tmp_path / f"learner{i}.json", "127.0.0.1")
        ports = {s.port for s in servers}
        assert len(ports) == 3 and all(20000 <= p < 64000 for p in ports)
        host, port = read_endpoint_file(tmp_path / "learner1.json", timeout_s=1)
        assert (host, port) == ("127.0.0.1", servers[1].port)
        client = ActorClient(host, port)
        try:
            welcome = asyncio.run(client.call(m.Register(actor_id="a0", host="h", pid=1, engine="x"), timeout_s=5))
        finally:
            client.close()
        assert isinstance(welcome, m.Welcome) and "a0" in servers[1].handler.actors
    finally:
        for s in servers:
            s.close()


def test_waiting_for_a_missing_endpoint_file_names_it(tmp_path):
    import pytest

    from protocol.transport import TransportTimeout

    with pytest.raises(TransportTimeout, match="learner.json"):
        read_endpoint_file(tmp_path / "learner.json", timeout_s=0.3)


def test_a_work_request_waits_for_the_next_version_and_is_answered_the_moment_it_is_published():
    import threading
    import time

    c = Coordinator(DataStream([{"question": f"q{i}"} for i in range(4)], shuffle=False, seed=0),
                    batch_groups=1, group_size=1, max_staleness=0, peer_timeout_s=60)
    server = LearnerServer(c, "127.0.0.1", 0, tick_s=5.0)  # a slow tick: only the wake-up can answer early
    c.notify = server.wake
    client = ActorClient("127.0.0.1", server.port)

    async def scenario():
        await client.call(m.Register(actor_id="a0", host="h", pid=1, engine="x"), timeout_s=5)
        first = await client.call(m.WorkRequest(actor_id="a0", version=0, max_groups=4, wait_s=20), timeout_s=5)
        t0 = time.monotonic()
        threading.Timer(0.5, c.advance, args=(1,)).start()  # the learner publishes v1 after 0.5 s
        second = await client.call(m.WorkRequest(actor_id="a0", version=0, max_groups=4, wait_s=20), timeout_s=30)
        return first, second, time.monotonic() - t0

    try:
        first, second, waited = asyncio.run(scenario())
    finally:
        client.close()
        server.close()
    assert [i.sample_id for i in first.items] == ["0:0"]  # credit for one group at v0
    assert second.items == [] and second.learner_version == 1  # held until v1 existed, then told at once
    assert waited < 20  # answered by the wake-up, not by the end of its wait


def _trajectory(i: int) -> m.Trajectory:
    return m.Trajectory(
        actor_id="a0", sample_id=f"s{i}", chain=0, prompt_ids=m.pack([1, 2], "int32"), response_ids=m.pack([3, i], "int32"),
        loss_mask=m.pack([1, 1], "uint8"), logprobs=m.pack([-0.5, -0.25], "float32"), versions=m.pack([0, 0], "int32"),
        reward=float(i), reward_components={"reward": float(i)}, turn_rewards=[],
        stats=m.EpisodeStats(num_turns=1, tool_calls={}, tool_errors=0, truncated=False, finish_reason="answer", gen_tokens=2,
                             gen_time_s=0.0, tool_time_s=0.0),
    )


def test_pushed_trajectories_arrive_in_order_and_a_push_with_nowhere_to_go_times_out():
    import pytest
    import zmq

    from launcher.local import free_port
    from protocol.auth import DATA
    from protocol.transport import TransportTimeout, endpoints

    port = free_port(pairs=2)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(endpoints("127.0.0.1", port)[1])
    client = ActorClient("127.0.0.1", port)
    try:
        async def push_all():
            for i in range(5):
                await client.push(_trajectory(i), timeout_s=5)

        asyncio.run(push_all())
        got = []
        for _ in range(5):
            assert pull.poll(5000)
            tag, body = pull.recv_multipart()
            assert client.mac.verify(DATA, tag, body)
            got.append(m.decode(body))
        assert [t.sample_id for t in got] == [f"s{i}" for i in range(5)] and got[3].response_ids.tolist() == [3, 3]
    finally:
        client.close()
        pull.close(0)
        ctx.term()
    nobody = ActorClient("127.0.0.1", free_port(pairs=2), hwm=1)  # no learner listens: one trajectory fills the queue
    try:
        asyncio.run(nobody.push(_trajectory(0), timeout_s=0.2))
        with pytest.raises(TransportTimeout, match="accepted no trajectory within 0s"):
            asyncio.run(nobody.push(_trajectory(1), timeout_s=0.2))
    finally:
        nobody.push_sock.setsockopt(zmq.LINGER, 0)
        nobody.close()
