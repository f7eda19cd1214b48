"""Agent type ``code``: the model writes fenced Python; the code interpreter runs it.

Each ```` ```python ```` (or ```` ```py ````) block in a turn is joined, in order,
into one program, sent as one ``code_interpreter`` call (a fresh process per
turn: nothing persists between turns). The output returns as a user message
``Output:\\n<text>``. A turn without a code block is final; its text is the
final answer. The agent needs a tool named ``code_interpreter`` among its tools.
"""

from __future__ import annotations

import re
from typing import Any

from envs.agents.chat import ChatAgent
from envs.base import Action, ToolCall, ToolResult

_CODE_BLOCK = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.DOTALL)

CODE_INSTRUCTIONS = """\
You can run Python. To run code, write it in a fenced block:

```python
print(1 + 1)
```

Its printed output will be shown to you. Each block runs in a fresh process; print what you need.
When you are done, reply without a code block and give the final answer."""


class CodeAgent(ChatAgent):
    schemas_in_template = False

    def __init__(self, tokenizer: Any, tools: list, **kwargs: Any) -> None:
        if not any(t.name == "code_interpreter" for t in tools):
            raise ValueError("the code agent needs the code_interpreter tool in its tools")
        super().__init__(tokenizer, tools, **kwargs)

    def build_system_prompt(self, system_prompt: str | None) -> str:
        return f"{system_prompt}\n\n{CODE_INSTRUCTIONS}" if system_prompt else CODE_INSTRUCTIONS

    def parse(self, text: str) -> Action:
        blocks = _CODE_BLOCK.findall(text)
        if not blocks:
            if re.search(r"```(?:python|py)[ \t]*\n", text):
                return Action(parse_error="unclosed ```python block")
            return Action(final_answer=text.strip())
        code = "\n".join(b.rstrip("\n") for b in blocks) + "\n"
        return Action(tool_calls=[ToolCall(name="code_interpreter", arguments={"code": code})])

    def result_messages(self, action: Action, results: list[ToolResult]) -> list[dict[str, Any]]:
        if action.parse_error is not None:
            return [{"role": "user", "content": f"Output:\nError: {action.parse_error}"}]
        return [{"role": "user", "content": "Output:\n" + "\n".join(r.text for r in results)}]
