"""``python -m actors.main``: one actor process (the launcher starts these)."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import gc
import logging
import signal


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run one Relay actor.")
    ap.add_argument("--config", required=True, help="resolved config YAML written by the launcher")
    ap.add_argument("--actor-id", required=True)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--learner", help="HOST:PORT of the learner's control socket")
    where.add_argument("--learner-file", help="a file the learner writes its address to (local runs: the learner picks its ports)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the launcher's stall watchdog asks for our stacks
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.actor_id} %(levelname)s %(message)s")

    gc.disable()  # during start-up: see the freeze below
    import torch

    from actors.actor import Actor, ActorSettings
    from actors.build import build_engine, build_parts
    from configs.loader import load_config
    from protocol.transport import ActorClient

    torch.set_num_threads(args.threads)
    cfg = load_config([args.config])
    model_path = cfg.actor_rollout_ref.model.path
    index = int(args.actor_id.rsplit("-", 1)[-1]) if args.actor_id.rsplit("-", 1)[-1].isdigit() else 0
    # the engine is built while the learner starts (a local run starts both at once), not after
    parts = build_parts(cfg, model_path)
    engine = build_engine(cfg, model_path, seed=cfg.trainer.seed * 1000 + index)
    if args.learner_file:
        from protocol.transport import read_endpoint_file

        host, port = read_endpoint_file(args.learner_file, cfg.transport.recv_timeout_s)
    else:
        host, port = args.learner.rsplit(":", 1)
    rollout, t = cfg.actor_rollout_ref.rollout, cfg.transport
    settings = ActorSettings(
        actor_id=args.actor_id,
        group_concurrency=max(1, rollout.max_concurrent_episodes // cfg.agent.num_chains),
        sampling=parts.sampling,
        limits=parts.limits,
        weight_update_mode=rollout.weight_update_mode,
        heartbeat_interval_s=t.heartbeat_interval_s,
        request_timeout_s=t.peer_timeout_s,
        startup_timeout_s=t.recv_timeout_s,
        push_timeout_s=t.recv_timeout_s,
        weights=t.weights,
        weights_dir=t.weights_dir,
        val_temperature=rollout.val_temperature,
        work_wait_s=min(1.0, t.heartbeat_interval_s),
    )
    client = ActorClient(host, int(port), t.trajectory_hwm)
    from actors.external import make_episode_runner
    from envs.tools.mcp import close_mcp_servers

    runner = make_episode_runner(cfg, parts.tokenizer, engine)  # agent_type=external: the OpenAI endpoint
    actor = Actor(settings, client, engine, parts.agent, parts.tokenizer, parts.toolbox, parts.scorer, rollout=runner.run_episode)

    async def go():
        try:
            await actor.run()
        finally:
            await runner.close()
            await close_mcp_servers()  # agent.tools=[mcp:NAME]: stop this actor's tool servers
            await engine.close()

    # Everything built so far (torch, transformers, the model and tokenizer: ~1M objects) lives as long as
    # the process: frozen, the cyclic collector stops scanning it. Unfrozen, each of its full collections
    # took 150-330 ms here, a pause in the middle of a batch of episodes (one in every bench_actor batch).
    # Built with the collector off: its passes took ~2 s of the start-up (8 passes), one takes 0.8 s
    gc.collect()
    gc.freeze()
    gc.enable()
    try:
        asyncio.run(go())
    finally:
        client.close()
    logging.info("%s done: %d trajectories sent", args.actor_id, actor.trajectories_sent)
    return 0


if __name__ == "__main__":
    from protocol.transport import exit_closed

    exit_closed(main())
