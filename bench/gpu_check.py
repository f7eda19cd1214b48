"""GPU check: the learner's bf16 throughput, a weight publish on the GPU, and 3 steps of relay train.

    python bench/gpu_check.py              # one GPU, torch >= 2.6 with CUDA, about 5-8 minutes; vLLM not needed
    python bench/gpu_check.py --dry-run    # the same three parts on CPU with tiny shapes (a smoke test)

1. **Learner throughput.** A Qwen3-0.6B-shaped model (random init: 28 layers,
   hidden 1024, 16/8 heads, head_dim 128, intermediate 3072, vocab 151936, tied
   embeddings) in the real ``Trainer`` (FSDP2, world size 1, bf16 mixed precision
   with fp32 master weights), one ``train_step`` on 16k tokens (8 episodes of
   2048 tokens, 2 per micro-batch, one AdamW step), timed over 3 steps after a
   warm-up; against a raw loop on the same GPU (plain transformers model, fp32
   weights under ``torch.autocast(bfloat16)``, the same micro-batches,
   ``loss.backward()``, ``torch.optim.AdamW``). Anchor: prime-rl reports 11.9k
   tokens/s for this shape on one H100.
2. **Weight publish.** From that trainer (``Trainer.publish``: the bf16 stream
   into the zmq publisher) to an HF-engine actor in another process on the same
   GPU (``fetch`` + ``load_weights``), until it serves the new version, vs a raw
   ZeroMQ transfer of the same bf16 bytes between the same processes.
3. **relay train.** ``python -m launcher.cli train -c demo`` for 3 steps (tiny
   model, 1 actor), wall time and per-step times from ``metrics.jsonl``.

Prints a human line and a ``RESULT gpu_check part=... key=value`` line per
figure, and writes them to ``--out``/gpu_check.json. The test suite never runs
this on a GPU; ``tests/test_gpu_check.py`` runs ``--dry-run``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RELAY_SECRET", os.urandom(32).hex())

QWEN3_0_6B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1_000_000.0,
)
TINY_QWEN3 = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True,
)
PRIME_RL_H100_TOK_S = 11_900

RESULTS: list[dict] = []


def report(part: str, human: str, **figures) -> None:
    print(human, flush=True)
    print(f"RESULT gpu_check part={part} " + " ".join(f"{k}={v}" for k, v in figures.items()), flush=True)
    RESULTS.append({"part": part, **figures})


def build_model_dir(out: Path, shape: dict) -> Path:
    """A random-init Qwen3 directory (bf16 safetensors) with the tiny model's tokenizer."""
    import shutil

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from launcher.tiny_model import build_tiny_model

    if (out / "config.json").exists():
        return out
    tiny = build_tiny_model(out.parent / "tiny")
    torch.manual_seed(0)
    Qwen3ForCausalLM._from_config(Qwen3Config(**shape), dtype=torch.bfloat16).save_pretrained(out)
    for f in tiny.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, out / f.name)
    return out


def trajectories(n_groups: int, chains: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0):
    import numpy as np

    from protocol import messages as m

    rng = np.random.default_rng(seed)
    out = []
    for g in range(n_groups):
        prompt = rng.integers(10, vocab, size=prompt_len)
        for c in range(chains):
            ids = rng.integers(10, vocab, size=response_len)
            out.append(m.Trajectory(
                actor_id="actor-0", sample_id=f"0:{g}", chain=c, prompt_ids=m.pack(prompt, "int32"),
                response_ids=m.pack(ids, "int32"), loss_mask=m.pack([1] * response_len, "uint8"),
                logprobs=m.pack(-rng.uniform(4.0, 8.0, size=response_len), "float32"),
                versions=m.pack([0] * response_len, "int32"), reward=float((g + c) % 2),
                reward_components={"reward": float((g + c) % 2)}, stats=m.EpisodeStats(num_turns=1, tool_calls={}),
            ))
    return out


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------- part 1


def raw_loop_tok_s(model_dir: Path, batch, device, micro_rows: int, steps: int) -> float:
    """Plain transformers + autocast(bf16) + AdamW over the same micro-batches; tokens/s."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def one_step():
        opt.zero_grad(set_to_none=True)
        for start in range(0, len(ids), micro_rows):
            sl = slice(start, start + micro_rows)
            with autocast:
                loss = model(input_ids=ids[sl], attention_mask=mask[sl], labels=ids[sl]).loss
            loss.backward()
        opt.step()

    one_step()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    sync(device)
    dt = time.perf_counter() - t0
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return float(mask.sum()) * steps / dt


def trainer_config(model_dir: Path, run_dir: Path, groups: int, chains: int, micro_rows: int, response_len: int):
    from configs.loader import load_config
    from launcher.local import free_port

    val = run_dir / "val.jsonl"
    run_dir.mkdir(parents=True, exist_ok=True)
    val.write_text('{"question": "1+1", "answer": "2"}\n')
    return load_config(["demo"], [
        f"actor_rollout_ref.model.path={model_dir}", f"trainer.default_local_dir={run_dir}", f"data.val_files=[{val}]",
        "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=-1", "trainer.n_gpus_per_node=1",
        "trainer.logger=[jsonl]", "trainer.total_training_steps=100", f"data.train_batch_size={groups}",
        f"agent.num_chains={chains}", f"actor_rollout_ref.actor.ppo_mini_batch_size={groups}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro_rows}",
        f"actor_rollout_ref.rollout.response_length={response_len}", "actor_rollout_ref.actor.fsdp_config.mixed_precision=bf16",
        "actor_rollout_ref.rollout.dtype=bf16", "actor_rollout_ref.rollout.max_logprob_diff=null",
        f"transport.port={free_port(pairs=2)}", "transport.weights=zmq",
    ])


def learner_and_publish(args, model_dir: Path, work: Path) -> None:
    import torch

    from launcher.local import free_port
    from learner.trainer import Trainer

    dry = args.dry_run
    groups, chains, micro_rows = 2, 4, 2
    prompt_len, response_len = (32, 96) if dry else (512, 1536)  # 8 x 2048 = 16,384 tokens per step
    steps = 1 if dry else 3
    cfg = trainer_config(model_dir, work / "learner", groups, chains, micro_rows, response_len)
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    trainer = Trainer(cfg, [{"question": f"q{i}", "answer": "1"} for i in range(8)])
    trainer.setup()
    try:
        vocab = trainer.model.config.vocab_size
        sb = trainer.step_batch(trajectories(groups, chains, prompt_len, response_len, vocab))
        tokens = float(sb.batch.attention_mask.sum())
        trainer.train_step(sb.batch)  # warm-up
        sync(trainer.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(sb.batch)
        sync(trainer.device)
        relay = tokens * steps / (time.perf_counter() - t0)
        raw = raw_loop_tok_s(model_dir, sb.batch, trainer.device, micro_rows, steps)
        where = torch.cuda.get_device_name() if trainer.device.type == "cuda" else "CPU (dry run)"
        report("learner", f"learner bf16 FSDP2 train_step, {int(tokens)} tokens/step on {where}: relay {relay:,.0f} tok/s vs raw "
               f"fwd+bwd+AdamW {raw:,.0f} tok/s -> ratio {relay / raw:.2f} (anchor: prime-rl {PRIME_RL_H100_TOK_S:,} tok/s on one H100)",
               tokens_per_step=int(tokens), relay_tok_s=round(relay), raw_tok_s=round(raw), ratio=round(relay / raw, 3),
               anchor_prime_rl_h100_tok_s=PRIME_RL_H100_TOK_S, device=where.replace(" ", "_"))
        publish_to_actor(trainer, model_dir, args)
    finally:
        trainer.cleanup()


# ----------------------------------------------------------------- part 2


def actor_main(model_dir: str, port: int, side_port: int, raw_port: int, device: str) -> None:
    import asyncio

    import msgspec
    import torch
    import zmq

    from actors.actor import as_tensor
    from actors.engines.hf_engine import HFEngine
    from protocol import messages as m
    from protocol.transport import ActorClient
    from protocol.weights import make_receiver

    engine = HFEngine(model_dir, device=device, dtype=torch.bfloat16)
    client = ActorClient("127.0.0.1", port)
    ctx = zmq.Context()
    side = ctx.socket(zmq.PAIR)
    side.connect(f"tcp://127.0.0.1:{side_port}")
    pull = ctx.socket(zmq.PULL)
    pull.connect(f"tcp://127.0.0.1:{raw_port}")

    async def go():
        welcome = await client.call(m.Register(actor_id="actor-gpu", host="localhost", pid=os.getpid(), engine="HFEngine"), timeout_s=300)
        rx = make_receiver("zmq", welcome, client=client, actor_id="actor-gpu", weights_dir=None, timeout_s=300)
        side.send(msgspec.msgpack.encode(["ready"]))
        while True:
            if not side.poll(600_000):
                raise TimeoutError("gpu_check actor: no command within 600s")
            cmd = msgspec.msgpack.decode(side.recv())
            if cmd[0] == "stop":
                return
            if cmd[0] == "raw":
                if not pull.poll(300_000):
                    raise TimeoutError("gpu_check actor: no raw message within 300s")
                frames = pull.recv_multipart(copy=False)
                side.send(msgspec.msgpack.encode(["done", sum(f.buffer.nbytes for f in frames)]))
                continue
            deadline = time.monotonic() + 300
            while (got := await rx.fetch(engine.version, timeout_s=300)) is None:  # asked before the stream opened
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gpu_check actor: nothing newer than v{engine.version} within 300s")
                await asyncio.sleep(0.01)
            version, stream = got
            await asyncio.to_thread(engine.load_weights, ((n, as_tensor(a)) for n, a in stream), version)
            if device == "cuda":
                torch.cuda.synchronize()
            norm = float(engine.model.model.norm.weight.detach().float().sum())
            side.send(msgspec.msgpack.encode(["done", engine.version, norm]))

    try:
        asyncio.run(go())
    finally:
        client.close()
        side.close(0)
        pull.close(0)
        ctx.term()


def publish_to_actor(trainer, model_dir: Path, args) -> None:
    import multiprocessing as mp

    import msgspec
    import torch
    import zmq
    from torch.distributed.tensor import DTensor

    from learner.model import stream_full_tensors
    from protocol.weights import tensor_bytes

    ctx = zmq.Context()
    side = ctx.socket(zmq.PAIR)
    side_port = side.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    raw_port = push.bind_to_random_port("tcp://127.0.0.1")
    device = trainer.device.type
    proc = mp.get_context("spawn").Process(target=actor_main, args=(str(model_dir), trainer.cfg.transport.port, side_port, raw_port, device))
    proc.start()

    def reply():
        deadline = time.monotonic() + 600
        while not side.poll(1000):
            if not proc.is_alive():
                raise RuntimeError(f"gpu_check actor exited with {proc.exitcode}")
            if time.monotonic() > deadline:
                raise TimeoutError("gpu_check actor did not answer within 600s")
        return msgspec.msgpack.decode(side.recv())

    try:
        assert reply()[0] == "ready"
        times, raws = [], []
        reps = 1 if args.dry_run else 3
        for rep in range(reps + 1):
            named = list(stream_full_tensors(trainer.model, torch.bfloat16))  # the same bytes, for the raw baseline
            bufs = [tensor_bytes(t) for _, t in named]
            t0 = time.perf_counter()
            side.send(msgspec.msgpack.encode(["raw"]))
            push.send_multipart(bufs, copy=False)
            assert reply()[1] == sum(b.nbytes for b in bufs)
            raw_s = time.perf_counter() - t0
            nbytes = sum(b.nbytes for b in bufs)
            del named, bufs
            sync(trainer.device)
            trainer.version += 1
            t0 = time.perf_counter()
            side.send(msgspec.msgpack.encode(["fetch"]))  # the actor asks (again) until the stream opens
            trainer.publish()  # stream the bf16 buckets to the actor while gathering, announce
            r = reply()
            dt = time.perf_counter() - t0
            assert r[1] == trainer.version, r
            norm = trainer.model.model.norm.weight.detach()
            norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # FSDP2, or a plain module at world size 1
            want = float(norm.to(torch.bfloat16).float().sum())
            assert abs(r[2] - want) < 1e-3 * max(1.0, abs(want)), (r[2], want)  # the actor serves what was trained
            if rep:
                times.append(dt)
                raws.append(raw_s)
        t, raw = statistics.median(times), statistics.median(raws)
        report("publish", f"weight publish (zmq, bf16, {nbytes / 2**20:.1f} MiB) to an HF actor on the same {device}: "
               f"{t * 1e3:.0f} ms to serving vs raw zmq {raw * 1e3:.0f} ms -> ratio {t / raw:.2f}",
               mb=round(nbytes / 2**20, 1), ms=round(t * 1e3), raw_ms=round(raw * 1e3), ratio=round(t / raw, 3), device=device)
        side.send(msgspec.msgpack.encode(["stop"]))
        proc.join(timeout=60)
    finally:
        if proc.is_alive():
            proc.kill()
        side.close(0)
        push.close(0)
        ctx.term()


# ----------------------------------------------------------------- part 3


def relay_train(args, work: Path) -> None:
    from envs.tasks import arithmetic
    from launcher.tiny_model import build_tiny_model

    steps = 1 if args.dry_run else 3
    model = build_tiny_model(work / "tiny")
    train, test = arithmetic.write_splits(work / "data", n_train=64, n_test=8)
    run = work / "relay-train"
    cmd = [
        sys.executable, "-m", "launcher.cli", "train", "-c", "demo", f"actor_rollout_ref.model.path={model}",
        f"data.train_files=[{train}]", f"data.val_files=[{test}]", f"trainer.total_training_steps={steps}",
        f"trainer.default_local_dir={run}", "trainer.n_gpus_per_node=1", "actor_rollout_ref.rollout.num_actors=1",
        "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=-1",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        report("relay_train", f"relay train failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", rc=proc.returncode, steps=0)
        return
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step_s = [m["time/step_s"] for m in metrics if "time/step_s" in m]
    report("relay_train", f"relay train: {len(step_s)} steps in {wall:.1f} s wall (start-up included), step times "
           + ", ".join(f"{s:.2f}" for s in step_s) + " s", rc=0, steps=len(step_s), wall_s=round(wall, 1),
           median_step_s=round(statistics.median(step_s), 3) if step_s else "na")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="on CPU with tiny shapes: a smoke test of the three parts")
    ap.add_argument("--out", default=None, help="directory for gpu_check.json and the runs (default: a temp dir)")
    ap.add_argument("--parts", default="learner,relay_train", help="learner (includes the publish) and/or relay_train")
    args = ap.parse_args()
    import torch

    if not args.dry_run:
        if not torch.cuda.is_available():
            print("gpu_check needs a CUDA GPU (torch.cuda.is_available() is False); use --dry-run for the CPU smoke test")
            return 2
        if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 6):
            print(f"gpu_check needs torch >= 2.6, this is {torch.__version__}")
            return 2
    work = Path(args.out or tempfile.mkdtemp(prefix="relay-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    parts = args.parts.split(",")
    if "learner" in parts:
        model_dir = build_model_dir(work / ("qwen3-tiny" if args.dry_run else "qwen3-0.6b"), TINY_QWEN3 if args.dry_run else QWEN3_0_6B)
        learner_and_publish(args, model_dir, work)
    if "relay_train" in parts:
        relay_train(args, work)
    (work / "gpu_check.json").write_text(json.dumps({"dry_run": args.dry_run, "seconds": time.perf_counter() - t0, "results": RESULTS}, indent=1))
    print(f"gpu_check done in {time.perf_counter() - t0:.0f} s; {work / 'gpu_check.json'}", flush=True)
    return 0 if all(r.get("rc", 0) == 0 for r in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
