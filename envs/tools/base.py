"""``Tool``: a function the model can call, with its JSON schema and a safe ``call``.

``@tool`` turns a plain (sync or async) function into a ``Tool``. The schema is
the OpenAI function format, derived from the signature, the type hints and a
Google-style docstring (first paragraph = description, ``Args:`` section =
parameter descriptions)::

    {"type": "function",
     "function": {"name": ..., "description": ...,
                  "parameters": {"type": "object", "properties": {...}, "required": [...]}}}

``Tool.call`` is a boundary: unknown or missing arguments, anything the
function raises (``BaseException`` included: ``SystemExit``,
``KeyboardInterrupt``, a ``CancelledError`` it raises itself) and a timeout
all come back as ``ToolResult(text="Error: ...", error=True)``; the actor
never crashes on a tool. The one thing that passes through is a real
cancellation of the calling task (``asyncio.current_task().cancelling()``),
which is how the actor's own shutdown arrives (``asyncio.run`` turns Ctrl-C
into it); a process that stops by raising ``SystemExit`` from a signal
handler while an async tool runs would see it swallowed, so stop by
cancelling the main task instead.

Output budget. The result text is cut to ``max_output_tokens`` tokens when a
``count_tokens(text) -> int`` callable is given (see ``token_counter``), else
to ``max_output_tokens * CHARS_PER_TOKEN`` characters (a rough, documented
fallback). The cut keeps the head and appends a ``[truncated N chars]`` marker
that is counted inside the budget. Cutting by characters is arithmetic; by
tokens it counts only prefixes of growing length (doubling from the budget's
character estimate) and then bisects the last step, so its cost grows with
what is kept, not with the size of the result (a 5 MB result is cut as fast
as a 50 KB one). Results longer than ``INLINE_TRUNCATE_CHARS`` are cut in a
worker thread, off the event loop.

Timeouts. Async functions are cancelled at the timeout. Sync functions run in
a worker thread; at the timeout the caller gets the error result at once, but
Python cannot kill the thread, so a sync tool that never returns keeps a
thread busy. Tools that may run away (``code_interpreter``) are async and kill
their own subprocess.

Inline tools. ``@tool(inline=True)`` marks a sync function that is pure and
bounded (fast, it cannot hang: ``calculator``, ``answer``): it runs on the
event loop itself, with the same argument checks, errors and truncation but
no thread and no timeout. A thread hop costs more than such a tool: in an
actor the engine's thread holds the GIL, and the worker thread, then the loop
again, each wait for it (bench_actor, traced: from the end of 125 episodes'
first turns to their second turns reaching the engine took ~55 ms before this
and the tokenizer-backend calls of ``actors.rollout``, ~20 ms after).
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

INLINE_TRUNCATE_CHARS = 16_384
"""Results longer than this are truncated in a worker thread, off the event loop."""


@dataclass
class Tool:
    """A callable tool. ``fn`` returns ``str`` (the observation) or a ``ToolResult``."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    inline: bool = False
    """Run ``fn`` (sync, pure and bounded: it cannot hang) on the event loop, without a thread or a timeout."""

    def __post_init__(self) -> None:
        if self.inline and inspect.iscoroutinefunction(self.fn):
            raise TypeError(f"tool '{self.name}': inline=True is for sync functions; an async one already runs on the loop")

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
        """Run the tool; never raises (errors and timeouts become error results) except when the
        calling task itself is cancelled."""
        problem = self._check_arguments(arguments)
        if problem is not None:
            result = ToolResult(text=f"Error: {problem}", error=True)
        elif self.inline:
            try:
                result = self._as_result(self.fn(**arguments))
            except BaseException as e:  # noqa: BLE001  boundary: the model sees the error
                result = self._error(e)
        else:
            try:
                result = await asyncio.wait_for(self._guarded(arguments), timeout=timeout_s)
            except asyncio.TimeoutError:
                result = ToolResult(text=f"Error: tool '{self.name}' timed out after {timeout_s:g} s", error=True)
        if len(result.text) > INLINE_TRUNCATE_CHARS:
            result.text = await asyncio.to_thread(truncate, result.text, max_output_tokens, count_tokens)
        else:
            result.text = truncate(result.text, max_output_tokens, count_tokens)
        return result

    async def _guarded(self, arguments: dict[str, Any]) -> ToolResult:
        # Runs as the task wait_for makes, so a SystemExit or KeyboardInterrupt is caught here,
        # inside that task: escaping it, asyncio would re-raise it out of the event loop.
        try:
            return await self._invoke(arguments)
        except asyncio.CancelledError as e:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # a real cancellation: the timeout above, or the caller's own task
            return self._error(e)  # raised by the tool itself
        except BaseException as e:  # noqa: BLE001  boundary: the model sees the error
            return self._error(e)

    def _error(self, e: BaseException) -> ToolResult:
        message = str(e)
        return ToolResult(text=f"Error: {type(e).__name__}: {message}" if message else f"Error: {type(e).__name__}", error=True)

    async def _invoke(self, arguments: dict[str, Any]) -> ToolResult:
        if inspect.iscoroutinefunction(self.fn):
            out = await self.fn(**arguments)
        else:
            out = await asyncio.to_thread(self.fn, **arguments)
        return self._as_result(out)

    @staticmethod
    def _as_result(out: Any) -> ToolResult:
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
        return _truncate_chars(text, max_output_tokens * CHARS_PER_TOKEN)
    return _truncate_tokens(text, max_output_tokens, count_tokens)


def _marker(text: str, keep: int) -> str:
    return TRUNCATION_MARKER.format(n=len(text) - keep)


def _truncate_chars(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    # keep + len(marker) grows with keep (the count loses a digit at most as keep gains one), so
    # the answer lies a few steps below the bound a one-digit count gives
    keep = min(len(text) - 1, limit - len(TRUNCATION_MARKER.format(n=1)))
    while keep >= 0 and keep + len(_marker(text, keep)) > limit:
        keep -= 1
    if keep < 0:
        return text[:limit]
    return text[:keep] + _marker(text, keep)


def _truncate_tokens(text: str, limit: int, count_tokens: Callable[[str], int]) -> str:
    def fits(n: int, marker: bool = True) -> bool:
        return count_tokens(text[:n] + (_marker(text, n) if marker else "")) <= limit

    def bisect(lo: int, hi: int, marker: bool) -> int:
        # largest n in [lo, hi) that fits, given fits(lo) and not fits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid, marker) else (lo, mid)
        return lo

    # Grow the head (doubling) until it no longer fits: only prefixes about twice the kept size are
    # ever counted, and the whole text only when the head reaches it.
    first = max(limit * CHARS_PER_TOKEN, 16)
    lo, step = None, first
    while step < len(text) and fits(step):
        lo, step = step, step * 2
    if step >= len(text) or count_tokens(text[:step]) <= limit:  # the whole text may fit without a marker
        if count_tokens(text) <= limit:
            return text
        step = min(step, len(text))  # text[:step] plus marker does not fit
    if lo is None:
        if not fits(0):  # not even the marker fits: the bare head, without one
            hi = min(first, len(text))
            return text[:hi] if fits(hi, marker=False) else text[: bisect(0, hi, marker=False)]
        lo = 0
    keep = bisect(lo, step, marker=True)
    return text[:keep] + _marker(text, keep)


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
    fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None, inline: bool = False
) -> Any:
    """Decorator: ``@tool`` or ``@tool(name="...")`` makes a ``Tool`` from a function; ``inline=True``
    for a sync function that is pure and bounded (see the module docstring).

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
            inline=inline,
        )

    return wrap(fn) if fn is not None else wrap
