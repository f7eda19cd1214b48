import pytest

from envs import make_agent
from envs.base import ToolCall, ToolResult
from envs.templates import CHAT_TEMPLATES, make_render, observation_delta
from envs.testing import tiny_chat_tokenizer
from envs.tools import get_tool

TEMPLATES = sorted(CHAT_TEMPLATES)
CALL_TEXT = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "123*45"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizers():
    return {name: tiny_chat_tokenizer(name) for name in TEMPLATES}


def hf_agent(tok, template=None, system_prompt="Be brief."):
    return make_agent("hf", tok, [get_tool("calculator"), get_tool("answer")], template=template, system_prompt=system_prompt)


@pytest.mark.parametrize("template", TEMPLATES)
def test_observation_delta_matches_a_fresh_render(tokenizers, template):
    tok = tokenizers[template]
    render = make_render(tok, template, tools=None)
    stop = {"llama3": "<|eot_id|>"}.get(template, "<|im_end|>")
    before = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "call it"}]
    new = [{"role": "tool", "content": "42"}, {"role": "tool", "content": "43"}]
    prompt = render(before[:1], True)
    delta = observation_delta(render, before, new, stop)
    # prompt + sampled text + stop token + delta is exactly the full render with a generation prompt
    assert prompt + "call it" + stop + delta == render(before + new, True)
    assert "42" in delta and "43" in delta


def test_observation_delta_qwen25_hand_written(tokenizers):
    render = make_render(tokenizers["qwen2.5"], "qwen2.5", tools=None)
    before = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    delta = observation_delta(render, before, [{"role": "tool", "content": "5535"}], "<|im_end|>")
    assert delta == "\n<|im_start|>user\n<tool_response>\n5535\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


def test_observation_delta_refuses_rewriting_templates():
    # A "template" whose rendering of earlier turns depends on later ones cannot be appended to.
    def render(messages, add_generation_prompt):
        return f"[{len(messages)}]" + "".join(m["content"] + "<e>" for m in messages)

    with pytest.raises(ValueError, match="differently"):
        observation_delta(render, [{"role": "assistant", "content": "a"}], [{"role": "tool", "content": "t"}], "<e>")


@pytest.mark.parametrize("template", TEMPLATES)
def test_hf_episode_text_equals_full_render(tokenizers, template):
    tok = tokenizers[template]
    agent = hf_agent(tok, template)
    stop = agent.stop_strings[0]
    conv = agent.start({"question": "What is 123*45?", "answer": "5535"})
    text = agent.prompt_text(conv)
    assert text.endswith({"llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n"}.get(template, "<|im_start|>assistant\n"))
    assert '"name": "calculator"' in text  # schemas reach the template

    action = agent.parse(CALL_TEXT)
    assert action.tool_calls == [ToolCall(name="calculator", arguments={"expression": "123*45"})]
    agent.add_assistant(conv, CALL_TEXT)
    text += CALL_TEXT + stop
    text += agent.observation_text(conv, action, [ToolResult(text="5535")])

    final = agent.parse("The answer is 5535.")
    assert final.final and final.final_answer == "The answer is 5535."
    agent.add_assistant(conv, "The answer is 5535.")
    text += "The answer is 5535." + stop
    full = tok.apply_chat_template(
        conv.messages, tools=[get_tool("calculator").schema, get_tool("answer").schema], tokenize=False
    )
    # Tokens appended turn by turn decode to the same text as a fresh render of the whole episode
    # (up to what the template appends after the last turn).
    assert full.startswith(text) and full[len(text):] in ("", "\n")
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "tool", "assistant"]


def test_tokenizers_own_template_is_the_default(tokenizers):
    tok = tokenizers["qwen2.5"]
    agent = hf_agent(tok, template=None, system_prompt=None)
    assert agent.stop_strings == ("<|im_end|>",)
    text = agent.prompt_text(agent.start({"question": "hi"}))
    assert text.startswith("<|im_start|>system\nYou are Qwen") and "<tools>" in text


def test_no_template_anywhere_is_an_error():
    tok = tiny_chat_tokenizer(None)
    with pytest.raises(ValueError, match="chat_template"):
        hf_agent(tok)


def test_hf_parse_several_calls_and_string_arguments(tokenizers):
    agent = hf_agent(tokenizers["qwen2.5"], "qwen2.5")
    text = (
        "Let me compute.\n"
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "answer", "arguments": "{\\"answer\\": \\"2\\"}"}\n</tool_call>'
    )
    assert agent.parse(text).tool_calls == [
        ToolCall(name="calculator", arguments={"expression": "1+1"}),
        ToolCall(name="answer", arguments={"answer": "2"}),
    ]


@pytest.mark.parametrize(
    "text,problem",
    [
        ('<tool_call>\n{"name": "calculator", "arguments": {"expression": }\n</tool_call>', "invalid JSON"),
        ("<tool_call>\n[1, 2]\n</tool_call>", "expected a JSON object"),
        ('<tool_call>\n{"arguments": {}}\n</tool_call>', '"name"'),
        ('<tool_call>\n{"name": "calculator", "arguments": [1]}\n</tool_call>', '"arguments" must be an object'),
        ('<tool_call>\n{"name": "calculator"', "unclosed"),
    ],
)
def test_hf_malformed_tool_call_is_an_error_observation(tokenizers, text, problem):
    agent = hf_agent(tokenizers["qwen2.5"], "qwen2.5")
    action = agent.parse(text)
    assert action.parse_error is not None and problem in action.parse_error
    assert action.tool_calls == [] and action.final_answer is None
    conv = agent.start({"question": "q"})
    agent.add_assistant(conv, text)
    obs = agent.observation_text(conv, action, [])
    assert obs.startswith("\n<|im_start|>user\n<tool_response>\nError: could not parse tool call: ")
    assert problem in obs and obs.endswith("<|im_start|>assistant\n")


def test_make_agent_unknown_type(tokenizers):
    with pytest.raises(KeyError, match="unknown agent type"):
        make_agent("nope", tokenizers["chatml"], [])



# ----------------------------------------------------------------------------- react and code


def test_react_parse_action_final_and_errors(tokenizers):
    agent = make_agent("react", tokenizers["chatml"], [get_tool("calculator")], template="chatml")
    system = agent.start({"question": "q"}).messages[0]["content"]
    assert "calculator: Evaluate an arithmetic expression" in system and "Final Answer:" in system

    text = 'Thought: multiply\nAction: calculator\nAction Input: {"expression": "123*45"}\nObservation: 5535 (made up)'
    assert agent.parse(text).tool_calls == [ToolCall(name="calculator", arguments={"expression": "123*45"})]
    plain = agent.parse("Action: calculator\nAction Input: 2+2")
    assert plain.tool_calls == [ToolCall(name="calculator", arguments={"expression": "2+2"})]
    final = agent.parse("Thought: I now know the final answer\nFinal Answer: 5535")
    assert final.final and final.final_answer == "5535"
    assert "Final Answer" in agent.parse("I think it is 5535").parse_error


def test_react_episode_text_equals_full_render(tokenizers):
    tok = tokenizers["qwen2.5"]
    agent = make_agent("react", tok, [get_tool("calculator")], template="qwen2.5")
    conv = agent.start({"question": "What is 123*45?"})
    text = agent.prompt_text(conv)
    turn = 'Thought: use it\nAction: calculator\nAction Input: {"expression": "123*45"}'
    action = agent.parse(turn)
    agent.add_assistant(conv, turn)
    obs = agent.observation_text(conv, action, [ToolResult(text="5535")])
    assert obs == "\n<|im_start|>user\nObservation: 5535<|im_end|>\n<|im_start|>assistant\n"
    text += turn + "<|im_end|>" + obs
    assert text == tok.apply_chat_template(conv.messages, add_generation_prompt=True, tokenize=False)


def test_code_agent_parse_and_run(tokenizers):
    import asyncio

    interpreter = get_tool("code_interpreter", wall_s=8.0)
    agent = make_agent("code", tokenizers["qwen2.5"], [interpreter], template="qwen2.5")
    text = "First:\n```python\nx = 6\n```\nthen\n```py\nprint(x * 7)\n```"
    action = agent.parse(text)
    assert action.tool_calls == [ToolCall(name="code_interpreter", arguments={"code": "x = 6\nprint(x * 7)\n"})]
    conv = agent.start({"question": "6*7?"})
    agent.add_assistant(conv, text)
    result = asyncio.run(interpreter.call(action.tool_calls[0].arguments, timeout_s=30, max_output_tokens=100))
    obs = agent.observation_text(conv, action, [result])
    assert obs == "\n<|im_start|>user\nOutput:\n42\n<|im_end|>\n<|im_start|>assistant\n"
    assert agent.parse("The answer is 42.").final_answer == "The answer is 42."
    assert agent.parse("```python\nprint(1)\n").parse_error == "unclosed ```python block"
    with pytest.raises(ValueError, match="code_interpreter"):
        make_agent("code", tokenizers["qwen2.5"], [get_tool("calculator")], template="qwen2.5")


def _counting(agent):
    """Count the agent's renders (its own render function, called through)."""
    calls = []
    render = agent._render

    def counted(messages, add_generation_prompt):
        calls.append(len(messages))
        return render(messages, add_generation_prompt)

    agent._render = counted
    return calls


EPISODES = {  # agent type -> (tools, [(assistant turn, tool results)...]); each turn but the last calls tools
    "hf": (["calculator", "answer"], [
        (CALL_TEXT, ["5535"]),
        (CALL_TEXT + "\n" + CALL_TEXT.replace("123*45", "5535+1"), ["5535", "5536"]),  # two results, one turn
        ("<tool_call>\n{not json}\n</tool_call>", []),  # a parse error goes back as a tool message
        ("The answer is 5536.", None),
    ]),
    "react": (["calculator"], [
        ('Thought: use it\nAction: calculator\nAction Input: {"expression": "123*45"}', ["5535"]),
        ("I am not sure", []),
        ("Thought: done\nFinal Answer: 5535", None),
    ]),
    "code": (["code_interpreter"], [
        ("```python\nprint(123*45)\n```", ["5535\n"]),
        ("```python\nprint(1)", []),
        ("The answer is 5535.", None),
    ]),
}


@pytest.mark.parametrize("agent_type", sorted(EPISODES))
@pytest.mark.parametrize("template", TEMPLATES + [None])
def test_one_render_observation_equals_observation_delta_and_a_fresh_render(tokenizers, agent_type, template):
    tok = tokenizers[template or "qwen2.5"]  # None: the tokenizer's own template (qwen2.5's)
    tools, turns = EPISODES[agent_type]
    agent = make_agent(agent_type, tok, [get_tool(n) for n in tools], template=template, system_prompt="Be brief.")
    stop = agent.stop_strings[0]
    renders = _counting(agent)
    conv = agent.start({"question": "What is 123*45+1?"})
    text = agent.prompt_text(conv)
    for turn, results in turns:
        agent.add_assistant(conv, turn)
        text += turn + stop
        if results is None:
            break
        action = agent.parse(turn)
        expected = observation_delta(agent._render, conv.messages, agent.result_messages(action, [ToolResult(r) for r in results]), stop)
        before = len(renders)
        delta = agent.observation_text(conv, action, [ToolResult(r) for r in results])
        assert delta == expected
        assert len(renders) == before + 1  # one render, not two
        text += delta
        assert text == agent._render(conv.messages, True)  # what the model saw is a fresh render, turn after turn


def test_observation_falls_back_to_two_renders_when_the_model_saw_other_text(tokenizers):
    tok = tiny_chat_tokenizer(None)
    # this template trims assistant turns: the model saw " 42 " but the history renders "42"
    tok.chat_template = CHAT_TEMPLATES["chatml"].replace("message['content']", "message['content'] | trim")
    agent = make_agent("react", tok, [get_tool("calculator")])
    renders = _counting(agent)
    conv = agent.start({"question": "q"})
    agent.prompt_text(conv)
    turn = ' Action: calculator\nAction Input: {"expression": "6*7"} '
    agent.add_assistant(conv, turn)
    results = [ToolResult("42")]
    expected = observation_delta(agent._render, conv.messages, agent.result_messages(agent.parse(turn), results), "<|im_end|>")
    n = len(renders)
    assert agent.observation_text(conv, agent.parse(turn), results) == expected
    assert len(renders) == n + 3 and conv.seen is None  # the one render did not start with the text seen; two more
    # messages added by hand: the text seen is not known for them, the two renders are used at once
    conv = agent.start({"question": "q"})
    agent.prompt_text(conv)
    conv.messages.append({"role": "assistant", "content": "Action: calculator\nAction Input: {\"expression\": \"1\"}"})
    n = len(renders)
    agent.observation_text(conv, agent.parse(conv.messages[-1]["content"]), [ToolResult("1")])
    assert len(renders) == n + 2


def test_prompt_renders_are_reused_for_equal_messages(tokenizers):
    agent = hf_agent(tokenizers["qwen2.5"], "qwen2.5")
    renders = _counting(agent)
    row = {"question": "What is 2+2?"}
    texts = [agent.prompt_text(agent.start(row)) for _ in range(4)]  # a group's four chains
    assert renders == [2] and len(set(texts)) == 1
    assert agent.prompt_text(agent.start({"question": "What is 2+3?"})) == agent._render(agent.start({"question": "What is 2+3?"}).messages, True)
    assert agent.prompt_text(agent.start({"question": [{"role": "user", "content": "hi", "n": 1}]})) is not None
    assert renders[-1] == 2 and len(renders) == 4  # 2+3 (and the direct render), then a message with a non-string value
    clock = tiny_chat_tokenizer(None)
    clock.chat_template = "{{ strftime_now('%Y') }}" + CHAT_TEMPLATES["chatml"]
    agent = hf_agent(clock)
    renders = _counting(agent)
    agent.prompt_text(agent.start(row))
    agent.prompt_text(agent.start(row))
    assert len(renders) == 2  # a template that reads the clock is rendered every time
