"""Tool registry: names (and aliases) to ``Tool`` objects; dotted paths for user tools.

``get_tool`` resolves, in order: the alias table ``TOOL_ALIASES``; the registry
(built-in tools register themselves when ``envs.tools`` is imported); a dotted
path ``my_pkg.my_tools:my_tool``, ``my_pkg.my_tools.my_tool`` or ``path/to/file.py:my_tool`` naming a
``Tool`` (or a plain function, which is wrapped with ``@tool``).
"""

from __future__ import annotations

from typing import Any, Callable

from envs.plugins import is_spec, load_object
from envs.tools.base import Tool, tool

TOOL_ALIASES: dict[str, str] = {
    "python_executor": "code_interpreter",
    "python": "code_interpreter",
    "google_search": "search",
}
"""Other frameworks' names for our built-in tools (AgentFly, verl, prime-rl configs)."""

_REGISTRY: dict[str, Tool] = {}
_FACTORIES: dict[str, Callable[..., Tool]] = {}


def register_tool(t: Tool, *, name: str | None = None) -> Tool:
    """Add ``t`` under ``name`` (default ``t.name``); re-registering a name is an error."""
    key = name or t.name
    if key in _FACTORIES or (key in _REGISTRY and _REGISTRY[key] is not t):
        raise ValueError(f"tool name '{key}' is already registered")
    if key in TOOL_ALIASES:
        raise ValueError(f"tool name '{key}' is an alias of '{TOOL_ALIASES[key]}'")
    _REGISTRY[key] = t
    return t


def register_tool_factory(name: str, factory: Callable[..., Tool]) -> None:
    """Register a tool that needs options (``search`` needs a corpus): ``factory(**options) -> Tool``."""
    if name in _REGISTRY or name in _FACTORIES or name in TOOL_ALIASES:
        raise ValueError(f"tool name '{name}' is already registered")
    _FACTORIES[name] = factory


def registered_tools() -> list[str]:
    return sorted([*_REGISTRY, *_FACTORIES])


def get_tool(name: str, **options: Any) -> Tool:
    """The ``Tool`` for a registered name, an alias, or a dotted path.

    ``options`` go to a factory-registered tool (``get_tool("search", corpus="c.jsonl")``,
    ``get_tool("code_interpreter", wall_s=5)``); plain tools take none.
    """
    key = TOOL_ALIASES.get(name, name)
    if key in _FACTORIES:
        return _FACTORIES[key](**options)
    if options:
        raise TypeError(f"tool '{name}' takes no options, got {sorted(options)}")
    if key in _REGISTRY:
        return _REGISTRY[key]
    if is_spec(key):  # path/to/file.py:name or package.module:name (envs.plugins)
        obj = load_object(key)
        if isinstance(obj, Tool):
            return obj
        if callable(obj):
            return tool(obj)
        raise TypeError(f"'{name}' is a {type(obj).__name__}, not a Tool or function")
    raise KeyError(f"unknown tool '{name}'; registered: {registered_tools()}, aliases: {sorted(TOOL_ALIASES)}")
