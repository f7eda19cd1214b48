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
