"""Weight-update latency of each transport vs a raw ZeroMQ transfer of the same bytes.

    python bench/bench_weights.py [--models tiny,qwen] [--transports zmq,filesystem,nccl] [--reps 5]

Two processes on this machine: this one plays learner rank 0 (a ``LearnerServer``
with a stand-in coordinator, and one publisher per transport from
``protocol.weights.make_publisher``); a spawned one plays the actor (an
``ActorClient``, one receiver per transport from ``make_receiver``, and a real
``actors.engines.hf_engine.HFEngine``). Per measurement the learner

1. ``publish(v, arrays)`` (zmq: chunk + crc32; filesystem: write + rename;
   nccl: hand to the broadcast thread; here the backend is gloo on CPU),
2. tells the actor ``v`` exists (a side-channel message standing in for
   ``WorkGrant.learner_version``),
3. stops the clock when the actor reports it serves ``v``: the actor ran
   ``fetch(have_version)`` then ``engine.load_weights`` (exactly
   ``Actor.sync_weights``).

The baseline, in the same run and between the same two processes: one PUSH of
a multipart message holding the same tensor buffers (zero-copy send) to a PULL
that receives all frames and acks. ``ratio`` is transport / raw (median of
``--reps``, after one warm-up each). One line per result.

Models: ``tiny`` (``launcher.tiny_model``) and ``qwen`` (random-init Qwen2,
hidden 1024, 8 layers, vocab 32000, tied embeddings: ~416 MB fp32; built once
into ``--cache``).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import msgspec  # noqa: E402
import numpy as np  # noqa: E402
import zmq  # noqa: E402

QWEN = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
)


def build_model(name: str, cache: Path) -> Path:
    if name == "tiny":
        from launcher.tiny_model import build_tiny_model

        return build_tiny_model(cache / "tiny")
    out = cache / "qwen-1024x8"
    if not (out / "config.json").exists():
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(0)
        Qwen2ForCausalLM(Qwen2Config(**QWEN)).save_pretrained(out)
    return out


class StandIn:
    """The coordinator reduced to what a weight channel needs."""

    def __init__(self):
        from protocol import messages as m

        self.m = m

    def on_request(self, peer, msg):
        m = self.m
        if isinstance(msg, m.Register):
            return m.Welcome(actor_id=msg.actor_id, learner_version=0, max_staleness=1)
        if isinstance(msg, m.WeightsRequest):
            return None
        return m.Error(message=f"unexpected {type(msg).__name__}")

    def on_trajectory(self, traj):
        pass

    def on_tick(self, now):
        pass


def actor_main(model_dir: str, port: int, side_port: int, raw_port: int, weights_dir: str, kinds: list[str], threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # as actors/main.py --threads

    from actors.actor import as_tensor
    from actors.engines.hf_engine import HFEngine
    from protocol import messages as m
    from protocol.transport import ActorClient
    from protocol.weights import make_receiver

    engine = HFEngine(model_dir)
    client = ActorClient("127.0.0.1", port)
    ctx = zmq.Context()
    side = ctx.socket(zmq.PAIR)
    side.connect(f"tcp://127.0.0.1:{side_port}")
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 0)
    pull.connect(f"tcp://127.0.0.1:{raw_port}")

    async def go():
        welcome = await client.call(m.Register(actor_id="actor-0", host="localhost", pid=os.getpid(), engine="HFEngine"), timeout_s=120)
        receivers = {
            k: make_receiver(k, welcome, client=client, actor_id="actor-0", weights_dir=weights_dir, timeout_s=300) for k in kinds
        }
        side.send(msgspec.msgpack.encode(["ready", torch.get_num_threads()]))
        while True:
            if not side.poll(600_000):
                raise TimeoutError("no command from the bench learner within 600s")
            cmd = msgspec.msgpack.decode(side.recv())
            if cmd[0] == "stop":
                return
            if cmd[0] == "raw":
                if not pull.poll(300_000):
                    raise TimeoutError("no raw multipart message within 300s")
                frames = pull.recv_multipart(copy=False)
                side.send(msgspec.msgpack.encode(["done", sum(f.buffer.nbytes for f in frames), 0.0, 0.0]))
                del frames  # after the reply, as for the transports
                continue
            kind = cmd[1]
            t0 = time.perf_counter()
            got = await receivers[kind].fetch(engine.version, timeout_s=300)
            if got is None:
                raise RuntimeError(f"{kind}: nothing newer than v{engine.version}")
            version, arrays = got
            t1 = time.perf_counter()
            engine.load_weights([(n, as_tensor(a)) for n, a in arrays], version, receivers[kind].private_buffers)
            t2 = time.perf_counter()
            side.send(msgspec.msgpack.encode(["done", engine.version, t1 - t0, t2 - t1]))
            del got, arrays  # after the reply: freeing the received buffers is not part of the update

    try:
        asyncio.run(go())
    finally:
        client.close()
        side.close(0)
        pull.close(0)
        ctx.term()


def state_arrays(model_dir: Path) -> list[tuple[str, np.ndarray]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return [(k, v.detach().numpy()) for k, v in model.state_dict().items()]


def bench_model(name: str, args) -> None:
    from launcher.local import free_port
    from protocol.transport import LearnerServer
    from protocol.weights import make_publisher

    model_dir = build_model(name, Path(args.cache))
    arrays = state_arrays(model_dir)
    nbytes = sum(a.nbytes for _, a in arrays)
    port, side_port, raw_port = free_port(pairs=2), free_port(), free_port()
    weights_dir = Path(tempfile.mkdtemp(prefix="relay-bench-weights-", dir=args.weights_dir))
    server = LearnerServer(StandIn(), "127.0.0.1", port)
    pubs = {
        k: make_publisher(k, server=server, chunk_bytes=args.chunk_mb << 20, weights_dir=weights_dir, host="127.0.0.1",
                          n_actors=1, backend="gloo", timeout_s=300)
        for k in args.transports
    }
    ctx = zmq.Context()
    side = ctx.socket(zmq.PAIR)
    side.bind(f"tcp://127.0.0.1:{side_port}")
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.bind(f"tcp://127.0.0.1:{raw_port}")
    proc = mp.get_context("spawn").Process(
        target=actor_main, args=(str(model_dir), port, side_port, raw_port, str(weights_dir), list(args.transports), args.threads)
    )
    proc.start()

    def reply() -> list:
        while not side.poll(1000):
            if not proc.is_alive():
                raise RuntimeError(f"bench actor exited with {proc.exitcode}")
        return msgspec.msgpack.decode(side.recv())

    try:
        assert reply()[0] == "ready"
        version = 0
        results: dict[str, list[tuple[float, float, float, float]]] = {}
        bufs = [memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)) for _, a in arrays]
        for rep in range(args.reps + 1):  # rep 0 warms up; interleaved so drift hits all alike
            t0 = time.perf_counter()
            push.send_multipart(bufs, copy=False)
            side.send(msgspec.msgpack.encode(["raw"]))
            r = reply()
            assert r[1] == nbytes, r
            if rep:
                results.setdefault("raw", []).append((time.perf_counter() - t0, 0.0, 0.0, 0.0))
            for kind, pub in pubs.items():
                version += 1
                t0 = time.perf_counter()
                pub.publish(version, arrays)
                t1 = time.perf_counter()
                side.send(msgspec.msgpack.encode(["fetch", kind]))
                r = reply()
                total = time.perf_counter() - t0
                assert r[1] == version, r
                if rep:
                    results.setdefault(kind, []).append((total, t1 - t0, r[2], r[3]))
        raw = statistics.median(t for t, *_ in results["raw"])
        mb = nbytes / 1e6
        print(f"{name}: {mb:.1f} MB in {len(arrays)} tensors; raw zmq PUSH/PULL {raw * 1e3:.1f} ms ({mb / 1e3 / raw:.2f} GB/s), median of {args.reps}", flush=True)
        for kind in pubs:
            rows = results[kind]
            tot = statistics.median(r[0] for r in rows)
            pub_s, fetch_s, load_s = (statistics.median(r[i] for r in rows) for i in (1, 2, 3))
            label = "nccl(gloo)" if kind == "nccl" else kind
            print(
                f"{name} {label}: update {tot * 1e3:.1f} ms = publish {pub_s * 1e3:.1f} + fetch {fetch_s * 1e3:.1f} "
                f"+ load_weights {load_s * 1e3:.1f} (+ signalling); raw {raw * 1e3:.1f} ms; ratio {tot / raw:.2f}x; "
                f"ratio excluding load_weights {(tot - load_s) / raw:.2f}x",
                flush=True,
            )
        side.send(msgspec.msgpack.encode(["stop"]))
        proc.join(timeout=60)
    finally:
        if proc.is_alive():
            proc.kill()
        for pub in pubs.values():
            pub.close()
        server.close()
        side.close(0)
        push.close(0)
        ctx.term()
        import shutil

        shutil.rmtree(weights_dir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,qwen")
    ap.add_argument("--transports", default="zmq,filesystem,nccl")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk-mb", type=int, default=64, help="transport.weights_chunk_mb")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (actors/main.py default: 1)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "relay-bench-models"))
    ap.add_argument("--weights-dir", default=None, help="parent of the filesystem transport's directory (default: $TMPDIR)")
    args = ap.parse_args()
    args.transports = [k for k in args.transports.split(",") if k]
    import torch

    torch.set_num_threads(args.threads)
    print(f"# bench_weights: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, reps {args.reps}, chunk {args.chunk_mb} MiB", flush=True)
    for name in args.models.split(","):
        bench_model(name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
