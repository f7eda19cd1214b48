"""Only the job's own processes may speak: a peer without the run secret gets nothing; work results
are accepted only from the actor that holds the grant; one bad message never stops the server."""

import asyncio
import time

import numpy as np
import pytest
import zmq

from launcher.local import free_port
from learner.coordinator import Coordinator, DataStream
from protocol import messages as m
from protocol.auth import AuthError, new_secret, read_secret_file, require_secret, write_secret_file
from protocol.transport import ActorClient, LearnerServer, TransportTimeout, make_snapshot
from tests.chaos.frames import fuzz_frames, real_messages


def coordinator(rows=4, group_size=1):
    return Coordinator(DataStream([{"question": f"q{i}"} for i in range(rows)], shuffle=False, seed=0),
                       batch_groups=1, group_size=group_size, max_staleness=0, peer_timeout_s=60, vocab_size=1000)


@pytest.fixture
def learner():
    secret = new_secret()
    c = coordinator()
    port = free_port(pairs=2)
    server = LearnerServer(c, "127.0.0.1", port, secret=secret, tick_s=0.05)
    server.publish(make_snapshot(1, [("w", np.arange(1000, dtype=np.float32))], chunk_bytes=1 << 20))
    yield c, server, port, secret
    server.close()


def test_a_peer_without_the_secret_gets_no_reply_and_no_weights(learner):
    c, server, port, _ = learner
    intruder = ActorClient("127.0.0.1", port, secret=new_secret())

    async def attempts():
        with pytest.raises(TransportTimeout):
            await intruder.call(m.Register(actor_id="evil", host="h", pid=1, engine="x"), timeout_s=1.5)
        with pytest.raises(TransportTimeout):
            await intruder.fetch_weights("evil", -1, timeout_s=1.5)

    try:
        asyncio.run(attempts())
    finally:
        intruder.close()
    assert c.actors == {} and server.weights_bytes_sent == 0
    assert server.unauthenticated == 2 and server.bad_messages == 0


def test_raw_unsigned_frames_on_both_sockets_are_dropped_unanswered(learner):
    c, server, port, _ = learner
    ctx = zmq.Context()
    dealer, push = ctx.socket(zmq.DEALER), ctx.socket(zmq.PUSH)
    for s in (dealer, push):
        s.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    push.connect(f"tcp://127.0.0.1:{port + 1}")
    try:
        register = m.encode(m.Register(actor_id="evil", host="h", pid=1, engine="x"))
        dealer.send(register)  # no tag at all
        dealer.send_multipart([b"\x00" * 16, register])  # a wrong tag
        push.send(m.encode(real_messages()[-1]))
        push.send_multipart([b"\x01" * 16, m.encode(real_messages()[-1])])
        assert dealer.poll(1500) == 0  # nothing comes back
        deadline = time.monotonic() + 5
        while server.unauthenticated < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.unauthenticated == 4 and c.actors == {} and not c.partial
    finally:
        dealer.close(0)
        push.close(0)
        ctx.term()


def test_the_real_secret_works_and_bad_signed_frames_are_counted_not_fatal(learner):
    c, server, port, secret = learner
    client = ActorClient("127.0.0.1", port, secret=secret)
    bad = [f for f in fuzz_frames(seed=7, n=600) if _is_bad(f)][:300]

    async def scenario():
        welcome = await client.call(m.Register(actor_id="a0", host="h", pid=1, engine="x"), timeout_s=5)
        sock = client._socket()
        for frame in bad:  # signed with the run secret: they reach the decoder
            await sock.send_multipart([client.mac.tag(b"relay/request", frame), frame])
            await client._recv(sock, 5, "error reply")
        for frame in bad:
            await client.push_sock.send_multipart([client.mac.tag(b"relay/data", frame), frame])
        got = await client.fetch_weights("a0", -1, timeout_s=5)
        return welcome, got

    try:
        welcome, got = asyncio.run(scenario())
    finally:
        client.close()
    assert isinstance(welcome, m.Welcome) and got[0] == 1 and np.array_equal(got[1][0][1], np.arange(1000, dtype=np.float32))
    deadline = time.monotonic() + 5
    while server.bad_messages < 2 * len(bad) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(bad) == 300 and server.bad_messages == 600 and server.error is None


def _is_bad(frame: bytes) -> bool:
    try:
        m.decode(frame)
    except m.ProtocolError:
        return True
    return False


def test_results_are_accepted_only_from_the_actor_holding_the_grant():
    from tests.test_coordinator import traj

    c = coordinator(group_size=2)
    for a in ("a0", "a1"):
        c.on_request("p", m.Register(actor_id=a, host="h", pid=1, engine="x"))
    grant = c.on_request("p", m.WorkRequest(actor_id="a0", version=0, max_groups=1))
    sid = grant.items[0].sample_id
    c.on_request("p", m.WorkFailed(actor_id="a1", sample_id=sid, reason="spite"))
    assert c.outstanding == {sid: "a0"} and c.counters["work_failed_not_owner"] == 1
    c.on_trajectory(traj(sid, 0, 0, actor="a1"))
    assert sid not in c.partial and c.counters["trajectories_not_owner"] == 1
    c.on_trajectory(traj(sid, 0, 0, actor="a0"))
    c.on_trajectory(traj(sid, 0, 0, actor="a0"))  # the same chain twice
    assert len(c.partial[sid]) == 1 and c.counters["trajectories_duplicate"] == 1
    c.on_trajectory(traj(sid, 1, 0, actor="a0"))
    assert [s for s, _ in c.complete] == [sid]


def test_an_actor_declared_dead_gets_unregistered_then_registers_again_and_its_work_is_requeued():
    c = coordinator()
    c.on_request("p", m.Register(actor_id="a0", host="h", pid=1, engine="x"))
    sid = c.on_request("p", m.WorkRequest(actor_id="a0", version=0, max_groups=1)).items[0].sample_id
    c.on_tick(time.monotonic() + 61)  # silent past peer_timeout_s
    reply = c.on_request("p", m.Heartbeat(actor_id="a0", version=0, in_flight=1))
    assert isinstance(reply, m.Error) and reply.code == "unregistered"
    assert list(c.stream.requeue) == [sid]
    assert isinstance(c.on_request("p", m.Register(actor_id="a0", host="h", pid=1, engine="x")), m.Welcome)
    assert [i.sample_id for i in c.on_request("p", m.WorkRequest(actor_id="a0", version=0, max_groups=1)).items] == [sid]


def test_secret_files_must_be_private(tmp_path):
    key = new_secret()
    path = write_secret_file(tmp_path / "relay.secret", key)
    assert (path.stat().st_mode & 0o777) == 0o600 and read_secret_file(path) == key
    path.chmod(0o644)
    with pytest.raises(AuthError, match="readable by others"):
        read_secret_file(path)
    with pytest.raises(AuthError, match="32 bytes"):
        require_secret(b"short")
    (tmp_path / "bad.secret").write_text("not hex")
    (tmp_path / "bad.secret").chmod(0o600)
    with pytest.raises(AuthError, match="hex digits"):
        read_secret_file(tmp_path / "bad.secret")


def test_the_launcher_keeps_one_secret_per_run_dir_and_actors_find_it(tmp_path, monkeypatch):
    import os

    from launcher.commands import _run_secret

    monkeypatch.delenv("RELAY_SECRET", raising=False)
    monkeypatch.delenv("RELAY_SECRET_FILE", raising=False)
    assert "start it first" in _run_secret(tmp_path, create=False, wait_s=0.3)  # an actor before its learner
    assert _run_secret(tmp_path, create=True) is None  # the learner makes it
    path = tmp_path / "relay.secret"
    key = read_secret_file(path)
    assert os.environ["RELAY_SECRET_FILE"] == str(path)
    monkeypatch.delenv("RELAY_SECRET_FILE")
    assert _run_secret(tmp_path, create=True) is None and read_secret_file(path) == key  # a resumed run keeps it
    monkeypatch.delenv("RELAY_SECRET_FILE")
    assert _run_secret(tmp_path, create=False) is None and os.environ["RELAY_SECRET_FILE"] == str(path)
    monkeypatch.delenv("RELAY_SECRET_FILE")
    path.chmod(0o644)
    assert "readable by others" in _run_secret(tmp_path, create=False)
