"""Tools the model can call: ``@tool``, the registry, and the built-ins.

Built-ins: ``calculator``, ``answer`` (ends the episode through
``ToolResult.final_answer``), ``code_interpreter`` (alias ``python_executor``),
``search`` (alias ``google_search``).
"""

from envs.tools.base import CHARS_PER_TOKEN, Tool, token_counter, tool, truncate
from envs.tools.builtin import answer, calculator
from envs.tools.code import make_code_interpreter
from envs.tools.registry import TOOL_ALIASES, get_tool, register_tool, register_tool_factory, registered_tools
from envs.tools.search import make_search

register_tool(calculator)
register_tool(answer)
register_tool_factory("code_interpreter", make_code_interpreter)
register_tool_factory("search", make_search)

__all__ = [
    "CHARS_PER_TOKEN",
    "TOOL_ALIASES",
    "Tool",
    "answer",
    "calculator",
    "get_tool",
    "make_code_interpreter",
    "make_search",
    "register_tool",
    "register_tool_factory",
    "registered_tools",
    "token_counter",
    "tool",
    "truncate",
]
