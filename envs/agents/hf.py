"""Agent type ``hf``: Hugging Face / Qwen2.5-style function calling.

* Tool schemas go to the chat template (``apply_chat_template(..., tools=schemas)``).
* The model calls tools with one or more blocks in a turn::

      <tool_call>
      {"name": "calculator", "arguments": {"expression": "2+2"}}
      </tool_call>

  (``"arguments"`` may also be a JSON-encoded string, as some models emit).
* Each result goes back as ``{"role": "tool", "name": ..., "content": text}``.
* A turn without ``<tool_call>`` is final; its text (stripped) is the final answer.
* A malformed block (invalid JSON, not an object, no string ``name``, arguments
  not an object, an unclosed ``<tool_call>``) gives ``Action(parse_error=...)``
  with no tool calls and no final answer. ``observation_text`` for such an
  action returns one tool message ``Error: could not parse tool call: ...``
  so the model can retry, if the rollout loop continues the episode (see the
  note on ``Action.final`` in the report / ``envs/base.py``). Well-formed
  blocks in the same turn are not run when any block is malformed.
"""

from __future__ import annotations

import json
import re
from typing import Any

from envs.agents.chat import ChatAgent
from envs.base import Action, ToolCall, ToolResult

_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_tool_call_json(body: str) -> ToolCall:
    """One ``{"name": ..., "arguments": {...}}`` object; raises ``ValueError`` describing the problem."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError('missing "name" (a string)')
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f'"arguments" is a string that is not valid JSON ({e.msg})') from None
    if not isinstance(arguments, dict):
        raise ValueError(f'"arguments" must be an object, got {type(arguments).__name__}')
    return ToolCall(name=name, arguments=arguments)


class HFAgent(ChatAgent):
    schemas_in_template = True

    def parse(self, text: str) -> Action:
        bodies = _TOOL_CALL.findall(text)
        tail = _TOOL_CALL.sub("", text)
        if "<tool_call>" in tail:
            return Action(parse_error="unclosed <tool_call> (missing </tool_call>)")
        if not bodies:
            return Action(final_answer=text.strip())
        calls = []
        for i, body in enumerate(bodies):
            try:
                calls.append(parse_tool_call_json(body.strip()))
            except ValueError as e:
                return Action(parse_error=f"tool call {i + 1}: {e}")
        return Action(tool_calls=calls)

    def result_messages(self, action: Action, results: list[ToolResult]) -> list[dict[str, Any]]:
        if action.parse_error is not None:
            return [{"role": "tool", "name": "error", "content": f"Error: could not parse tool call: {action.parse_error}"}]
        if len(results) != len(action.tool_calls):
            raise ValueError(f"{len(action.tool_calls)} tool calls but {len(results)} results")
        return [
            {"role": "tool", "name": call.name, "content": result.text}
            for call, result in zip(action.tool_calls, results)
        ]
