"""The zmq weight stream (``protocol.weights.StreamingVersion``): real server, real sockets.

Actors that asked for the new version are sent each bucket while the learner is still gathering
the next; rank 0 holds at most ``window`` buckets; an actor that asks after the stream passed its
first bucket is held, not refused, and gets the version when it is published again; a subscriber
that stops taking bytes cannot block the learner for longer than ``stall_s``.
"""

import asyncio
import os
import signal
import threading
import time

import multiprocessing as mp

import pytest
import torch

from protocol import messages as m
from protocol.transport import ActorClient, LearnerServer
from protocol.weights import ZmqPublisher, make_receiver, tensor_bytes

BUCKET = 64 << 10


class Learner:
    """The coordinator reduced to what a weight stream asks of it: which actors are behind."""

    def __init__(self, actors=()):
        self.actors = set(actors)

    def on_request(self, peer, msg):
        if isinstance(msg, m.Register):
            return m.Welcome(actor_id=msg.actor_id, learner_version=0, max_staleness=1)
        if isinstance(msg, m.WeightsRequest):
            return None
        return m.Error(message=f"unexpected {type(msg).__name__}")

    def on_trajectory(self, traj):
        pass

    def on_tick(self, now):
        pass

    def actors_to_update(self, version):
        return set(self.actors)


def tensors(version: int, n: int = 8) -> list[tuple[str, torch.Tensor]]:
    """``n`` bf16 tensors of exactly one bucket each."""
    g = torch.Generator().manual_seed(version)
    return [(f"layer.{i}.weight", torch.randn(BUCKET // 2, generator=g).to(torch.bfloat16)) for i in range(n)]


def as_bytes(named) -> list[tuple[str, bytes]]:
    return [(name, bytes(tensor_bytes(t.contiguous()))) for name, t in named]


def fetch_until(client, actor_id: str, have: int, timeout_s: float = 60.0):
    """Ask until a version newer than ``have`` comes (as ``Actor.sync_weights`` does when told of one)."""

    async def go():
        rx = make_receiver("zmq", None, client=client, actor_id=actor_id, weights_dir=None, timeout_s=30)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = await rx.fetch(have, timeout_s=30)
            if got is not None:
                version, stream = got
                return version, await asyncio.to_thread(lambda: [(n, t.clone()) for n, t in stream])
            await asyncio.sleep(0.02)
        raise TimeoutError(f"{actor_id}: no version newer than v{have} within {timeout_s}s")

    return asyncio.run(go())


def test_buckets_reach_actors_while_the_rest_is_gathered_and_rank0_holds_a_window():
    from launcher.local import free_port

    server = LearnerServer(Learner(["actor-0", "actor-1"]), "127.0.0.1", free_port(pairs=2))
    pub = ZmqPublisher(server, BUCKET, window=2, subscribe_s=30, stall_s=30)
    clients = [ActorClient("127.0.0.1", server.port) for _ in range(2)]
    results: dict[int, tuple] = {}
    want = tensors(1)
    first_bucket_arrived = threading.Event()
    gathered_before_arrival = []

    def gather():
        """The learner's stream: it yields the last tensor only once an actor holds bucket 0."""
        for i, (name, t) in enumerate(want):
            if i == len(want) - 1:
                gathered_before_arrival.append(first_bucket_arrived.wait(30))
            yield name, t

    def actor(i):
        async def go():
            rx = make_receiver("zmq", None, client=clients[i], actor_id=f"actor-{i}", weights_dir=None, timeout_s=30)
            while True:
                got = await rx.fetch(0, timeout_s=30)
                if got is not None:
                    break
                await asyncio.sleep(0.02)
            version, stream = got

            def consume():
                out = []
                for name, t in stream:
                    out.append((name, t.clone()))
                    first_bucket_arrived.set()
                return out

            return version, await asyncio.to_thread(consume)

        results[i] = asyncio.run(go())

    threads = [threading.Thread(target=actor, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.2)  # both are asking (NoWeights, again) before the version opens
        announced = []
        pub.publish(1, gather(), announce=lambda: announced.append(time.monotonic()))
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    finally:
        for c in clients:
            c.close()
        server.close()
    assert announced and gathered_before_arrival == [True]  # bucket 0 was served before the gather ended
    for i in range(2):
        version, got = results[i]
        assert version == 1
        assert as_bytes(got) == as_bytes(want)
    stream = pub.snapshot
    assert stream.peak_held_bytes <= 2 * BUCKET  # the window, not the 8-bucket version
    assert stream.done() and stream.held_bytes() == 0


def test_an_actor_that_asks_after_the_stream_passed_is_held_and_served_by_the_republish():
    from launcher.local import free_port

    server = LearnerServer(Learner(), "127.0.0.1", free_port(pairs=2))
    pub = ZmqPublisher(server, BUCKET, window=2, subscribe_s=30, stall_s=30)
    client = ActorClient("127.0.0.1", server.port)
    want = tensors(3)
    try:
        pub.publish(3, iter(want))  # nobody is behind: streamed and released at once
        assert pub.snapshot.done() and pub.snapshot.peak_held_bytes <= 2 * BUCKET
        assert not server.weights_wanted()
        got: dict = {}
        late = threading.Thread(target=lambda: got.update(r=fetch_until(client, "late", 0)))
        late.start()
        deadline = time.monotonic() + 30
        while not server.weights_wanted():  # held at the server, not answered
            assert time.monotonic() < deadline, "the late request was never held"
            time.sleep(0.01)
        pub.publish(3, iter(want))  # what Trainer.next_batch does when it sees weights_wanted()
        late.join(60)
        assert not late.is_alive()
        version, tensors_got = got["r"]
        assert version == 3 and as_bytes(tensors_got) == as_bytes(want)
        assert not server.weights_wanted()
    finally:
        client.close()
        server.close()


def _stopped_actor(port: int, ready):
    """An actor process that subscribes to the stream and is then SIGSTOPped by the test."""
    client = ActorClient("127.0.0.1", port)

    async def go():
        rx = make_receiver("zmq", None, client=client, actor_id="actor-slow", weights_dir=None, timeout_s=120)
        while (got := await rx.fetch(0, timeout_s=120)) is None:
            await asyncio.sleep(0.02)
        ready.set()
        await asyncio.sleep(120)

    asyncio.run(go())


def test_a_subscriber_that_stops_taking_bytes_cannot_block_the_learner_beyond_stall_s():
    from launcher.local import free_port

    big = 8 << 20  # 8 MiB buckets: more than loopback TCP buffers absorb
    server = LearnerServer(Learner(["actor-slow"]), "127.0.0.1", free_port(pairs=2))
    pub = ZmqPublisher(server, big, window=2, subscribe_s=30, stall_s=2)
    ready = mp.get_context("spawn").Event()
    proc = mp.get_context("spawn").Process(target=_stopped_actor, args=(server.port, ready))
    proc.start()
    try:
        named = [(f"w{i}", torch.zeros(big // 2, dtype=torch.bfloat16)) for i in range(12)]
        first = threading.Event()

        def gather():
            for i, item in enumerate(named):
                if i == 1:
                    assert ready.wait(60), "the actor never received the first bucket"
                    os.kill(proc.pid, signal.SIGSTOP)
                    first.set()
                yield item

        pub.publish(1, gather())  # returns although the actor is stopped
        assert first.is_set()
        assert not pub.snapshot.bounded  # it gave up bounding after stall_s instead of waiting for the actor
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.join(10)
        server.close()


def test_an_actor_is_sent_the_next_bucket_only_after_it_acknowledged_the_last():
    """Credit-based flow control: a subscriber holds the bucket it applies and the one arriving."""
    from launcher.local import free_port

    server = LearnerServer(Learner(["a"]), "127.0.0.1", free_port(pairs=2))
    pub = ZmqPublisher(server, BUCKET, window=8, subscribe_s=30, stall_s=30)
    client = ActorClient("127.0.0.1", server.port)
    publisher = threading.Thread(target=pub.publish, args=(1, iter(tensors(1, n=4))))

    async def go():
        sock = client._socket()
        await client._send(sock, m.WeightsRequest(actor_id="a", have_version=0))
        got = [m.decode((await client._recv(sock, 30, "chunk 0"))[0].bytes)]
        extra = await sock.poll(500)  # nothing more comes before the acknowledgement
        await client._send(sock, m.WeightsAck(actor_id="a", version=0, chunk=0))  # another version's: ignored
        extra += await sock.poll(300)
        for i in range(4):
            await client._send(sock, m.WeightsAck(actor_id="a", version=1, chunk=i))
            got.append(m.decode((await client._recv(sock, 30, f"chunk {i + 1}"))[0].bytes))
        return got, extra

    try:
        publisher.start()
        got, extra = asyncio.run(go())
        publisher.join(30)
        assert not publisher.is_alive()
    finally:
        client.close()
        server.close()
    assert extra == 0
    assert [c.chunk for c in got] == [0, 1, 2, 3, 4]
    assert [c.num_chunks for c in got] == [0, 0, 0, 0, 5] and got[-1].tensors == []  # the end chunk carries the total
