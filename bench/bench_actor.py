"""Actor throughput: our actor loop + transport vs the raw engine, same prompts and lengths.

Ours: a real actor process (``python -m actors.main``) serves a learner-side
``LearnerServer`` + ``Coordinator`` in this process, which grants every group at
once and collects the trajectories over ZeroMQ. Timed from the first grant to
the last trajectory received (engine start-up excluded).

Baseline: the same engine class, in this process, generating for the same
prompt ids exactly as many tokens as each episode sampled (stop ids disabled,
so the lengths match), all requests submitted concurrently.

Both use one torch thread. Prints sampled tokens/s of each and the ratio, per run; with
``--repeats N`` the whole measurement (a fresh actor, a fresh raw engine) runs N times and the RESULT
line gives the median ratio with its min and max (on a shared machine single runs scatter widely).
Multi-turn episodes need a model that calls the tool: the demo's SFT warm start (``make demo``) calls
it in ~30% of episodes; one trained on tool demonstrations only gives ~2 turns per episode.
Usage: python bench/bench_actor.py [--engine hf|vllm] [--prompts 32] [--chains 4] [--model DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
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
    ap.add_argument("--repeats", type=int, default=1, help="run the whole measurement this many times")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    import torch

    torch.set_num_threads(1)
    from launcher.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="relay-bench-actor-"))
    model = Path(args.model) if args.model else build_tiny_model(work / "tiny")
    ratios = []
    for run in range(args.repeats):
        ours_tps, raw_tps, line = measure(args, work / f"run{run}", model)
        print(line, flush=True)
        ratios.append(ours_tps / raw_tps)
        print(f"RESULT actor_run engine={args.engine} run={run} ours_tok_s={ours_tps:.0f} raw_tok_s={raw_tps:.0f} "
              f"ratio={ours_tps / raw_tps:.2f}", flush=True)
    ratios.sort()
    median = ratios[len(ratios) // 2] if len(ratios) % 2 else (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2
    print(f"RESULT actor engine={args.engine} runs={len(ratios)} ratio={median:.2f} ratio_min={ratios[0]:.2f} "
          f"ratio_max={ratios[-1]:.2f} (target >= 0.95)", flush=True)
    return 0


def measure(args, work: Path, model: Path) -> tuple[float, float, str]:
    """One measurement: our actor process, then the raw engine on the same prompts and lengths."""
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
        ],
    )
    cfg_path = work / "config.yaml"
    cfg_path.write_text(dump_config(cfg))

    class Timed(Coordinator):
        first_grant = None

        def _grant(self, info, max_groups):
            g = super()._grant(info, max_groups)
            if g.items and self.first_grant is None:
                self.first_grant = time.perf_counter()
            return g

    coord = Timed(DataStream(rows, shuffle=False, seed=0), batch_groups=args.prompts, group_size=args.chains, max_staleness=0, peer_timeout_s=600)
    server = LearnerServer(coord, "127.0.0.1", port)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    actor = subprocess.Popen(
        [sys.executable, "-m", "actors.main", "--config", str(cfg_path), "--actor-id", "actor-0", "--learner", f"127.0.0.1:{port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        batch, _ = coord.take_batch(timeout_s=900)
        t_ours = time.perf_counter() - coord.first_grant
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

    engine = build_engine(cfg, str(model), seed=0)
    reqs = [(t.prompt_ids.tolist(), n) for t, n in zip(trajs, sampled)]

    async def raw():
        await engine.generate(reqs[0][0], SamplingSettings(max_tokens=2))  # warm-up, as the actor's first batch
        t0 = time.perf_counter()
        gens = await asyncio.gather(*(engine.generate(p, SamplingSettings(max_tokens=n, temperature=1.0)) for p, n in reqs))
        dt = time.perf_counter() - t0
        await engine.close()
        return sum(len(g.token_ids) for g in gens), dt

    raw_tokens, t_raw = asyncio.run(raw())
    raw_tps = raw_tokens / t_raw
    turns = sum(t.stats.num_turns for t in trajs) / len(trajs)
    line = (
        f"actor throughput [{args.engine}, {len(trajs)} episodes, {turns:.1f} turns/episode, {sum(sampled)} sampled tokens]: "
        f"ours {ours_tps:,.0f} tok/s vs raw engine {raw_tps:,.0f} tok/s -> ratio {ours_tps / raw_tps:.2f} (target >= 0.95)"
    )
    return ours_tps, raw_tps, line


if __name__ == "__main__":
    sys.exit(main())
