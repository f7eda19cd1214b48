"""Chat templates and the observation delta.

By default an agent renders with the tokenizer's own ``chat_template``. For
models whose tokenizer has none, ``CHAT_TEMPLATES`` names Jinja templates:

* ``qwen2.5``: Qwen2.5-Instruct's template (tools in the system prompt as
  ``<tools>`` JSON, tool results as ``<tool_response>`` inside a user turn).
* ``qwen-chat``: plain ChatML with Qwen's default system prompt ("You are a
  helpful assistant."); tools listed as JSON in the system prompt, tool
  results as ``tool`` turns.
* ``chatml``: plain ChatML, no default system prompt; tools and tool results
  as in ``qwen-chat``.
* ``llama3``: Llama-3 headers; tools as JSON in the system prompt, tool
  results as ``ipython`` turns (as Llama 3.1 does).

``observation_delta`` is how agents append tool results without re-tokenizing
what the model sampled (see ``envs/base.py``).
"""

from __future__ import annotations

from typing import Any, Callable

_QWEN25 = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

_CHATML_BODY = """\
{%- set ns = namespace(system=default_system, start=0) %}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'] %}
    {%- set ns.start = 1 %}
{%- endif %}
{%- if tools %}
    {%- set ns.system = (ns.system + '\\n\\n' if ns.system else '') + '# Tools\\n\\nYou can call these functions:\\n' %}
    {%- for tool in tools %}
        {%- set ns.system = ns.system + (tool | tojson) + '\\n' %}
    {%- endfor %}
{%- endif %}
{%- if ns.system %}
    {{- '<|im_start|>system\\n' + ns.system + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages[ns.start:] %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

_CHATML = "{%- set default_system = '' %}\n" + _CHATML_BODY
_QWEN_CHAT = "{%- set default_system = 'You are a helpful assistant.' %}\n" + _CHATML_BODY

_LLAMA3 = """\
{{- bos_token }}
{%- set ns = namespace(system='', start=0) %}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'] %}
    {%- set ns.start = 1 %}
{%- endif %}
{%- if tools %}
    {%- set ns.system = (ns.system + '\\n\\n' if ns.system else '') + 'You have access to the following functions:\\n' %}
    {%- for tool in tools %}
        {%- set ns.system = ns.system + (tool | tojson) + '\\n' %}
    {%- endfor %}
{%- endif %}
{%- if ns.system %}
    {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + ns.system + '<|eot_id|>' }}
{%- endif %}
{%- for message in messages[ns.start:] %}
    {%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}
    {{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CHAT_TEMPLATES: dict[str, str] = {
    "qwen2.5": _QWEN25,
    "qwen-chat": _QWEN_CHAT,
    "chatml": _CHATML,
    "llama3": _LLAMA3,
}

TEMPLATE_STOP_STRINGS: dict[str, tuple[str, ...]] = {
    "qwen2.5": ("<|im_end|>",),
    "qwen-chat": ("<|im_end|>",),
    "chatml": ("<|im_end|>",),
    "llama3": ("<|eot_id|>",),
}
"""The end-of-turn token each named template closes an assistant turn with."""

_KNOWN_TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def get_template(name: str) -> str:
    try:
        return CHAT_TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown chat template '{name}'; known: {sorted(CHAT_TEMPLATES)}") from None


def stop_strings_for(tokenizer: Any, template: str | None) -> tuple[str, ...]:
    """End-of-turn strings: the named template's, else those the tokenizer's template uses.

    For the tokenizer's own template: the known turn-end markers that occur in
    it, else the tokenizer's ``eos_token``.
    """
    if template is not None:
        return TEMPLATE_STOP_STRINGS[template]
    source = tokenizer.chat_template
    if not isinstance(source, str):
        raise ValueError("tokenizer has no chat_template; pass template= one of " + str(sorted(CHAT_TEMPLATES)))
    found = tuple(s for s in _KNOWN_TURN_ENDS if s in source)
    if found:
        return found[:1]
    if tokenizer.eos_token is None:
        raise ValueError("cannot tell the end-of-turn token: template uses no known marker and eos_token is None")
    return (tokenizer.eos_token,)


Render = Callable[[list[dict[str, Any]], bool], str]
"""``render(messages, add_generation_prompt) -> text`` (tools already bound)."""


def make_render(tokenizer: Any, template: str | None, tools: list[dict[str, Any]] | None) -> Render:
    """A ``Render`` over the tokenizer with a named template (or its own when ``None``)."""
    chat_template = get_template(template) if template is not None else None
    if chat_template is None and not isinstance(tokenizer.chat_template, str):
        raise ValueError("tokenizer has no chat_template; pass template= one of " + str(sorted(CHAT_TEMPLATES)))

    def render(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages,
            tools=tools or None,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )

    return render


def observation_delta(
    render: Render,
    messages_before: list[dict[str, Any]],
    new_messages: list[dict[str, Any]],
    stop_string: str,
) -> str:
    """Text to append after a sampled assistant turn so the prompt equals a fresh render.

    ``messages_before`` ends with the assistant turn just sampled; its sampled ids
    end with ``stop_string``. The conversation is rendered without the new
    messages (no generation prompt) and with them (with the generation prompt);
    the result is the second render from just after the last ``stop_string``
    of the first. Raises ``ValueError`` when the template re-renders earlier
    turns differently once messages are added (then appending is impossible).
    """
    before = render(messages_before, False)
    after = render(messages_before + new_messages, True)
    cut = before.rfind(stop_string)
    if cut < 0:
        raise ValueError(f"stop string {stop_string!r} not in the rendered conversation")
    cut += len(stop_string)
    if after[:cut] != before[:cut]:
        raise ValueError("chat template renders earlier turns differently when messages are added")
    return after[cut:]
