"""The actor loop's own Python per batch, against the engine's time for the same batch.

On one core the episode loop's Python (chat renders, tokenization, parsing, tool calls, rewards,
packing) runs between the engine's steps, so it adds to the engine's time: this is the part of
``bench/bench_actor.py``'s gap that does not depend on how noisy the machine is.

First the real loop plays ``--batches`` batches of ``--prompts`` x ``--chains`` episodes on the
transformers engine, and every generation is recorded. Then:

- *engine*: a fresh engine replays the same turns (each next turn's prompt the previous prompt plus
  what it sampled plus the episode's observation ids; stop ids off, the same lengths), all episodes of
  a batch concurrently: engine work only.
- *loop*: the real rollout loop, reward and trajectory packing (``to_trajectories``, then
  ``protocol.messages.encode`` of each, as ``ActorClient.push`` does) play the same batches again
  against an engine that answers every pending request from the record at once, after the loop has
  run to its next request: the loop's Python only, phase by phase (``start``: from the grant to every
  first request; ``turn1``: handling every first turn up to the second requests or the episode's end;
  ``turn2``...). Texts are new to the loop's caches as in a first pass (the record came from the
  engine's pass; the caches are cleared before each batch).

Prints ``RESULT actor_loop ... python_over_engine=...`` (the loop's Python / the engine's time; target
<= 0.05, which ``bench_actor.py``'s ``ratio_turns`` >= 0.95 needs) and ``bound_ratio_turns`` =
engine / (engine + loop), the best ``ratio_turns`` the actor can show with this much Python, before
transport. One torch thread.
Usage: python bench/bench_actor_loop.py [--model DIR] [--prompts 32] [--chains 4] [--tokens 48] [--batches 6]
(default model: ``runs/demo/rl/final`` when ``make demo`` has made it, else the random-init tiny model,
whose episodes are single turns.)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="HF model dir (default: runs/demo/rl/final if present, else the tiny model)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48, help="max tokens per turn")
    ap.add_argument("--batches", type=int, default=6)
    args = ap.parse_args()
    if min(args.prompts, args.chains, args.tokens, args.batches) < 1:
        ap.error("--prompts, --chains, --tokens and --batches must be >= 1")

    import torch

    torch.set_num_threads(1)
    from actors.build import build_engine, build_parts
    from configs.loader import load_config
    from envs.tasks import arithmetic

    if args.model:
        model = Path(args.model)
    elif (ROOT / "runs/demo/rl/final/config.json").exists():
        model = ROOT / "runs/demo/rl/final"
    else:
        from launcher.tiny_model import build_tiny_model

        model = build_tiny_model(Path(tempfile.mkdtemp(prefix="relay-bench-loop-")) / "tiny")
    cfg = load_config(["demo"], [f"actor_rollout_ref.model.path={model}", f"agent.num_chains={args.chains}",
                                 f"agent.max_tokens_per_turn={args.tokens}"])
    parts = build_parts(cfg, str(model))
    rows = arithmetic.make_rows(args.prompts * args.batches, seed=11)
    batches = [rows[b * args.prompts : (b + 1) * args.prompts] for b in range(args.batches)]

    record, turns = play_and_record(build_engine(cfg, str(model), seed=0), parts, batches, args.chains)
    engine_s = replay_engine(build_engine(cfg, str(model), seed=1), turns)
    loop_s, phases = replay_loop(parts, batches, args.chains, record)

    n = args.batches
    episodes = args.prompts * args.chains
    per_ep = sum(len(t) for b in turns for _, t in b) / (episodes * n)
    py_ms, eng_ms = loop_s / n * 1e3, engine_s / n * 1e3
    print(f"actor loop [{model.name}, {n} batches of {episodes} episodes, {per_ep:.1f} turns/episode]: the loop's Python "
          f"{py_ms:.1f} ms a batch ({', '.join(f'{k} {v / n * 1e3:.1f}' for k, v in phases.items())}) against the engine's "
          f"{eng_ms:.1f} ms on the same turns -> {loop_s / engine_s:.3f} of it (target <= 0.05); at best ratio_turns "
          f"{engine_s / (engine_s + loop_s):.3f} before transport", flush=True)
    print(f"RESULT actor_loop model={model.name} batches={n} episodes={episodes} turns_per_episode={per_ep:.2f} "
          f"python_ms={py_ms:.2f} engine_ms={eng_ms:.2f} python_over_engine={loop_s / engine_s:.3f} "
          f"bound_ratio_turns={engine_s / (engine_s + loop_s):.3f} "
          + " ".join(f"{k}_ms={v / n * 1e3:.2f}" for k, v in phases.items()), flush=True)
    return 0


def play_and_record(engine, parts, batches, chains):
    """Play each batch through the real loop on ``engine``; the generations per prompt (in order) of
    every batch, and each episode's ``(prompt ids, [(sampled count, observation ids), ...])``."""
    from actors.engines.base import Engine
    from actors.rollout import run_episode
    from bench.bench_actor import episode_turns

    records, turns = [], []
    for rows in batches:
        rec: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)

        class Recording(Engine):
            async def generate(self, prompt_ids, settings):
                g = await engine.generate(prompt_ids, settings)
                rec[tuple(prompt_ids)].append(g)
                return g

            def load_weights(self, *a, **k):
                raise NotImplementedError

        async def play():
            return await asyncio.gather(*(run_episode(Recording(), parts.agent, parts.tokenizer, parts.toolbox, r, parts.limits, parts.sampling)
                                          for r in rows for _ in range(chains)))

        eps = asyncio.run(play())
        records.append(rec)
        turns.append([(ep.prompt_ids, episode_turns(ep.loss_mask, ep.response_ids)) for ep in eps])
    return records, turns


def replay_engine(engine, turns) -> float:
    """Seconds the engine takes for every batch's turns (batch after batch, a batch's episodes concurrently)."""
    from actors.engines.base import SamplingSettings

    async def episode(prompt, ts):
        for n, observation in ts:
            g = await engine.generate(prompt, SamplingSettings(max_tokens=n, temperature=1.0))
            prompt = prompt + g.token_ids + observation

    async def run():
        await engine.generate(turns[0][0][0], SamplingSettings(max_tokens=2))  # warm-up
        total = 0.0
        for batch in turns:
            t0 = time.perf_counter()
            await asyncio.gather(*(episode(p, ts) for p, ts in batch))
            total += time.perf_counter() - t0
        await engine.close()
        return total

    gc.collect()
    gc.freeze()
    return asyncio.run(run())


def replay_loop(parts, batches, chains, records) -> tuple[float, dict[str, float]]:
    """Seconds of the loop's own Python for every batch, and per phase, against an engine answering
    from ``records`` at once."""
    import actors.rollout as rollout
    from actors.actor import to_trajectories
    from actors.engines.base import Engine
    from envs.rewards import run_reward
    from protocol import messages as m

    class Answering(Engine):
        """Holds every request until ``answer_all``: then each gets its prompt's next recorded generation."""

        def __init__(self, rec):
            self.rec = {k: list(v) for k, v in rec.items()}
            self.next = collections.Counter()
            self.pending: list = []

        def generate(self, prompt_ids, settings):
            fut = asyncio.get_running_loop().create_future()
            self.pending.append((tuple(prompt_ids), fut))
            return fut

        def answer_all(self) -> None:
            pending, self.pending = self.pending, []
            for key, fut in pending:
                gens = self.rec[key]
                fut.set_result(gens[self.next[key] % len(gens)])
                self.next[key] += 1

        def load_weights(self, *a, **k):
            raise NotImplementedError

    phases: dict[str, float] = collections.defaultdict(float)

    async def settle(until, what: str) -> None:
        """Let the woken episodes run until ``until()``: each yields at its next request or ends."""
        for _ in range(100_000):
            if until():
                return
            await asyncio.sleep(0)
        raise RuntimeError(f"bench_actor_loop: the episodes did not reach {what} within 100,000 loop iterations")

    async def batch(rows, rec) -> None:
        engine = Answering(rec)
        items = [m.WorkItem(sample_id=f"s{i}", row=r, group_size=chains) for i, r in enumerate(rows)]
        bodies: list[bytes] = []
        running, started = [0], [0]

        async def episode(item, chain):
            running[0] += 1
            started[0] += 1
            try:
                ep = await rollout.run_episode(engine, parts.agent, parts.tokenizer, parts.toolbox, item.row, parts.limits, parts.sampling)
                scores = await run_reward(parts.scorer.reward_fn, lambda: parts.scorer(ep, item.row), sample=item.sample_id)
                bodies.extend(m.encode(t) for t in to_trajectories("actor-0", item, chain, ep, scores))
            finally:
                running[0] -= 1

        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(episode(item, c)) for item in items for c in range(chains)]
        await settle(lambda: started[0] == len(tasks) and len(engine.pending) == running[0], "their first requests")
        phases["start"] += time.perf_counter() - t0
        turn = 0
        while engine.pending:
            turn += 1
            t1 = time.perf_counter()
            engine.answer_all()
            await asyncio.sleep(0)
            await settle(lambda: len(engine.pending) == running[0], f"their requests after turn {turn}")
            phases[f"turn{turn}"] += time.perf_counter() - t1
        await asyncio.gather(*tasks)
        assert len(bodies) == len(tasks), (len(bodies), len(tasks))

    async def run() -> float:
        total = 0.0
        for rows, rec in zip(batches, records):
            rollout.forget_texts()  # new texts, as in the engine's pass
            if hasattr(parts.agent, "forget_renders"):
                parts.agent.forget_renders()
            t0 = time.perf_counter()
            await batch(rows, rec)
            total += time.perf_counter() - t0
        return total

    gc.collect()
    gc.freeze()
    return asyncio.run(run()), dict(phases)


if __name__ == "__main__":
    sys.exit(main())
