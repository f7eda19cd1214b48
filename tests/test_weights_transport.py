"""Weight transports (``protocol/weights.py``): real sockets, files and process groups.

Each transport moves bf16 + float32 + int64 tensors (several buckets / shards,
one tensor larger than a bucket, in row pieces) from a learner-side publisher to
two receivers in separate (spawned) processes, bit-exactly; a receiver already serving the newest version gets ``None``. The
learner's stream gathered from 2 FSDP ranks equals the full state dict bit for
bit; a corrupted bucket is refused and the actor keeps serving its version.
"""

import asyncio
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import zmq

from protocol import messages as m
from protocol.transport import ActorClient, LearnerServer, TransportTimeout
from protocol.weights import (
    CollectivePublisher,
    CollectiveReceiver,
    FilesystemPublisher,
    FilesystemReceiver,
    WeightsRejected,
    make_publisher,
    make_receiver,
    tensor_bytes,
    whole,
)

CHUNK = 64 << 10  # 64 KiB: the arrays below span several chunks / shards


def sample_arrays(version: int) -> list[tuple[str, torch.Tensor]]:
    rng = np.random.default_rng(version)
    return [
        ("model.embed_tokens.weight", torch.from_numpy(rng.standard_normal((64, 256), dtype=np.float32))),  # 64 KiB
        ("model.layers.0.mlp.weight", torch.from_numpy(rng.standard_normal((100, 300), dtype=np.float32)).to(torch.bfloat16)),
        ("model.layers.0.mlp.bias", torch.from_numpy(rng.standard_normal(300, dtype=np.float32))),
        ("model.step_counts", torch.from_numpy(rng.integers(-(2**40), 2**40, size=(7, 3), dtype=np.int64))),
        ("model.layers.1.mlp.weight", torch.from_numpy(rng.standard_normal((128, 128), dtype=np.float32))),  # 64 KiB
        ("model.norm.weight", torch.full((5,), float("nan"))),  # NaN bits survive too
        ("model.layers.1.norm.weight", torch.full((3,), float("nan"), dtype=torch.bfloat16)),
    ]


def with_a_tensor_larger_than_a_bucket(version: int) -> list[tuple[str, torch.Tensor]]:
    """``sample_arrays`` plus a 200 x 256 bf16 tensor (100 KiB, over 1.5 buckets): it travels in row pieces."""
    rng = np.random.default_rng(100 + version)
    big = torch.from_numpy(rng.standard_normal((200, 256), dtype=np.float32)).to(torch.bfloat16)
    return [*sample_arrays(version)[:2], ("model.lm_head.weight", big), *sample_arrays(version)[2:]]


def nbytes(t) -> int:
    return t.numel() * t.element_size()


def assert_bit_exact(got, want) -> None:
    assert [n for n, _ in got] == [n for n, _ in want]
    for (name, a), (_, b) in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert bytes(tensor_bytes(a.contiguous())) == bytes(tensor_bytes(b.contiguous())), name


class FakeLearner:
    """The learner's side of the control socket, reduced to what a weight channel needs."""

    def __init__(self):
        self.version = 0

    def on_request(self, peer, msg):
        if isinstance(msg, m.Register):
            return m.Welcome(actor_id=msg.actor_id, learner_version=self.version, max_staleness=1)
        if isinstance(msg, m.WeightsRequest):
            return None  # the server sends the newest snapshot
        return m.Error(message=f"unexpected {type(msg).__name__}")

    def on_trajectory(self, traj):
        pass

    def on_tick(self, now):
        pass


def receive(kind: str, port: int, weights_dir: str, actor_id: str, out: str) -> None:
    """An actor process: register, fetch from v0, then ask again with the version it got."""
    client = ActorClient("127.0.0.1", port)

    async def go():
        welcome = await client.call(m.Register(actor_id=actor_id, host="localhost", pid=os.getpid(), engine="none"), timeout_s=60)
        rx = make_receiver(kind, welcome, client=client, actor_id=actor_id, weights_dir=weights_dir, timeout_s=60)
        version, stream = await rx.fetch(0, timeout_s=60)
        tensors = await asyncio.to_thread(lambda: [(n, t.clone()) for n, t in whole(stream)])  # pieces joined
        again = await rx.fetch(version, timeout_s=60)
        rx.close()
        return version, tensors, again

    try:
        version, tensors, again = asyncio.run(go())
    finally:
        client.close()
    torch.save({"version": version, "again_none": again is None, "tensors": tensors}, out)


@pytest.mark.parametrize("kind", ["zmq", "filesystem", "nccl"])
def test_transport_moves_arrays_to_two_actor_processes_bit_exactly(kind, tmp_path):
    from launcher.local import free_port

    port = free_port(pairs=2)
    handler = FakeLearner()
    server = LearnerServer(handler, "127.0.0.1", port)
    pub = make_publisher(
        kind, server=server, bucket_bytes=CHUNK, weights_dir=tmp_path / "weights", host="127.0.0.1",
        n_actors=2, backend="gloo", timeout_s=60, window=0,  # zmq: the whole version kept (actors start later)
    )
    want = with_a_tensor_larger_than_a_bucket(1)
    try:
        pub.publish(0, sample_arrays(0))  # what actors load from disk: never sent
        pub.publish(1, want)
        handler.version = 1
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=receive, args=(kind, port, str(tmp_path / "weights"), f"actor-{i}", str(tmp_path / f"a{i}.pt")))
            for i in range(2)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=180)
        alive = [p.pid for p in procs if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        assert not alive, f"receiver processes {alive} did not finish within 180s"
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        pub.close()
        server.close()
    for i in range(2):
        res = torch.load(tmp_path / f"a{i}.pt")
        assert res["version"] == 1
        assert res["again_none"]  # already serving the newest version
        assert_bit_exact(res["tensors"], want)
    if kind == "zmq":
        assert server.weights_bytes_sent == 2 * sum(nbytes(a) for _, a in want)
        assert len(pub.snapshot) >= 3  # several buckets
    if kind == "nccl":
        assert pub.rounds_sent == 1


def test_filesystem_writes_real_safetensors_and_keeps_the_last_two(tmp_path):
    from safetensors.torch import load_file

    pub = FilesystemPublisher(tmp_path, bucket_bytes=CHUNK)
    for v in range(4):
        pub.publish(v, sample_arrays(v))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v2", "v3"]
    manifest = json.loads((tmp_path / "v3" / "manifest.json").read_text())
    assert manifest["version"] == 3 and len(manifest["files"]) >= 3
    loaded = {}
    for f in manifest["files"]:
        loaded.update(load_file(tmp_path / "v3" / f["name"]))
    assert_bit_exact([(n, loaded[n]) for n, _ in sample_arrays(3)], sample_arrays(3))
    rx = FilesystemReceiver(tmp_path)
    version, got = rx.fetch_blocking(1, timeout_s=10)
    assert version == 3
    assert_bit_exact(list(got), sample_arrays(3))
    assert rx.fetch_blocking(3, timeout_s=10) is None


def test_filesystem_refuses_corrupt_or_partial_versions_and_the_engine_keeps_the_previous(tmp_path, tiny_model_dir):
    from actors.engines.hf_engine import HFEngine

    engine = HFEngine(tiny_model_dir)
    base = [(k, v.detach().clone()) for k, v in engine.model.state_dict().items() if k != "lm_head.weight"]
    pub = FilesystemPublisher(tmp_path / "w", bucket_bytes=CHUNK)
    rx = FilesystemReceiver(tmp_path / "w")

    def sync() -> None:  # what Actor.sync_weights does: fetch, then load the stream (verified shard by shard)
        got = rx.fetch_blocking(engine.version, timeout_s=10)
        if got is not None:
            engine.load_weights(got[1], got[0])

    v1 = [(n, a + 1.0) for n, a in base]
    pub.publish(1, v1)
    sync()
    assert engine.version == 1

    pub.publish(2, [(n, a + 2.0) for n, a in base])
    shard = sorted((tmp_path / "w" / "v2").glob("*.safetensors"))[-1]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x40
    shard.write_bytes(bytes(raw))
    with pytest.raises(WeightsRejected, match=r"weights v2: .* fails its xxh3_64 checksum \(corrupted\); refusing it"):
        sync()

    os.rename(tmp_path / "w" / "v2", tmp_path / "w" / "v3")  # a half-copied version: no manifest for it
    (tmp_path / "w" / "v3" / "manifest.json").unlink()
    with pytest.raises(WeightsRejected, match=r"weights v3 at .* is incomplete: no manifest.json"):
        sync()

    pub.publish(4, v1)
    shard = sorted((tmp_path / "w" / "v4").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(WeightsRejected, match=r"weights v4: .* has 100 bytes, the manifest says \d+ \(partial or truncated\)"):
        sync()

    assert engine.version == 1  # nothing of v2, v3 or v4 was applied
    state = engine.model.state_dict()
    for name, a in v1:
        assert torch.equal(state[name], a), name


def receive_versions(port: int, actor_id: str, versions: int, out: str) -> None:
    """An actor process on the nccl transport: register, then take ``versions`` versions as the
    learner publishes them (each stream consumed a tensor at a time, pieces joined)."""
    client = ActorClient("127.0.0.1", port)

    async def go():
        welcome = await client.call(m.Register(actor_id=actor_id, host="localhost", pid=os.getpid(), engine="none"), timeout_s=60)
        rx = make_receiver("nccl", welcome, client=client, actor_id=actor_id, weights_dir=None, timeout_s=60)
        have, got = 0, {}
        deadline = time.monotonic() + 120
        while len(got) < versions and time.monotonic() < deadline:
            fetched = await rx.fetch(have, timeout_s=60)
            if fetched is None:
                await asyncio.sleep(0.05)
                continue
            have, stream = fetched
            got[have] = await asyncio.to_thread(lambda: [(n, t.clone()) for n, t in whole(stream)])
        rx.close()
        return got

    try:
        got = asyncio.run(go())
    finally:
        client.close()
    torch.save(got, out)


def test_nccl_streams_each_bucket_as_it_is_gathered_or_hands_the_version_to_its_thread(tmp_path):
    """gloo: v1 is published before any actor is there: after ``subscribe_s`` the whole version goes
    to the broadcast thread and ``publish`` returns; the actors then join and get it. v2 is published
    while both actors wait: it is streamed, rank 0 holding at most ``window`` (2) buckets, not the
    version. Both arrive bit for bit."""
    from launcher.local import free_port

    port = free_port(pairs=2)
    handler = FakeLearner()
    server = LearnerServer(handler, "127.0.0.1", port)
    pub = make_publisher("nccl", server=server, bucket_bytes=CHUNK, weights_dir=None, host="127.0.0.1",
                         n_actors=2, backend="gloo", timeout_s=120, window=2, subscribe_s=0.5)
    v1, v2 = with_a_tensor_larger_than_a_bucket(1), with_a_tensor_larger_than_a_bucket(2)
    total = sum(nbytes(a) for _, a in v2)
    assert total > 4 * CHUNK  # several buckets, so a window of 2 is less than the version
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=receive_versions, args=(port, f"actor-{i}", 2, str(tmp_path / f"a{i}.pt"))) for i in range(2)]
    try:
        pub.publish(0, sample_arrays(0))
        pub.publish(1, v1)  # nobody there: returns after subscribe_s, the thread holds v1
        assert pub.rounds_streamed == 0
        for p in procs:
            p.start()
        deadline = time.monotonic() + 120
        while pub.rounds_sent < 1 and time.monotonic() < deadline:
            pub.check()
            time.sleep(0.05)
        assert pub.rounds_sent == 1 and pub.held_bytes == sum(nbytes(a) for _, a in v1)
        pub.subscribe_s = 60.0  # the actors are polling: they join at once
        pub.publish(2, v2)
        assert pub.rounds_streamed == 1 and pub.rounds_sent == 2
        assert 0 < pub.held_bytes <= 2 * CHUNK < total
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        pub.close()
        server.close()
    for i in range(2):
        got = torch.load(tmp_path / f"a{i}.pt")
        assert sorted(got) == [1, 2]
        assert_bit_exact(got[1], v1)
        assert_bit_exact(got[2], v2)


def join_and_die(port: int) -> None:
    """An nccl actor process that joins the next round, takes its first bucket and dies."""
    client = ActorClient("127.0.0.1", port)

    async def go():
        welcome = await client.call(m.Register(actor_id="actor-0", host="localhost", pid=os.getpid(), engine="none"), timeout_s=60)
        rx = make_receiver("nccl", welcome, client=client, actor_id="actor-0", weights_dir=None, timeout_s=60)
        while await rx.fetch(0, timeout_s=60) is None:
            await asyncio.sleep(0.05)
        os._exit(3)  # mid-round: the learner is still broadcasting

    asyncio.run(go())


def test_an_nccl_actor_dying_mid_round_fails_the_publish_with_the_round_named(tmp_path):
    from launcher.local import free_port

    port = free_port(pairs=2)
    server = LearnerServer(FakeLearner(), "127.0.0.1", port)
    pub = make_publisher("nccl", server=server, bucket_bytes=CHUNK, weights_dir=None, host="127.0.0.1",
                         n_actors=1, backend="gloo", timeout_s=30, window=1, subscribe_s=60)
    proc = mp.get_context("spawn").Process(target=join_and_die, args=(port,))
    try:
        pub.publish(0, sample_arrays(0))
        proc.start()
        big = [(f"model.layers.{i}.weight", torch.full((64, 256), float(i))) for i in range(40)]  # 40 buckets
        with pytest.raises(TransportTimeout, match=r"weights round 0 \(v1\): broadcast #\d+ failed or timed out"):
            pub.publish(1, big)  # raises (gloo sees the connection drop), not a hang
        proc.join(timeout=60)
        assert proc.exitcode == 3
    finally:
        if proc.is_alive():
            proc.kill()
        pub.close()
        server.close()


def test_timeouts_say_what_they_waited_for(tmp_path):
    # zmq: a learner socket that never answers
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    client = ActorClient("127.0.0.1", port)
    rx = make_receiver("zmq", m.Welcome(actor_id="a", learner_version=1, max_staleness=1), client=client, actor_id="a",
                       weights_dir=None, timeout_s=1)
    with pytest.raises(TransportTimeout, match=r"no weights from the learner at tcp://127.0.0.1:\d+ within 1s"):
        asyncio.run(rx.fetch(0, timeout_s=1))
    client.close()
    silent.close(0)
    ctx.term()

    # nccl/gloo, learner side: nobody joins the round
    pub = CollectivePublisher("127.0.0.1", n_actors=2, backend="gloo", timeout_s=1, window=0)
    pub.publish(1, sample_arrays(1))
    pub._thread.join(timeout=60)
    with pytest.raises(RuntimeError, match="weights broadcast thread failed") as e:
        pub.check()
    assert "waiting for 2 actors to join weights round 0 (v1)" in str(e.value.__cause__)
    assert "0 joined" in str(e.value.__cause__)
    pub.close()

    # nccl/gloo, actor side: the learner says v1 exists but never announces a round
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=10), wait_for_workers=False)
    store.set("latest", "1")
    rx = CollectiveReceiver(m.WeightsGroup(host="127.0.0.1", port=store.port, rank=1, world_size=2, backend="gloo"), timeout_s=10)
    with pytest.raises(TransportTimeout, match=r"waiting for weights round 0 to be announced at 127.0.0.1:\d+ \(learner is at v1, this actor serves v0\)"):
        rx.fetch_blocking(0, timeout_s=1)
    assert rx.fetch_blocking(1, timeout_s=1) is None


def test_plan_buckets_packs_small_tensors_at_aligned_offsets():
    from protocol.weights import plan_buckets

    # sizes:         10   20   100  3    50   (bucket 64 bytes)
    assert plan_buckets([10, 20, 100, 3, 50], bucket_bytes=64) == [
        ([0, 1], [0, 16], 36),  # 10 at 0, 20 at 16 (aligned)
        ([2], [0], 100),  # big: alone
        ([3], [0], 3),  # 3 + (16 + 50) > 64: a new bucket
        ([4], [0], 50),
    ]


def test_zmq_chunks_from_senders_that_predate_checksum_algo_still_verify():
    import zlib

    from protocol.transport import read_chunk

    a = np.arange(6, dtype=np.float32)
    meta = m.TensorMeta(name="a", dtype=a.dtype.str, shape=[6], nbytes=a.nbytes)
    old = m.encode(m.WeightsChunk(version=3, chunk=0, num_chunks=1, tensors=[meta], checksum=zlib.crc32(a.tobytes())))
    header, got = read_chunk([old, a.tobytes()])
    assert header.checksum_algo == "crc32" and np.array_equal(got[0][1], a)


def test_collective_group_admits_a_fixed_set_of_actors():
    pub = CollectivePublisher("127.0.0.1", n_actors=2, backend="gloo", timeout_s=5)
    try:
        a0, a1 = pub.weights_group_for("actor-0"), pub.weights_group_for("actor-1")
        assert (a0.rank, a1.rank, a0.world_size, a0.port) == (1, 2, 3, pub.port)
        assert pub.weights_group_for("actor-0") == a0  # re-registering keeps the rank
        with pytest.raises(ValueError, match="the weights group is full"):
            pub.weights_group_for("actor-2")
    finally:
        pub.close()
    with pytest.raises(m.ProtocolError, match="Welcome has no weights_group"):
        make_receiver("nccl", m.Welcome(actor_id="a", learner_version=0, max_staleness=1), client=None, actor_id="a",
                      weights_dir=None, timeout_s=1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["filesystem", "nccl"])
def test_relay_train_with_weight_transport(kind, tmp_path, tiny_model_dir):
    from envs.tasks import arithmetic

    train, test = arithmetic.write_splits(tmp_path / "data", n_train=64, n_test=8)
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "launcher.cli", "train", "-c", "demo",
        f"actor_rollout_ref.model.path={tiny_model_dir}",
        f"data.train_files=[{train}]", f"data.val_files=[{test}]",
        "trainer.total_training_steps=3", f"trainer.default_local_dir={run}",
        "trainer.n_gpus_per_node=1", "actor_rollout_ref.rollout.num_actors=2",
        "data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "agent.num_chains=4", "agent.max_tokens_per_turn=16", "actor_rollout_ref.rollout.response_length=48",
        "actor_rollout_ref.rollout.max_concurrent_episodes=8",
        "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=-1",
        f"transport.weights={kind}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]
    actors = json.loads((run / "actors.json").read_text())
    versions = set().union(*(a["versions"] for a in actors.values()))
    assert max(versions) >= 1, actors  # trajectories were sampled by published (not only initial) weights
    if kind == "filesystem":
        assert sorted(p.name for p in (run / "weights").iterdir()) == ["v2", "v3"]
    logs = "".join(p.read_text() for p in (run / "logs").glob("actor-*.log"))
    assert "now serving v" in logs


def _stream_rank(rank: int, model_dir: str, port: int, out: str) -> None:
    """One of 2 gloo ranks: shard a (perturbed) tiny model with FSDP2, gather the reference full
    state dict and the bf16 and fp32 streams; rank 0 saves all three."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from learner.model import fsdp_shard, full_state_arrays, stream_full_tensors

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # every bit pattern counts: values no bf16 rounding leaves alone
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
        model = fsdp_shard(model, torch.device("cpu"))
        ref = full_state_arrays(model)
        streams = {str(dt): list(stream_full_tensors(model, dt)) for dt in (torch.bfloat16, torch.float32)}
        if rank == 0:
            torch.save({"ref": [(n, torch.from_numpy(a)) for n, a in ref], "streams": streams}, out)
    finally:
        dist.destroy_process_group()


def test_stream_gathered_from_two_fsdp_ranks_equals_the_full_state_dict_bit_for_bit(tmp_path, tiny_model_dir):
    from launcher.local import free_port
    from tests.learner_support import run_ranks

    out = tmp_path / "stream.pt"
    run_ranks(_stream_rank, (tiny_model_dir, free_port(), str(out)), "2 FSDP ranks")
    res = torch.load(out)
    ref = res["ref"]
    assert len(ref) > 20
    assert "lm_head.weight" not in dict(ref)  # tied: sent once, as the input embedding
    for dtype in (torch.bfloat16, torch.float32):
        got = res["streams"][str(dtype)]
        want = [(n, t.to(dtype) if t.is_floating_point() else t) for n, t in ref]
        assert_bit_exact(got, want)


def test_a_corrupted_bucket_is_refused_and_the_actor_keeps_serving_its_version(tmp_path, tiny_model_dir, caplog):
    """zmq end to end: the learner's v2 has one bucket corrupted in memory after it was hashed;
    ``Actor.sync_weights`` refuses it (logged, counted), the engine serves v1 unchanged; a good v3
    is then taken."""
    import logging

    from actors.actor import Actor, ActorSettings
    from actors.engines.base import SamplingSettings
    from actors.engines.hf_engine import HFEngine
    from launcher.local import free_port

    engine = HFEngine(tiny_model_dir, seed=0)
    base = [(k, v.detach().clone()) for k, v in engine.model.state_dict().items() if k != "lm_head.weight"]
    port = free_port(pairs=2)
    handler = FakeLearner()
    server = LearnerServer(handler, "127.0.0.1", port)
    pub = make_publisher("zmq", server=server, bucket_bytes=CHUNK, weights_dir=None, host="127.0.0.1",
                         n_actors=1, backend="gloo", timeout_s=30, window=0)  # kept whole: the test corrupts it
    client = ActorClient("127.0.0.1", port)
    settings = ActorSettings(actor_id="actor-0", group_concurrency=1, sampling=SamplingSettings(max_tokens=4), limits=None,
                             weight_update_mode="between_episodes", heartbeat_interval_s=1, request_timeout_s=30,
                             startup_timeout_s=30, push_timeout_s=30)
    actor = Actor(settings, client, engine, None, None, None, None)
    actor.weights = make_receiver("zmq", None, client=client, actor_id="actor-0", weights_dir=None, timeout_s=30)
    greedy = SamplingSettings(max_tokens=8, temperature=0.0)
    try:
        v1 = [(n, t + 0.01) for n, t in base]
        pub.publish(1, v1)
        asyncio.run(actor.sync_weights())
        assert engine.version == 1
        served = asyncio.run(engine.generate([1, 5, 6], greedy))

        pub.publish(2, [(n, t + 0.02) for n, t in base])
        assert len(pub.snapshot) >= 3
        victim = pub.snapshot.buckets[len(pub.snapshot) // 2].tensors[0]
        victim.view(torch.uint8).reshape(-1)[7] ^= 0x10  # one bit flipped after hashing
        with caplog.at_level(logging.ERROR, logger="actors.actor"):
            asyncio.run(actor.sync_weights())
        assert engine.version == 1 and actor.weights_refused == 1
        assert any("refused weights v2, still serving v1" in r.message and "checksum mismatch" in r.message for r in caplog.records)
        state = engine.model.state_dict()
        assert all(torch.equal(state[n], t) for n, t in v1)  # nothing of v2 was applied
        again = asyncio.run(engine.generate([1, 5, 6], greedy))
        assert again.version == 1 and again.token_ids == served.token_ids and again.logprobs == served.logprobs

        v3 = [(n, t + 0.03) for n, t in base]
        pub.publish(3, v3)
        asyncio.run(actor.sync_weights())  # the DEALER was reset after the refused stream: the next fetch works
        assert engine.version == 3
        state = engine.model.state_dict()
        assert all(torch.equal(state[n], t) for n, t in v3)
    finally:
        client.close()
        server.close()


def test_lora_adapters_alone_reach_a_peft_hf_engine_which_then_matches_the_learner(tmp_path, tiny_model_dir):
    """lora_rank > 0 with HF actors: only the adapters are gathered and sent (zmq, the trainer's own
    server); the engine, built with the same LoRA settings, stages and swaps just them, and its
    log-probs then equal the learner's (the log-prob guard's measure, ~1e-6)."""
    from actors.engines.hf_engine import HFEngine
    from learner.model import stream_full_tensors
    from tests.learner_support import learner_config, make_trajs, sync_engine_over_zmq, trainer_world_1
    from tests.test_logprob_guard import sampled_group

    lora = ["actor_rollout_ref.model.lora_rank=4", "actor_rollout_ref.model.lora_alpha=8", "actor_rollout_ref.actor.optim.lr=5e-2"]
    cfg = learner_config(tiny_model_dir, tmp_path, *lora, "transport.weights_window=0")  # kept: the actor registers after publish
    engine = HFEngine(tiny_model_dir, seed=0, lora=(4, 8, "all-linear"))
    with trainer_world_1(cfg) as trainer:
        view = trainer.weights_for_actors
        assert view.adapters_only and "adapters only" in view.what
        trainer.train_step(trainer.step_batch(make_trajs()).batch)  # the adapters move (B != 0)
        trainer.version += 1
        trainer.publish()
        sync_engine_over_zmq(engine, cfg.transport.port, "actor-lora")
        assert engine.version == 1
        sent = [n for n, _ in view(stream_full_tensors(trainer.model, view.gather_dtype, view.keep))]
        assert sent and all(".lora_A." in n or ".lora_B." in n for n in sent)
        assert [len(s) for s in engine._standby.values()] == [len(sent)]  # only the adapters were staged
        temperature = cfg.actor_rollout_ref.rollout.temperature
        batch = trainer.step_batch(sampled_group(engine, "actor-lora", "0:0", [1, 30, 31, 32], temperature)
                                   + sampled_group(engine, "actor-lora", "0:1", [1, 40, 41], temperature))
        assert {t.versions.tolist()[0] for t in batch.trajectories} == {1}
        trainer.train_step(batch.batch)
        assert trainer.check_engines(batch)["actor/logprob_abs_diff_same_version_max"] < 1e-4


def test_a_zmq_stream_dropped_unread_gives_the_connection_back(tmp_path):
    """An engine that fails before reading the stream (it never iterates it) must not leave the
    actor's control connection locked: the next request goes through."""
    from launcher.local import free_port

    port = free_port(pairs=2)
    server = LearnerServer(FakeLearner(), "127.0.0.1", port)
    pub = make_publisher("zmq", server=server, bucket_bytes=CHUNK, weights_dir=None, host="127.0.0.1",
                         n_actors=1, backend="gloo", timeout_s=30, window=0)
    client = ActorClient("127.0.0.1", port)
    try:
        pub.publish(1, sample_arrays(1))

        async def go():
            rx = make_receiver("zmq", None, client=client, actor_id="a", weights_dir=None, timeout_s=30)
            version, stream = await rx.fetch(0, timeout_s=30)
            del stream  # dropped unread
            await asyncio.sleep(0.1)
            again = await rx.fetch(0, timeout_s=10)  # a fresh DEALER, the whole version again
            return version, await asyncio.to_thread(lambda: [(n, t.clone()) for n, t in again[1]])

        version, tensors = asyncio.run(go())
        assert version == 1
        assert_bit_exact(tensors, sample_arrays(1))
    finally:
        client.close()
        server.close()
