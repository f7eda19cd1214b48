"""Evaluation through the same rollout loop, agent, tools and reward as training."""

from __future__ import annotations

import asyncio
import math
from collections import Counter

from actors.build import build_engine, build_parts
from actors.engines.base import SamplingSettings
from actors.rollout import run_episode
from configs.schema import RelayConfig


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with ``c`` of ``n`` samples correct (Chen et al. 2021):
    ``1 - C(n - c, k) / C(n, k)``, the chance that k of the n samples drawn without
    replacement include a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k_report(correct_per_prompt: list[int], n: int) -> dict[str, float]:
    """``pass@k`` averaged over prompts for k = 1, 2, 4, ... and k = n."""
    ks = sorted({*(2**i for i in range(n.bit_length()) if 2**i <= n), n})
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct_per_prompt) / len(correct_per_prompt) for k in ks}


def dump_record(index: int, chain: int, row: dict, ep, score: dict, tokenizer, prompt_key: str) -> dict:
    """One sample of an evaluation as a JSON-able record (``relay eval --dump``)."""
    return {
        "index": index,
        "chain": chain,
        "prompt": row.get(prompt_key, row.get("prompt")),
        "response": ep.response_text(tokenizer),
        "final_answer": ep.final_answer,
        "tool_calls": list(ep.tool_calls),
        "turns": ep.num_turns,
        "truncated": ep.truncated,
        "finish_reason": ep.finish_reason,
        "reward": score["reward"],
        "reward_components": dict(score),
    }


async def _evaluate(engine, parts, rows: list[dict], num_chains: int, temperature: float, dump=None, prompt_key: str = "question",
                    rollout=run_episode) -> dict:
    s = parts.sampling
    sampling = SamplingSettings(max_tokens=s.max_tokens, temperature=temperature, top_p=s.top_p, top_k=s.top_k, stop_token_ids=s.stop_token_ids)

    async def one(row):
        ep = await rollout(engine, parts.agent, parts.tokenizer, parts.toolbox, row, parts.limits, sampling)
        return ep, parts.scorer(ep, row)

    results = await asyncio.gather(*(one(r) for r in rows for _ in range(num_chains)))
    if dump is not None:
        import json

        with open(dump, "w") as f:
            for j, (ep, score) in enumerate(results):
                i, chain = divmod(j, num_chains)
                f.write(json.dumps(dump_record(i, chain, rows[i], ep, score, parts.tokenizer, prompt_key), default=str) + "\n")
    solved = [score["reward"] >= 1.0 for _, score in results]
    correct = [sum(solved[i * num_chains : (i + 1) * num_chains]) for i in range(len(rows))]
    tools = Counter(name for ep, _ in results for name in ep.tool_calls)
    n = len(results)
    out = {
        "n_prompts": len(rows),
        "accuracy": sum(solved) / n,
        "reward_mean": sum(score["reward"] for _, score in results) / n,
        "tool_use_rate": sum(1 for ep, _ in results if ep.tool_calls) / n,
        "truncated_rate": sum(ep.truncated for ep, _ in results) / n,
        "turns_mean": sum(ep.num_turns for ep, _ in results) / n,
        **{f"tool_calls/{k}": v / n for k, v in tools.items()},
    }
    if num_chains > 1:
        out.update(pass_at_k_report(correct, num_chains))
    return out


def evaluate(cfg: RelayConfig, model_path: str, rows: list[dict], num_chains: int = 1, temperature: float | None = None, dump=None) -> dict:
    """Accuracy (reward >= 1), mean reward, tool use and pass@k of ``model_path`` on ``rows``;
    ``dump``: also write one JSON line per sample there (prompt, response, tool calls, reward)."""
    parts = build_parts(cfg, model_path)
    engine = build_engine(cfg, model_path, seed=cfg.trainer.seed)
    temp = cfg.actor_rollout_ref.rollout.val_temperature if temperature is None else temperature

    from actors.external import make_episode_runner
    from envs.tools.mcp import close_mcp_servers

    runner = make_episode_runner(cfg, parts.tokenizer, engine)  # agent_type=external: through the endpoint

    async def go():
        try:
            return await _evaluate(engine, parts, rows, num_chains, temp, dump=dump, prompt_key=cfg.data.prompt_key,
                                   rollout=runner.run_episode)
        finally:
            await runner.close()
            await close_mcp_servers()
            await engine.close()

    return asyncio.run(go())
