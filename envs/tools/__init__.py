"""Tools the model can call: ``@tool``, the registry, and the built-ins.

Built-ins: ``calculator``, ``answer`` (ends the episode through
``ToolResult.final_answer``), ``code_interpreter`` (alias ``python_executor``),
``search`` (alias ``google_search``).
"""

from envs.tools.base import CHARS_PER_TOKEN, Tool, token_counter, tool, truncate
from envs.tools.builtin import answer, calculator
from envs.tools.registry import TOOL_ALIASES, get_tool, register_tool, registered_tools

register_tool(calculator)
register_tool(answer)

__all__ = [
    "CHARS_PER_TOKEN",
    "TOOL_ALIASES",
    "Tool",
    "answer",
    "calculator",
    "get_tool",
    "register_tool",
    "registered_tools",
    "token_counter",
    "tool",
    "truncate",
]
