"""An episode through the actor's OpenAI endpoint vs the same episode through Relay's own loop.

    python bench/bench_endpoint.py [--engine hf|vllm|instant] [--model tiny|qwen0.5b] [--client openai|openai-tcp|http] [--episodes 32] [--turns 3] [--max-tokens 32]

Both sides run ``--episodes`` concurrent episodes of ``--turns`` assistant
turns on the same engine (the embedded tiny model, or ``--model qwen0.5b``: a
random-init model of Qwen2-0.5B's shape with the tiny tokenizer): each turn
samples exactly ``--max-tokens`` tokens, to which a wrapper appends the
end-of-turn id (a random model rarely samples it; both sides get the same
fixed-length turns), then one tool result (``calculator`` -> ``2``) is appended
and the next turn is sampled. Relay's side is ``actors.rollout.run_episode`` with an ``hf``
agent that calls the tool on every turn but the last; the endpoint side is an
external agent (``actors.external.ExternalRunner``) that sends the same
messages with the ``openai`` client the runner gives it (its requests handed to
the endpoint in-process, ``Endpoint.transport``; ``--client openai-tcp``: the
same client over the endpoint's socket; ``--client http``: plain aiohttp
requests over the socket, to separate the endpoint's cost from the SDK's). The first prompt of every
episode is checked to be the same ids on both sides. Printed: sampled tokens/s
of each (wall clock, after one warm-up round) and endpoint/own (``ratio``),
and the same ratio in this process's CPU time (``cpu_ratio``: own CPU ms per
sampled token / the endpoint's, all threads counted; on a shared machine it
moves less than the wall-clock ratio, but it does not see the time the engine
waits for the clients).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors.engines.base import Engine, Generation, SamplingSettings  # noqa: E402
from actors.rollout import EpisodeLimits, ToolBox, run_episode  # noqa: E402
from envs.base import Action, ToolCall  # noqa: E402
from envs.agents.hf import HFAgent  # noqa: E402

AGENT_FILE = '''
async def run(row, client):
    tools = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate an arithmetic expression.",
              "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]
    messages = [{"role": "user", "content": row["question"]}]
    for turn in range(row["turns"]):
        r = await client.chat.completions.create(model="relay", messages=messages, tools=tools)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        if turn + 1 < row["turns"]:
            messages.append({"role": "tool", "tool_call_id": "c", "content": "2"})
    return messages[-1]["content"]
'''

RAW_AGENT_FILE = '''
import aiohttp

HTTP = {}


async def run(row, client):
    """The same episode with plain aiohttp requests to the client's base URL (no openai SDK)."""
    if "s" not in HTTP:
        HTTP["s"] = aiohttp.ClientSession()
    tools = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate an arithmetic expression.",
              "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]
    messages = [{"role": "user", "content": row["question"]}]
    for turn in range(row["turns"]):
        async with HTTP["s"].post(f"{client.base_url}chat/completions", json={"model": "relay", "messages": messages, "tools": tools}) as r:
            body = await r.json()
        messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
        if turn + 1 < row["turns"]:
            messages.append({"role": "tool", "tool_call_id": "c", "content": "2"})
    return messages[-1]["content"]
'''


class InstantEngine(Engine):
    """``--engine instant``: answers every request at once with ``max_tokens`` fixed ids, so the
    two sides' difference is their Python work per turn alone (no model, no batching)."""

    batches = 0

    async def generate(self, prompt_ids, settings):
        await asyncio.sleep(0)
        n = settings.max_tokens
        return Generation([100 + i for i in range(n)], [-1.0] * n, "length", 0)

    def load_weights(self, named_tensors, version, adopt=False):
        raise NotImplementedError

    async def close(self):
        return None


class FixedTurns(Engine):
    """``inner`` samples ``max_tokens`` tokens with no stop id; the end-of-turn id is appended."""

    def __init__(self, inner: Engine, stop_id: int):
        self.inner, self.stop_id = inner, stop_id

    async def generate(self, prompt_ids, settings):
        s = SamplingSettings(max_tokens=settings.max_tokens - 1, temperature=settings.temperature, seed=settings.seed)
        g = await self.inner.generate(prompt_ids, s)
        return Generation(g.token_ids + [self.stop_id], g.logprobs + [0.0], "stop", g.version)

    def load_weights(self, named_tensors, version, adopt=False):
        raise NotImplementedError

    async def close(self):
        await self.inner.close()


class ToolEveryTurn(HFAgent):
    """The ``hf`` agent, but every turn before the ``turns``-th calls ``calculator("1+1")``
    (one agent per episode: it counts that episode's turns)."""

    def __init__(self, *a, turns: int, **kw):
        super().__init__(*a, **kw)
        self.turns, self.seen = turns, 0

    def parse(self, text: str) -> Action:
        self.seen += 1
        if self.seen < self.turns:
            return Action(tool_calls=[ToolCall("calculator", {"expression": "1+1"})])
        return Action(final_answer=text)


async def own_loop(engine, tok, tools, rows, limits, settings, turns):
    async def one(row):
        agent = ToolEveryTurn(tok, tools, turns=turns)
        return await run_episode(engine, agent, tok, ToolBox(tools, 30, 64, None), row, limits, settings)

    return await asyncio.gather(*(one(r) for r in rows))


async def endpoint_loop(runner, engine, tok, rows, limits, settings):
    return await asyncio.gather(*(runner.run_episode(engine, None, tok, None, r, limits, settings) for r in rows))


async def main_async(args) -> None:
    from transformers import AutoTokenizer

    from actors.endpoint import Endpoint
    from actors.external import ExternalRunner
    from envs.tools import get_tool
    from launcher.tiny_model import build_tiny_model

    tmp = tempfile.mkdtemp(prefix="bench_endpoint_")
    model_dir = str(build_tiny_model(os.path.join(tmp, "tiny")))
    if args.model == "qwen0.5b":  # Qwen2-0.5B's shape, random init, over the tiny model's tokenizer
        from bench.bench_engines import QWEN2_0_5B, build_model

        build_model(QWEN2_0_5B, model_dir, seed=0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if args.engine == "instant":
        engine = InstantEngine()
    elif args.engine == "vllm":
        from actors.engines.vllm_engine import VLLMEngine

        engine = VLLMEngine(model_dir, seed=0, enforce_eager=True, dtype="float32")
    else:
        from actors.engines.hf_engine import HFEngine

        engine = HFEngine(model_dir, device="cpu", seed=0)
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    engine = FixedTurns(engine, stop)
    agent_path = os.path.join(tmp, "agent.py")
    with open(agent_path, "w") as f:
        f.write(RAW_AGENT_FILE if args.client == "http" else AGENT_FILE)
    runner = ExternalRunner(Endpoint(engine, tok, None), f"{agent_path}:run", timeout_s=600, in_process=args.client == "openai")
    tools = [get_tool("calculator")]
    limits = EpisodeLimits(max_turns=args.turns, max_tokens_per_turn=args.max_tokens, max_response_tokens=1500, max_context=2048)
    settings = SamplingSettings(max_tokens=args.max_tokens, temperature=1.0, stop_token_ids=(stop,))
    rows = [{"question": f"What is {100 + i} * {10 + i}?", "answer": "0", "turns": args.turns} for i in range(args.episodes)]

    times = {"own": [], "endpoint": []}
    cpu = {"own": 0.0, "endpoint": 0.0}  # this process's CPU seconds (every thread: the engine's too)
    sampled = {"own": 0, "endpoint": 0}
    batches = {"own": 0, "endpoint": 0}  # transformers engine: how many batches the same work took
    for rnd in range(args.rounds + 1):  # round 0 warms both up
        for side in ("own", "endpoint") if rnd % 2 == 0 else ("endpoint", "own"):
            t0, c0, b0 = time.perf_counter(), time.process_time(), getattr(engine.inner, "batches", 0)
            if side == "own":
                eps = await own_loop(engine, tok, tools, rows, limits, settings, args.turns)
            else:
                eps = await endpoint_loop(runner, engine, tok, rows, limits, settings)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            tokens = sum(e.gen_tokens for e in eps)
            assert tokens == args.episodes * args.turns * args.max_tokens, (side, tokens)
            assert all(e.num_turns == args.turns for e in eps), side
            if side == "own":
                own_prompts = [e.prompt_ids for e in eps]
            else:
                assert [e.prompt_ids for e in eps] == own_prompts, "the two sides rendered different prompts"
            if rnd > 0:
                times[side].append(tokens / dt)
                cpu[side] += dc
                sampled[side] += tokens
                batches[side] += getattr(engine.inner, "batches", 0) - b0
    await runner.close()
    await engine.close()
    if args.client == "http":
        from actors.external import load_entrypoint

        await load_entrypoint(f"{agent_path}:run").__globals__["HTTP"]["s"].close()
    own = sum(times["own"]) / len(times["own"])
    ep = sum(times["endpoint"]) / len(times["endpoint"])
    own_cpu, ep_cpu = (1000 * cpu[s] / sampled[s] for s in ("own", "endpoint"))  # CPU ms per sampled token
    print(f"{args.engine}, {args.model}, {args.client} client: {args.episodes} episodes x {args.turns} turns x {args.max_tokens} tokens, {args.rounds} rounds each")
    print(f"  own loop  {own:8.0f} sampled tok/s   {batches['own']} engine batches   {own_cpu:.2f} CPU ms/token")
    print(f"  endpoint  {ep:8.0f} sampled tok/s   {batches['endpoint']} engine batches   {ep_cpu:.2f} CPU ms/token   ratio {ep / own:.3f}")
    print(f"RESULT endpoint engine={args.engine} model={args.model} client={args.client} max_tokens={args.max_tokens} episodes={args.episodes} turns={args.turns} own_tok_s={own:.0f} "
          f"endpoint_tok_s={ep:.0f} ratio={ep / own:.3f} cpu_ratio={own_cpu / ep_cpu:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["hf", "vllm", "instant"], default="hf",
                    help="instant: no model, every turn answered at once (the sides' Python work per turn alone)")
    ap.add_argument("--model", choices=["tiny", "qwen0.5b"], default="tiny",
                    help="the embedded tiny model, or a random-init model of Qwen2-0.5B's shape")
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    # (rounds alternate which side goes first)
    ap.add_argument("--client", choices=["openai", "openai-tcp", "http"], default="openai",
                    help="the external agent's client: the openai SDK as ExternalRunner gives it (in-process transport), "
                         "the SDK over the endpoint's socket, or plain aiohttp requests over the socket")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
