"""The actor's OpenAI-compatible endpoint: real aiohttp server, real ``openai`` client, exact tokens.

A scripted engine (returns given turns, remembers every id list it returned)
serves the tiny model's tokenizer, so tool calls are deterministic; the ids the
session keeps must be, token for token, what the engine returned (mask 1) and
the observation ids (mask 0) that make the whole sequence decode to the chat
template's rendering of the conversation.
"""

import asyncio
import json

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("aiohttp")

from actors.endpoint import Endpoint
from actors.engines.base import SamplingSettings
from actors.engines.scripted import ScriptedEngine
from actors.rollout import EpisodeLimits

CALC = {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}


class RecordingEngine(ScriptedEngine):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.returned: list[list[int]] = []
        self.prompts: list[list[int]] = []

    async def generate(self, prompt_ids, settings):
        g = await super().generate(prompt_ids, settings)
        self.prompts.append(list(prompt_ids))
        self.returned.append(list(g.token_ids))
        return g


REWRITING_AGENT = (
    "async def run(row, client):\n"
    "    messages = [{'role': 'user', 'content': row['question']}]\n"
    "    r = await client.chat.completions.create(model='relay', messages=messages)\n"
    "    messages += [r.choices[0].message.model_dump(exclude_none=True), {'role': 'user', 'content': 'Sure?'}]\n"
    "    await client.chat.completions.create(model='relay', messages=messages)\n"
    "    summary = [{'role': 'user', 'content': row['question'] + ' You said 40. Final answer?'}]\n"
    "    r = await client.chat.completions.create(model='relay', messages=summary)\n"
    "    return r.choices[0].message.content\n"
)
"""An external agent (``path:run``) that asks twice, then rewrites its history into a one-message
summary for its third request: the episode splits into two sequences (turns 1-2, then turn 3)."""


def call(expr):
    return "<tool_call>" + json.dumps({"name": "calculator", "arguments": {"expression": expr}}) + "</tool_call>"


@pytest.fixture
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def limits(max_turns=6):
    return EpisodeLimits(max_turns=max_turns, max_tokens_per_turn=64, max_response_tokens=600, max_context=2048)


def runs(mask, ids):
    """The (mask value, ids) runs of a response."""
    out, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((int(mask[start]), list(ids[start:i])))
            start = i
    return out


def serve(tok, turns, fn, max_turns=6):
    """Run ``fn(client, session)`` against a fresh endpoint on a scripted engine."""
    engine = RecordingEngine(tok, turns, tok.convert_tokens_to_ids("<|im_end|>"))
    settings = SamplingSettings(max_tokens=64, stop_token_ids=(tok.convert_tokens_to_ids("<|im_end|>"),))

    async def go():
        ep = Endpoint(engine, tok, None)
        await ep.start()
        try:
            session = ep.open_session(limits(max_turns), settings)
            async with openai.AsyncOpenAI(base_url=session.base_url, api_key=session.key, max_retries=0) as client:
                out = await fn(client, session)
            ep.close_session(session)
            return session, out
        finally:
            await ep.close()

    session, out = asyncio.run(go())
    return engine, session, out


def test_function_calling_round_trip_is_token_exact(tok):
    async def agent(client, session):
        messages = [{"role": "user", "content": "What is 12*3+4?"}]
        r = await client.chat.completions.create(model="relay", messages=messages, tools=[CALC])
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls"
        assert msg.tool_calls[0].function.name == "calculator"
        assert json.loads(msg.tool_calls[0].function.arguments) == {"expression": "12*3"}
        messages.append(msg.model_dump(exclude_none=True))  # what harnesses do: the SDK object back
        messages.append({"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "36"})
        r = await client.chat.completions.create(model="relay", messages=messages, tools=[CALC])
        messages.append({"role": "assistant", "content": r.choices[0].message.content, "tool_calls": [
            {"id": t.id, "type": "function", "function": {"name": t.function.name, "arguments": t.function.arguments}}
            for t in r.choices[0].message.tool_calls]})
        messages.append({"role": "tool", "tool_call_id": "x", "content": "40"})
        r = await client.chat.completions.create(model="relay", messages=messages, tools=[CALC], extra_body={"return_token_ids": True})
        assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "The answer is 40."
        return r, messages

    engine, session, (last, messages) = serve(tok, [call("12*3"), call("36+4"), "The answer is 40."], agent)
    assert session.splits == 0 and len(session.segments) == 1
    seg = session.segments[0]
    assert len(seg.response_ids) == len(seg.loss_mask) == len(seg.logprobs) == len(seg.versions)
    sampled = [ids for k, ids in runs(seg.loss_mask, seg.response_ids) if k == 1]
    assert sampled == engine.returned  # every sampled token, in order, exactly as the engine returned it
    # each request's context is the previous one plus what was sampled plus the new observation ids only
    assert engine.prompts[1][: len(engine.prompts[0]) + len(engine.returned[0])] == engine.prompts[0] + engine.returned[0]
    assert last.model_extra["prompt_token_ids"] == engine.prompts[2]
    assert last.choices[0].model_extra["token_ids"] == engine.returned[2]
    # observations are the chat template's rendering of the tool messages, nothing else
    text = tok.decode(seg.prompt_ids + seg.response_ids, skip_special_tokens=False)
    assert "<tool_response>\n36\n</tool_response>" in text and "<tool_response>\n40\n</tool_response>" in text
    assert text.endswith("The answer is 40.<|im_end|>")
    assert seg.tool_calls == ["calculator", "calculator"]


def test_rewritten_history_splits_the_episode(tok):
    async def agent(client, session):
        messages = [{"role": "user", "content": "What is 2+2?"}]
        r = await client.chat.completions.create(model="m", messages=messages)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        messages.append({"role": "user", "content": "Are you sure?"})
        await client.chat.completions.create(model="m", messages=messages)  # extends: same segment
        # the harness summarises: a new history that does not extend the old one
        summary = [{"role": "user", "content": "What is 2+2? Earlier you said 4. Final answer?"}]
        r = await client.chat.completions.create(model="m", messages=summary)
        return r.choices[0].message.content

    engine, session, answer = serve(tok, ["4", "Yes, 4.", "4"], agent)
    assert answer == "4"
    assert session.splits == 1 and [s.num_turns for s in session.segments] == [2, 1]
    first, second = session.segments
    assert [ids for k, ids in runs(first.loss_mask, first.response_ids) if k == 1] == engine.returned[:2]
    assert [ids for k, ids in runs(second.loss_mask, second.response_ids) if k == 1] == engine.returned[2:]
    assert second.prompt_ids == engine.prompts[2]  # a fresh render of the rewritten history
    assert tok.decode(second.prompt_ids, skip_special_tokens=False).endswith("Final answer?<|im_end|>\n<|im_start|>assistant\n")


def test_turn_limit_is_refused_and_marks_truncation(tok):
    async def agent(client, session):
        messages = [{"role": "user", "content": "hi"}]
        r = await client.chat.completions.create(model="m", messages=messages)
        messages += [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": "again"}]
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model="m", messages=messages)
        return e.value

    _, session, err = serve(tok, ["hello"], agent, max_turns=1)
    assert err.code == "max_turns_exceeded" and session.truncated and session.finish_reason == "max_turns"


def test_text_completions_extend_and_unknown_sessions_are_refused(tok):
    async def agent(client, session):
        r = await client.completions.create(model="m", prompt="Q: 1+1?\nA:")
        text = "Q: 1+1?\nA:" + r.choices[0].text + "\nQ: 2+2?\nA:"
        r2 = await client.completions.create(model="m", prompt=text)
        other = openai.AsyncOpenAI(base_url=session.base_url.replace(session.key, "nope"), api_key="nope", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            await other.completions.create(model="m", prompt="x")
        await other.close()
        return r2.choices[0].text

    engine, session, text = serve(tok, [" 2", " 4"], agent)
    assert text == " 4" and session.splits == 0
    seg = session.segments[0]
    assert [ids for k, ids in runs(seg.loss_mask, seg.response_ids) if k == 1] == engine.returned


def test_streamed_chat_returns_the_turn(tok):
    async def agent(client, session):
        stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        return "".join(parts)

    _, _, text = serve(tok, ["hello there"], agent)
    assert text == "hello there"


def test_external_runner_scores_and_the_learner_gets_the_sampled_ids(tok, tmp_path):
    """An entrypoint file played through ExternalRunner, its trajectory across the wire into collate."""
    from actors.actor import Scorer, to_trajectory
    from actors.endpoint import Endpoint
    from actors.external import ExternalRunner
    from envs.rewards import get_reward
    from learner.batch import collate
    from protocol import messages as m

    agent_file = tmp_path / "agent.py"
    agent_file.write_text(
        "import json\n"
        "async def run(row, client):\n"
        "    tools = [{'type': 'function', 'function': {'name': 'calculator', 'parameters': {'type': 'object', 'properties': {'expression': {'type': 'string'}}}}}]\n"
        "    messages = [{'role': 'user', 'content': row['question']}]\n"
        "    for _ in range(4):\n"
        "        r = await client.chat.completions.create(model='relay', messages=messages, tools=tools)\n"
        "        msg = r.choices[0].message\n"
        "        messages.append(msg.model_dump(exclude_none=True))\n"
        "        if not msg.tool_calls:\n"
        "            return msg.content\n"
        "        for c in msg.tool_calls:\n"
        "            messages.append({'role': 'tool', 'tool_call_id': c.id, 'content': str(eval(json.loads(c.function.arguments)['expression']))})\n"
    )
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    engine = RecordingEngine(tok, [call("12*3"), call("36+4"), "40"], stop)
    runner = ExternalRunner(Endpoint(engine, tok, None), f"{agent_file}:run", timeout_s=60)
    settings = SamplingSettings(max_tokens=64, stop_token_ids=(stop,))
    row = {"question": "What is 12*3+4?", "answer": "40"}

    async def go():
        try:
            return await runner.run_episode(engine, None, tok, None, row, limits(), settings)
        finally:
            await runner.close()

    ep = asyncio.run(go())
    assert ep.final_answer == "40" and ep.finish_reason == "answer" and ep.splits == 0 and ep.num_turns == 3
    scores = Scorer(get_reward("math_reward_string_equal"), tok)(ep, row)
    assert scores["reward"] == 1.0
    item = m.WorkItem(sample_id="s0", row=row, group_size=1)
    traj = m.decode(m.encode(to_trajectory("actor-0", item, 0, ep, scores)))
    batch = collate([traj], {"s0": 0}, pad_id=0)
    targets = batch.input_ids[0].numpy()[1:]  # loss_mask is over target positions
    trained = targets[batch.loss_mask[0].numpy().astype(bool)]
    assert trained.tolist() == np.concatenate([np.array(r) for r in engine.returned]).tolist()


def test_a_split_episode_sends_every_segment_and_each_is_trained_on_its_sampled_ids(tok, tmp_path):
    """A harness that rewrites its history: each segment is a trajectory (segment k of 2, the
    episode's reward on both), every sampled id of both reaches the batch, and both rows get the
    chain's advantage."""
    import msgspec

    from actors.actor import Scorer, to_trajectory
    from actors.external import ExternalRunner
    from envs.rewards import get_reward
    from learner import algos
    from learner.batch import collate, over_chains
    from protocol import messages as m

    agent_file = tmp_path / "agent.py"
    agent_file.write_text(REWRITING_AGENT)
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    engine = RecordingEngine(tok, ["40", "Yes, 40.", "40"], stop)
    runner = ExternalRunner(Endpoint(engine, tok, None), f"{agent_file}:run", timeout_s=60)
    settings = SamplingSettings(max_tokens=64, stop_token_ids=(stop,))
    row = {"question": "What is 12*3+4?", "answer": "40"}

    async def go():
        try:
            return await runner.run_episode(engine, None, tok, None, row, limits(), settings)
        finally:
            await runner.close()

    ep = asyncio.run(go())
    assert ep.splits == 1 and runner.splits == 1
    seqs = ep.sequences()
    assert [s.prompt_ids for s in seqs] == [engine.prompts[0], engine.prompts[2]]
    scores = Scorer(get_reward("math_reward_string_equal"), tok)(ep, row)
    item = m.WorkItem(sample_id="s0", row=row, group_size=2)
    wire = [m.decode(m.encode(to_trajectory("actor-0", item, 0, s, scores, segment=k, num_segments=2))) for k, s in enumerate(seqs)]
    assert [(t.segment, t.num_segments, t.reward, t.final_answer) for t in wire] == [(0, 2, 1.0, "40"), (1, 2, 1.0, "40")]
    other = msgspec.structs.replace(wire[1], chain=1, reward=0.0, segment=0, num_segments=1)  # a second chain, unsplit
    batch = collate(wire + [other], {"s0": 0}, pad_id=0)
    trained = [batch.input_ids[i].numpy()[1:][batch.loss_mask[i].numpy().astype(bool)].tolist() for i in range(2)]
    assert trained == [engine.returned[0] + engine.returned[1], engine.returned[2]]  # token for token, both segments
    inputs = algos.AdvantageInputs(batch.token_rewards, batch.loss_mask, batch.group_index)
    adv, _ = over_chains(algos.rloo, inputs, algos.AdvantageConfig(), batch.chain_index, batch.segment_index)
    assert [set(adv[i][batch.loss_mask[i] > 0].tolist()) for i in range(3)] == [{1.0}, {1.0}, {-1.0}]


class FailsOnce(RecordingEngine):
    """Raises on its second request, then serves the script."""

    async def generate(self, prompt_ids, settings):
        self.requests = getattr(self, "requests", 0) + 1
        if self.requests == 2:
            raise RuntimeError("engine hiccup")
        return await super().generate(prompt_ids, settings)


def test_a_failed_request_leaves_the_session_unchanged(tok):
    """A retry of a request the engine failed extends the session once, not twice."""
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    engine = FailsOnce(tok, ["4", "Yes."], stop)

    async def go():
        ep = Endpoint(engine, tok, None)
        await ep.start()
        try:
            session = ep.open_session(limits(), SamplingSettings(max_tokens=64, stop_token_ids=(stop,)))
            async with openai.AsyncOpenAI(base_url=session.base_url, api_key=session.key, max_retries=0) as client:
                messages = [{"role": "user", "content": "2+2?"}]
                r = await client.chat.completions.create(model="m", messages=messages)
                messages += [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": "Sure?"}]
                with pytest.raises(openai.InternalServerError):
                    await client.chat.completions.create(model="m", messages=messages)
                await client.chat.completions.create(model="m", messages=messages)  # the harness retries
            return session
        finally:
            await ep.close()

    session = asyncio.run(go())
    assert session.splits == 0 and session.num_turns == 2
    seg = session.segments[0]
    assert engine.prompts[1] == seg.prompt_ids + seg.response_ids[: len(engine.prompts[1]) - len(seg.prompt_ids)]
    text = tok.decode(seg.prompt_ids + seg.response_ids, skip_special_tokens=False)
    assert text.count("Sure?") == 1 and text.endswith("Yes.<|im_end|>")


def test_preflight_checks_the_entrypoint(tiny_model_dir, tmp_path):
    from configs.schema import RelayConfig
    from launcher.preflight import PreflightError, preflight

    sync = tmp_path / "sync_agent.py"
    sync.write_text("def run(row, client):\n    return 'x'\n")

    def check(**agent):
        cfg = RelayConfig.model_validate({
            "agent": {"tools": [], **agent}, "data": {"source": "reasoning_gym:basic_arithmetic", "source_options": {"size": 4}},
            "actor_rollout_ref": {"model": {"path": tiny_model_dir}},
        })
        return preflight(cfg, resume=False, lengths=False)

    with pytest.raises(PreflightError, match="needs agent.entrypoint"):
        check(agent_type="external")
    with pytest.raises(PreflightError, match="must be an async function"):
        check(agent_type="external", entrypoint=f"{sync}:run")
    check(agent_type="external", entrypoint="examples/external/openai_agent.py:run")
    _, notes = check(agent_type="hf", entrypoint="examples/external/openai_agent.py:run")
    assert any("has no effect" in n for n in notes)


AGENTS = '''
import asyncio

async def reward(row, client):
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    return 0.25

async def scored(row, client):
    r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    return {"reward": 1.0, "style": 0.5, "final_answer": r.choices[0].message.content, "note": "text is dropped"}

async def greedy_harness(row, client):
    messages = [{"role": "user", "content": "hi"}]
    while True:  # until the endpoint refuses: max_turns
        r = await client.chat.completions.create(model="m", messages=messages)
        messages += [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": "more"}]

async def silent(row, client):
    return "never asked"

async def slow(row, client):
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    await asyncio.sleep(60)

async def broken(row, client):
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    raise KeyError("bug in the harness")
'''


@pytest.mark.parametrize("name", ["reward", "scored", "greedy_harness", "silent", "slow", "broken"])
def test_external_runner_results_and_limits(tok, tmp_path, name):
    from actors.actor import Scorer
    from actors.external import ExternalRunner
    from envs.rewards import get_reward

    path = tmp_path / "agents.py"
    path.write_text(AGENTS)
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    engine = RecordingEngine(tok, ["ok"] * 3, stop)
    runner = ExternalRunner(Endpoint(engine, tok, None), f"{path}:{name}", timeout_s=1.0 if name == "slow" else 30)
    settings = SamplingSettings(max_tokens=64, stop_token_ids=(stop,))

    async def go():
        try:
            return await runner.run_episode(engine, None, tok, None, {"question": "hi", "answer": "ok"}, limits(max_turns=3), settings)
        finally:
            await runner.close()

    if name == "silent":
        with pytest.raises(RuntimeError, match="without asking the model"):
            asyncio.run(go())
        return
    if name == "broken":
        with pytest.raises(KeyError, match="bug in the harness"):
            asyncio.run(go())
        return
    ep = asyncio.run(go())
    scores = Scorer(get_reward("math_reward_string_equal"), tok)(ep, {"question": "hi", "answer": "ok"})
    if name == "reward":
        assert scores == {"reward": 0.25} and ep.final_answer is None and ep.finish_reason == "answer"
    elif name == "scored":
        assert scores == {"reward": 1.0, "style": 0.5} and ep.final_answer == "ok"
    elif name == "greedy_harness":  # the 4th request was refused: a truncated episode, not a failure
        assert ep.truncated and ep.finish_reason == "max_turns" and ep.num_turns == 3 and scores["reward"] == 0.0
    elif name == "slow":
        assert ep.truncated and ep.finish_reason == "timeout" and ep.num_turns == 1


def test_relay_eval_runs_external_agents_through_the_endpoint(tiny_model_dir, tmp_path):
    from actors.evaluate import evaluate
    from configs.schema import RelayConfig

    path = tmp_path / "agent.py"
    path.write_text("async def run(row, client):\n"
                    "    await client.chat.completions.create(model='m', messages=[{'role': 'user', 'content': row['question']}], max_tokens=4)\n"
                    "    return 1.0\n")
    cfg = RelayConfig.model_validate({"agent": {"agent_type": "external", "entrypoint": f"{path}:run", "tools": []},
                                      "actor_rollout_ref": {"model": {"path": tiny_model_dir}}})
    out = evaluate(cfg, tiny_model_dir, [{"question": "1+1?", "answer": "2"}] * 2)
    assert out["accuracy"] == 1.0 and out["turns_mean"] == 1.0  # the harness's reward: it ran, not the hf loop


def test_a_template_that_rerenders_history_splits_instead_of_failing(tiny_model_dir):
    """Templates that render earlier assistant turns differently once more messages follow (as
    reasoning models' templates drop old <think> blocks) cannot be appended to: a new sequence."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}[earlier answer]{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )

    async def agent(client, session):
        messages = [{"role": "user", "content": "hi"}]
        r = await client.chat.completions.create(model="m", messages=messages)
        messages += [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": "and?"}]
        r = await client.chat.completions.create(model="m", messages=messages)
        return r.choices[0].message.content

    _, session, answer = serve(tok, ["hello", "bye"], agent)
    assert answer == "bye" and session.splits == 1
    assert "[earlier answer]" in tok.decode(session.segments[1].prompt_ids)


def test_streamed_tool_calls_reach_the_client(tok):
    async def agent(client, session):
        stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "12*3?"}], tools=[CALC], stream=True)
        calls, finish = {}, None
        async for chunk in stream:
            for d in chunk.choices[0].delta.tool_calls or []:
                c = calls.setdefault(d.index, {"name": "", "arguments": ""})
                c["name"] += d.function.name or ""
                c["arguments"] += d.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        return calls, finish

    _, session, (calls, finish) = serve(tok, [call("12*3")], agent)
    assert finish == "tool_calls" and calls[0]["name"] == "calculator"
    assert json.loads(calls[0]["arguments"]) == {"expression": "12*3"}


RESP_CALC = {"type": "function", "name": "calculator", "description": "Evaluate arithmetic.",
             "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}


@pytest.mark.parametrize("chained", [False, True], ids=["full-input", "previous_response_id"])
def test_responses_api_with_function_calls_is_token_exact(tok, chained):
    """The Responses API (what the OpenAI Agents SDK calls by default): items in, items out."""
    async def agent(client, session):
        items = [{"role": "user", "content": "What is 12*3+4?"}]
        r = await client.responses.create(model="m", instructions="Use the tool.", input=items, tools=[RESP_CALC])
        for _ in range(2):
            calls = [o for o in r.output if o.type == "function_call"]
            assert calls and calls[0].name == "calculator"
            result = str(eval(json.loads(calls[0].arguments)["expression"]))
            outputs = [{"type": "function_call_output", "call_id": calls[0].call_id, "output": result}]
            if chained:
                r = await client.responses.create(model="m", previous_response_id=r.id, input=outputs, tools=[RESP_CALC])
            else:
                items = items + [o.model_dump(exclude_none=True) for o in r.output] + outputs
                r = await client.responses.create(model="m", instructions="Use the tool.", input=items, tools=[RESP_CALC])
        return r.output_text

    engine, session, answer = serve(tok, [call("12*3"), call("36+4"), "40"], agent)
    assert answer == "40" and session.splits == 0
    seg = session.segments[0]
    assert [ids for k, ids in runs(seg.loss_mask, seg.response_ids) if k == 1] == engine.returned
    text = tok.decode(seg.prompt_ids + seg.response_ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nUse the tool.") and "<tool_response>\n36\n</tool_response>" in text


def test_an_entrypoint_can_use_relays_configured_tools(tok, tmp_path):
    """``run(row, client, tools)``: the configured tools' schemas and calls with Relay's limits."""
    from actors.external import ExternalRunner
    from actors.rollout import ToolBox
    from envs.tools import get_tool

    path = tmp_path / "agent.py"
    path.write_text(
        "OBS = []\n"
        "async def run(row, client, tools):\n"
        "    messages = [{'role': 'user', 'content': row['question']}]\n"
        "    while True:\n"
        "        r = await client.chat.completions.create(model='m', messages=messages, tools=tools.schemas)\n"
        "        msg = r.choices[0].message\n"
        "        messages.append(msg.model_dump(exclude_none=True))\n"
        "        if not msg.tool_calls:\n"
        "            return msg.content\n"
        "        for c in msg.tool_calls:\n"
        "            OBS.append(await tools.call(c.function.name, c.function.arguments))\n"
        "            messages.append({'role': 'tool', 'tool_call_id': c.id, 'content': OBS[-1]})\n"
    )
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    bad = "<tool_call>" + json.dumps({"name": "nope", "arguments": {}}) + "</tool_call>"
    engine = RecordingEngine(tok, [call("12*3"), bad, "36"], stop)
    runner = ExternalRunner(Endpoint(engine, tok, None), f"{path}:run", timeout_s=30)
    toolbox = ToolBox([get_tool("calculator")], 10, 64, None)

    async def go():
        try:
            return await runner.run_episode(engine, None, tok, toolbox, {"question": "12*3?"}, limits(),
                                            SamplingSettings(max_tokens=64, stop_token_ids=(stop,)))
        finally:
            await runner.close()

    ep = asyncio.run(go())
    obs = runner.fn.__globals__["OBS"]
    assert obs[0] == "36" and obs[1].startswith("Error: unknown tool 'nope'")
    assert ep.tool_calls == ["calculator", "nope"] and ep.tool_errors == 1 and ep.final_answer == "36"


def test_the_in_process_transport_serves_the_same_sessions_as_the_socket(tok):
    """``Endpoint.transport`` (what ExternalRunner's client uses): the same handler without the
    socket. A turn sent in-process and the next sent over HTTP extend one segment; streaming,
    errors and unknown routes come back as over HTTP."""
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    engine = RecordingEngine(tok, ["4", "Yes.", "4, yes."], stop)

    async def go():
        ep = Endpoint(engine, tok, None)
        await ep.start()
        session = ep.open_session(limits(), SamplingSettings(max_tokens=64, stop_token_ids=(stop,)))
        http = openai.DefaultAsyncHttpxClient(transport=ep.transport())
        inproc = openai.AsyncOpenAI(base_url=session.base_url, api_key=session.key, max_retries=0, http_client=http)
        tcp = openai.AsyncOpenAI(base_url=session.base_url, api_key=session.key, max_retries=0)
        try:
            messages = [{"role": "user", "content": "What is 2+2?"}]
            r = await inproc.chat.completions.create(model="m", messages=messages)
            messages += [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": "Sure?"}]
            await tcp.chat.completions.create(model="m", messages=messages)  # over the socket: extends the same segment
            messages += [{"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Once more?"}]
            stream = await inproc.chat.completions.create(model="m", messages=messages, stream=True)
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            with pytest.raises(openai.BadRequestError) as refused:
                await inproc.chat.completions.create(model="m", messages=messages, stop=["x"])
            lost = openai.AsyncOpenAI(base_url=session.base_url.replace(session.key, "nope"), api_key="nope", max_retries=0, http_client=http)
            with pytest.raises(openai.NotFoundError):
                await lost.chat.completions.create(model="m", messages=messages)
            by_key = openai.AsyncOpenAI(base_url=ep.url + "/v1", api_key=session.key, max_retries=0, http_client=http)
            models = [m.id for m in (await by_key.models.list()).data]  # the key as the API key, no /s/ in the path
            missing = await http.get(session.base_url + "/embeddings")
            return session, (streamed, refused.value.code, models, missing.status_code, missing.json()["error"]["code"])
        finally:
            await tcp.close()
            await http.aclose()
            await ep.close()

    session, out = asyncio.run(go())
    assert out == ("4, yes.", "unsupported_stop", ["relay"], 404, "not_found")
    assert session.splits == 0 and session.segments[0].num_turns == 3
    sampled = [ids for k, ids in runs(session.segments[0].loss_mask, session.segments[0].response_ids) if k == 1]
    assert sampled == engine.returned
