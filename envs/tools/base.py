"""``Tool``: a function the model can call, with its JSON schema and a safe ``call``.

``@tool`` turns a plain (sync or async) function into a ``Tool``. The schema is
the OpenAI function format, derived from the signature, the type hints and a
Google-style docstring (first paragraph = description, ``Args:`` section =
parameter descriptions)::

    {"type": "function",
     "function": {"name": ..., "description": ...,
                  "parameters": {"type": "object", "properties": {...}, "required": [...]}}}

``Tool.call`` is a boundary: unknown or missing arguments, any exception raised
by the function, and a timeout all come back as
``ToolResult(text="Error: ...", error=True)``; the actor never crashes on a tool.

Output budget. The result text is cut to ``max_output_tokens`` tokens when a
``count_tokens(text) -> int`` callable is given (see ``token_counter``), else
to ``max_output_tokens * CHARS_PER_TOKEN`` characters (a rough, documented
fallback). The cut keeps the head and appends a ``[truncated N chars]`` marker
that is counted inside the budget.

Timeouts. Async functions are cancelled at the timeout. Sync functions run in
a worker thread; at the timeout the caller gets the error result at once, but
Python cannot kill the thread, so a sync tool that never returns keeps a
thread busy. Tools that may run away (``code_interpreter``) are async and kill
their own subprocess.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Literal

from envs.base import ToolResult

CHARS_PER_TOKEN = 4
"""Character budget per token when no ``count_tokens`` is given."""

TRUNCATION_MARKER = "\n[truncated {n} chars]"


@dataclass
class Tool:
    """A callable tool. ``fn`` returns ``str`` (the observation) or a ``ToolResult``."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]

    @property
    def schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    async def call(
        self,
        arguments: dict[str, Any],
        *,
        timeout_s: float,
        max_output_tokens: int,
        count_tokens: Callable[[str], int] | None = None,
    ) -> ToolResult:
        """Run the tool; never raises (errors and timeouts become error results)."""
        problem = self._check_arguments(arguments)
        if problem is not None:
            result = ToolResult(text=f"Error: {problem}", error=True)
        else:
            try:
                result = await asyncio.wait_for(self._invoke(arguments), timeout=timeout_s)
            except asyncio.TimeoutError:
                result = ToolResult(text=f"Error: tool '{self.name}' timed out after {timeout_s:g} s", error=True)
            except Exception as e:  # boundary: the model sees the error
                result = ToolResult(text=f"Error: {type(e).__name__}: {e}", error=True)
        result.text = truncate(result.text, max_output_tokens, count_tokens)
        return result

    async def _invoke(self, arguments: dict[str, Any]) -> ToolResult:
        if inspect.iscoroutinefunction(self.fn):
            out = await self.fn(**arguments)
        else:
            out = await asyncio.to_thread(self.fn, **arguments)
        if isinstance(out, ToolResult):
            return out
        return ToolResult(text=out if isinstance(out, str) else str(out))

    def _check_arguments(self, arguments: Any) -> str | None:
        if not isinstance(arguments, dict):
            return f"arguments for '{self.name}' must be a JSON object, got {type(arguments).__name__}"
        props = self.parameters.get("properties", {})
        unknown = sorted(set(arguments) - set(props))
        if unknown:
            return f"unknown argument(s) {unknown} for '{self.name}'; expected {sorted(props)}"
        missing = [p for p in self.parameters.get("required", []) if p not in arguments]
        if missing:
            return f"missing required argument(s) {missing} for '{self.name}'"
        return None


def truncate(text: str, max_output_tokens: int, count_tokens: Callable[[str], int] | None = None) -> str:
    """Cut ``text`` to the budget (tokens with ``count_tokens``, else characters; see module doc).

    The kept head plus the marker fit the budget; when even the marker alone
    does not fit, the head is cut to the budget without a marker.
    """
    if count_tokens is None:
        limit = max_output_tokens * CHARS_PER_TOKEN
        size = len
    else:
        limit = max_output_tokens
        size = count_tokens
    if size(text) <= limit:
        return text

    def longest_head(with_marker: bool) -> int:
        # Largest head length (characters) whose text (plus marker) fits; -1 when none does.
        def fits(n: int) -> bool:
            marker = TRUNCATION_MARKER.format(n=len(text) - n) if with_marker else ""
            return size(text[:n] + marker) <= limit

        lo, hi = -1, len(text) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    keep = longest_head(with_marker=True)
    if keep >= 0:
        return text[:keep] + TRUNCATION_MARKER.format(n=len(text) - keep)
    return text[: max(longest_head(with_marker=False), 0)]


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    """``count_tokens`` for a Hugging Face tokenizer (no special tokens added)."""
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


# ----------------------------------------------------------------------------- schema

_SIMPLE_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


def _json_type(hint: Any) -> dict[str, Any]:
    """JSON schema for one type hint; ``X | None`` is treated as ``X``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _json_type(non_none[0])
        return {"anyOf": [_json_type(a) for a in non_none]}
    if origin is Literal:
        return {"type": _SIMPLE_TYPES[type(args[0])], "enum": list(args)}
    if origin in (list, tuple, set, typing.Sequence) or hint in (list, tuple):
        out: dict[str, Any] = {"type": "array"}
        if args and args[0] is not Ellipsis:
            out["items"] = _json_type(args[0])
        return out
    if origin is dict or hint is dict:
        return {"type": "object"}
    if hint in _SIMPLE_TYPES:
        return {"type": _SIMPLE_TYPES[hint]}
    if hint is Any or hint is inspect.Parameter.empty:
        return {}
    raise TypeError(f"cannot express type hint {hint!r} as JSON schema")


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {param: description}) from a Google-style docstring."""
    if not doc:
        return "", {}
    doc = inspect.cleandoc(doc)
    sections = re.split(r"\n\s*(?=(?:Args|Arguments|Parameters|Returns|Raises):\s*\n)", doc)
    description = sections[0].strip()
    params: dict[str, str] = {}
    for section in sections[1:]:
        header, _, body = section.partition("\n")
        if header.strip().rstrip(":") not in ("Args", "Arguments", "Parameters"):
            continue
        current = None
        for line in body.splitlines():
            m = re.match(r"\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)", line)
            if m and (current is None or len(line) - len(line.lstrip()) <= indent):
                current, indent = m.group(1), len(line) - len(line.lstrip())
                params[current] = m.group(2).strip()
            elif current is not None and line.strip():
                params[current] = (params[current] + " " + line.strip()).strip()
    return description, params


def schema_parameters(fn: Callable[..., Any], param_docs: dict[str, str]) -> dict[str, Any]:
    """The ``parameters`` object for ``fn``'s signature."""
    hints = typing.get_type_hints(fn)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"tool function {fn.__name__} may not take *args/**kwargs")
        prop = _json_type(hints.get(name, inspect.Parameter.empty))
        if name in param_docs:
            prop["description"] = param_docs[name]
        properties[name] = prop
        if p.default is p.empty:
            required.append(name)
    return {"type": "object", "properties": properties, "required": required}


def tool(
    fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None
) -> Any:
    """Decorator: ``@tool`` or ``@tool(name="...")`` makes a ``Tool`` from a function.

    The decorated name is bound to the ``Tool`` (call the original with ``.fn``).
    It does not register the tool; use ``register_tool`` for that.
    """

    def wrap(f: Callable[..., Any | Awaitable[Any]]) -> Tool:
        doc_description, param_docs = _parse_docstring(f.__doc__)
        return Tool(
            name=name or f.__name__,
            description=description if description is not None else doc_description,
            parameters=schema_parameters(f, param_docs),
            fn=f,
        )

    return wrap(fn) if fn is not None else wrap
