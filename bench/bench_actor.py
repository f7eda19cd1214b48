"""Actor throughput: our actor loop + transport vs the raw engine, same prompts and lengths.

Ours: a real actor process (``python -m actors.main``) serves a learner-side
``LearnerServer`` + ``Coordinator`` in this process, which grants every group at
once and collects the trajectories over ZeroMQ. Timed from the first grant to
the last trajectory received (engine start-up excluded).

Baseline: the engine itself, in this process (for ``hf``: ``HFEngine``, also when the actor serves it
from a process of its own, ``hf_engine_process=true``), generating for the same
prompt ids exactly as many tokens as each episode sampled (stop ids disabled,
so the lengths match), all requests submitted concurrently. On multi-turn
episodes this baseline computes less than the actor: it never forwards the
observation ids (the tool results, often more than half as many tokens as the
sampled ones) and its rows attend over shorter contexts. So a second baseline,
*turns*, replays each episode's engine work on a fresh engine: turn after turn
with the episode's per-turn lengths (stop ids disabled), each next turn's
prompt the previous prompt plus what it sampled plus the episode's own
observation ids, all episodes concurrently, each next turn asked at once (no
tool, no tokenizer, no transport). ``ratio_turns`` = ours / turns is the cost
of the actor loop and transport alone; ``ratio`` = ours / raw also counts the
observations' work against the actor.

All use one torch thread, and every timed side runs with its process's start-up heap frozen
(``gc.freeze``, as ``actors.main`` freezes the actor's): one full pass of the cyclic collector over
torch's and transformers' objects takes 150-330 ms here, and would otherwise land in a side's timed
section by chance (before, one in every actor batch; in the baselines, now and then). Prints sampled tokens/s of each and both ratios, per run; with
``--repeats N`` the whole measurement (a fresh actor, fresh raw engines) runs N times and the RESULT
line gives the median of each ratio with its min and max (on a shared machine single runs scatter widely).
Multi-turn episodes need a model that calls the tool: the demo's SFT warm start (``make demo``) calls
it in ~30% of episodes, the RL'd demo model (``runs/demo/rl/final``) in all of them (2.0 turns per
episode); one trained on tool demonstrations only gives ~2 turns per episode.
``--deepen 8`` measures the model with 8 layers, its own and identity ones (``deepen_model``: the same
logits bit for bit, so the same episodes, with each engine step the cost of that depth).
Usage: python bench/bench_actor.py [--engine hf|vllm] [--prompts 32] [--chains 4] [--model DIR] [--deepen LAYERS] [--repeats 3] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol.auth import ENV_SECRET, new_secret  # noqa: E402

os.environ.setdefault(ENV_SECRET, new_secret().hex())  # the server here and the actor it starts share one run secret


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48, help="max tokens per turn")
    ap.add_argument("--model", default=None, help="HF model dir (default: the random-init tiny model: 1-turn episodes); "
                    "a warm-started model (runs/demo/sft after make demo) gives multi-turn tool episodes")
    ap.add_argument("--deepen", type=int, default=None, metavar="LAYERS",
                    help="measure a copy of the model with this many layers, the added ones adding nothing "
                    "(launcher.tiny_model.deepen_model: the same episodes, each step the cost of that depth)")
    ap.add_argument("--repeats", type=int, default=1, help="run the whole measurement this many times")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for our actor, e.g. actor_rollout_ref.rollout.hf_engine_process=true")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.deepen is not None and args.deepen < 1:
        ap.error("--deepen must be >= 1")

    import torch

    torch.set_num_threads(1)
    from launcher.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="relay-bench-actor-"))
    model = Path(args.model) if args.model else build_tiny_model(work / "tiny")
    if args.deepen is not None:
        from launcher.tiny_model import deepen_model

        try:
            model = deepen_model(model, work / f"deep{args.deepen}", args.deepen)
        except ValueError as e:  # fewer layers than the model has
            ap.error(str(e))
    layers = json.loads((model / "config.json").read_text()).get("num_hidden_layers")
    ratios, turn_ratios = [], []
    for run in range(args.repeats):
        ours_tps, raw_tps, turns_tps, line = measure(args, work / f"run{run}", model)
        print(line, flush=True)
        ratios.append(ours_tps / raw_tps)
        turn_ratios.append(ours_tps / turns_tps)
        print(f"RESULT actor_run engine={args.engine} layers={layers} run={run} ours_tok_s={ours_tps:.0f} raw_tok_s={raw_tps:.0f} "
              f"turns_tok_s={turns_tps:.0f} ratio={ours_tps / raw_tps:.2f} ratio_turns={ours_tps / turns_tps:.2f}", flush=True)
    (r_med, r_min, r_max), (t_med, t_min, t_max) = spread(ratios), spread(turn_ratios)
    print(f"RESULT actor engine={args.engine} layers={layers} runs={len(ratios)} ratio={r_med:.2f} ratio_min={r_min:.2f} "
          f"ratio_max={r_max:.2f} ratio_turns={t_med:.2f} ratio_turns_min={t_min:.2f} ratio_turns_max={t_max:.2f} "
          f"(target >= 0.95)", flush=True)
    return 0


def spread(xs: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2), xs[0], xs[-1]


def episode_turns(loss_mask: list[int], response_ids: list[int]) -> list[tuple[int, list[int]]]:
    """An episode's turns from its response: ``(sampled tokens, observation ids after them)`` per run of
    ``loss_mask`` 1s, e.g. mask ``[1, 1, 0, 1]``, ids ``[a, b, o, c]`` -> ``[(2, [o]), (1, [])]``."""
    turns, i = [], 0
    while i < len(loss_mask):
        j = i
        while j < len(loss_mask) and loss_mask[j] == 1:
            j += 1
        k = j
        while k < len(loss_mask) and loss_mask[k] == 0:
            k += 1
        turns.append((j - i, response_ids[j:k]))
        i = k
    return turns


def measure(args, work: Path, model: Path) -> tuple[float, float, float, str]:
    """One measurement: our actor process, then the raw engine on the same prompts and lengths, then
    the raw engine replaying the same turns. Returns sampled tokens/s of each and the report line."""
    from configs.loader import dump_config, load_config
    from envs.tasks import arithmetic
    from launcher.local import free_port
    from learner.coordinator import Coordinator, DataStream
    from protocol.transport import LearnerServer

    work.mkdir(parents=True)
    rows = arithmetic.make_rows(args.prompts, seed=3)
    port = free_port(pairs=2)
    cfg = load_config(
        ["demo"],
        [
            f"actor_rollout_ref.model.path={model}",
            f"actor_rollout_ref.rollout.name={args.engine}",
            f"agent.num_chains={args.chains}",
            f"agent.max_tokens_per_turn={args.tokens}",
            f"actor_rollout_ref.rollout.max_concurrent_episodes={args.prompts * args.chains}",
            f"transport.port={port}",
            "trainer.val_before_train=false",
            *args.set,
        ],
    )
    cfg_path = work / "config.yaml"
    cfg_path.write_text(dump_config(cfg))

    class Timed(Coordinator):
        first_grant = None
        actor_pid = None
        cpu0 = 0.0

        def _grant(self, info, max_groups):
            g = super()._grant(info, max_groups)
            if g.items and self.first_grant is None:
                self.first_grant = time.perf_counter()
                self.cpu0 = cpu_tree(self.actor_pid) + cpu_s()
            return g

    coord = Timed(DataStream(rows, shuffle=False, seed=0), batch_groups=args.prompts, group_size=args.chains, max_staleness=0, peer_timeout_s=600)
    server = LearnerServer(coord, "127.0.0.1", port)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    freeze_heap()  # the server side's share of ours runs in this process
    actor = subprocess.Popen(
        [sys.executable, "-m", "actors.main", "--config", str(cfg_path), "--actor-id", "actor-0", "--learner", f"127.0.0.1:{port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    coord.actor_pid = actor.pid
    try:
        batch, _ = coord.take_batch(timeout_s=900)
        t_ours = time.perf_counter() - coord.first_grant
        cpu_ours = cpu_tree(actor.pid) + cpu_s() - coord.cpu0
    finally:
        coord.finish()
        time.sleep(1.0)
        actor.terminate()
        actor.wait(timeout=60)
        server.close()
    trajs = [t for _, g in batch for t in g]
    sampled = [int(t.loss_mask.numpy().sum()) for t in trajs]
    ours_tps = sum(sampled) / t_ours

    from actors.build import build_engine
    from actors.engines.base import SamplingSettings

    reqs = [(t.prompt_ids.tolist(), n) for t, n in zip(trajs, sampled)]
    episodes = [(t.prompt_ids.tolist(), episode_turns(t.loss_mask.tolist(), t.response_ids.tolist())) for t in trajs]

    async def raw(engine):
        await engine.generate(reqs[0][0], SamplingSettings(max_tokens=2))  # warm-up, as the actor's first batch
        t0, c0 = time.perf_counter(), time.process_time()
        gens = await asyncio.gather(*(engine.generate(p, SamplingSettings(max_tokens=n, temperature=1.0)) for p, n in reqs))
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        await engine.close()
        return sum(len(g.token_ids) for g in gens), dt, cpu

    async def replay(engine, prompt, turns):
        sampled = 0
        for n, observation in turns:
            g = await engine.generate(prompt, SamplingSettings(max_tokens=n, temperature=1.0))
            sampled += len(g.token_ids)
            prompt = prompt + g.token_ids + observation
        return sampled

    async def raw_turns(engine):
        await engine.generate(reqs[0][0], SamplingSettings(max_tokens=2))
        t0, c0 = time.perf_counter(), time.process_time()
        done = await asyncio.gather(*(replay(engine, p, turns) for p, turns in episodes))
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        await engine.close()
        return sum(done), dt, cpu

    # the engine itself: not from a process of its own, which is part of what ours measures
    cfg = load_config([str(cfg_path)], ["actor_rollout_ref.rollout.hf_engine_process=false"])
    engine = build_engine(cfg, str(model), seed=0)
    freeze_heap()
    raw_tokens, t_raw, cpu_raw = asyncio.run(raw(engine))
    raw_tps = raw_tokens / t_raw
    engine = build_engine(cfg, str(model), seed=0)
    freeze_heap()
    turns_tokens, t_turns, cpu_turns = asyncio.run(raw_turns(engine))
    turns_tps = turns_tokens / t_turns
    turns = sum(t.stats.num_turns for t in trajs) / len(trajs)
    observed = sum(len(o) for _, ts in episodes for _, o in ts)
    line = (
        f"actor throughput [{args.engine}, {len(trajs)} episodes, {turns:.1f} turns/episode, {sum(sampled)} sampled tokens, "
        f"{observed} observation tokens]: ours {ours_tps:,.0f} tok/s vs raw engine {raw_tps:,.0f} tok/s -> ratio "
        f"{ours_tps / raw_tps:.2f}; vs the raw engine on the same turns {turns_tps:,.0f} tok/s -> {ours_tps / turns_tps:.2f} "
        f"(target >= 0.95)"
    )
    if args.engine == "hf":  # the engine runs in the actor's process or its child: CPU seconds count all of each side's work
        line += (f"; CPU s ours {cpu_ours:.2f} (actor + its engine process + server), raw {cpu_raw:.2f}, turns {cpu_turns:.2f}: per sampled "
                 f"token ours/raw {(sum(sampled) / cpu_ours) / (raw_tokens / cpu_raw):.2f}, "
                 f"ours/turns {(sum(sampled) / cpu_ours) / (turns_tokens / cpu_turns):.2f}")
    return ours_tps, raw_tps, turns_tps, line


def freeze_heap() -> None:
    """Collect, then freeze everything this process holds, as ``actors.main`` does before its actor serves:
    a full pass of the cyclic collector over torch's and transformers' objects takes 150-330 ms here, so
    without this one lands in a timed section of either side by chance (a baseline that met one read low)."""
    gc.collect()
    gc.freeze()


def cpu_tree(pid: int) -> float:
    """CPU seconds of a process and its running children (the actor and its engine process)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    total = cpu_s(pid)
    for c in children:
        try:
            total += cpu_s(int(c))
        except OSError:  # exited meanwhile
            pass
    return total


def cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one by default), from /proc (10 ms resolution)."""
    with open(f"/proc/{pid or 'self'}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
