"""Agent type ``react``: the ReAct text format over a chat template.

The system prompt lists the tools (name, description, JSON parameters) and asks
for::

    Thought: ...
    Action: <tool name>
    Action Input: <JSON object of arguments>

or, to finish::

    Thought: ...
    Final Answer: <answer>

``parse`` reads the first ``Action``/``Action Input`` pair (text after the
input, such as a hallucinated ``Observation:``, is ignored; one call per
turn); ``Final Answer:`` with no action is final, its text the answer. A turn
with neither, or an ``Action`` without valid JSON input, is a parse error
(``Action(parse_error=...)``), answered with an ``Observation: Error: ...``.
Results go back as a user message ``Observation: <text>``. Tool schemas are
not passed to the chat template. A tool with a single string parameter also
accepts a plain-text Action Input.
"""

from __future__ import annotations

import json
import re
from typing import Any

from envs.agents.chat import ChatAgent
from envs.base import Action, ToolCall, ToolResult

_ACTION = re.compile(r"^\s*Action\s*:\s*(?P<name>[^\n]+?)\s*\n+\s*Action\s*Input\s*:\s*(?P<input>.*)", re.DOTALL | re.MULTILINE)
_FINAL = re.compile(r"^\s*Final\s*Answer\s*:\s*(?P<answer>.*)", re.DOTALL | re.MULTILINE)
_INPUT_END = re.compile(r"\n\s*(?:Observation|Thought|Action)\s*:")

REACT_INSTRUCTIONS = """\
Answer the question as well as you can. You have access to the following tools:

{tools}

Use this format:

Thought: think about what to do
Action: the tool to use, one of [{names}]
Action Input: the tool's arguments as a JSON object

You will then get "Observation: <result>". Repeat as needed. When you know the answer:

Thought: I now know the final answer
Final Answer: the final answer"""


class ReActAgent(ChatAgent):
    schemas_in_template = False

    def build_system_prompt(self, system_prompt: str | None) -> str:
        tools = "\n".join(
            f"{t.name}: {t.description} Parameters: {json.dumps(t.parameters['properties'])}" for t in self.tools.values()
        )
        text = REACT_INSTRUCTIONS.format(tools=tools, names=", ".join(self.tools))
        return f"{system_prompt}\n\n{text}" if system_prompt else text

    def parse(self, text: str) -> Action:
        m = _ACTION.search(text)
        if m is None:
            f = _FINAL.search(text)
            if f is not None:
                return Action(final_answer=f.group("answer").strip())
            return Action(parse_error='expected "Action:" with "Action Input:", or "Final Answer:"')
        name = m.group("name").strip()
        raw = _INPUT_END.split(m.group("input"), maxsplit=1)[0].strip()
        raw = re.sub(r"^```(?:json)?\s*|\s*```$", "", raw)
        try:
            arguments = json.loads(raw)
        except json.JSONDecodeError as e:
            arguments = self._plain_text_argument(name, raw)
            if arguments is None:
                return Action(parse_error=f"Action Input is not valid JSON ({e.msg})")
        if not isinstance(arguments, dict):
            arguments = self._plain_text_argument(name, raw)
            if arguments is None:
                return Action(parse_error="Action Input must be a JSON object")
        return Action(tool_calls=[ToolCall(name=name, arguments=arguments)])

    def _plain_text_argument(self, name: str, raw: str) -> dict[str, Any] | None:
        tool = self.tools.get(name)
        if tool is None:
            return None
        props = tool.parameters["properties"]
        if len(props) == 1 and next(iter(props.values())).get("type") == "string":
            return {next(iter(props)): raw.strip('"')}
        return None

    def result_messages(self, action: Action, results: list[ToolResult]) -> list[dict[str, Any]]:
        if action.parse_error is not None:
            return [{"role": "user", "content": f"Observation: Error: could not parse the action: {action.parse_error}"}]
        text = "\n\n".join(r.text for r in results)
        return [{"role": "user", "content": f"Observation: {text}"}]
