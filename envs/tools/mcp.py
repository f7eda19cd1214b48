"""MCP servers as tools: ``agent.tools=[mcp:NAME]`` with ``agent.mcp_servers.NAME.command`` / ``.url``.

Every tool the server lists becomes a Relay ``Tool`` with the server's name,
description and input schema, so calls have the built-ins' timeouts
(``agent.tool_timeout_s``), output limits (``agent.tool_max_output_tokens``)
and error observations (``Tool.call``). A result the server marks
``is_error`` is an error observation (``Error: ...``); text content blocks are
joined, structured content without text is shown as JSON, other blocks
(images, resources) as a one-line placeholder.

Transports (through the ``mcp`` SDK, 2.x): ``command`` starts a stdio server
(argv list, or one string split like a shell would), ``url`` connects to a
streamable-HTTP server. A stdio server gets the SDK's default environment (a
few variables such as ``HOME`` and ``PATH``, not the actor's whole
environment) plus ``env``. Lifetime: the tool list is read once per process when
the agent is built (a short connection, so the learner and the launcher's
checks render the same tool schemas as the actors); an actor connects on its
first call and keeps the connection in its event loop until
``close_mcp_servers()`` (the actor's shutdown). A stdio server is a child of
the actor and also exits on its own when the actor dies (its stdin closes).
"""

from __future__ import annotations

import asyncio
import json
import shlex
import threading
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from envs.base import ToolResult
from envs.tools.base import Tool

MCP_PREFIX = "mcp:"


@dataclass(frozen=True)
class McpServerSpec:
    """Where an MCP server is: ``command`` (stdio) or ``url`` (streamable HTTP)."""

    name: str
    command: tuple[str, ...] = ()
    url: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    startup_timeout_s: float = 30.0

    @staticmethod
    def from_options(name: str, command: str | list[str] | None = None, url: str | None = None,
                     env: dict[str, str] | None = None, cwd: str | None = None, startup_timeout_s: float = 30.0) -> "McpServerSpec":
        argv = tuple(shlex.split(command) if isinstance(command, str) else (command or ()))
        if bool(argv) == bool(url):
            raise ValueError(f"MCP server '{name}': give exactly one of command (stdio) or url (streamable HTTP)")
        return McpServerSpec(name, argv, url, tuple(sorted((env or {}).items())), cwd, startup_timeout_s)

    def describe(self) -> str:
        return self.url or shlex.join(self.command)


def result_text(result: Any) -> ToolResult:
    """A ``CallToolResult`` as the observation the model sees."""
    parts = []
    for block in result.content or []:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        else:
            parts.append(f"[{kind or type(block).__name__} content]")
    text = "\n".join(parts)
    if not text and result.structured_content is not None:
        text = json.dumps(result.structured_content)
    if result.is_error:
        return ToolResult(text=f"Error: {text}" if text else "Error: the tool failed", error=True)
    return ToolResult(text=text)


class McpServer:
    """One MCP server for this process, connected in one event loop (see module docstring)."""

    def __init__(self, spec: McpServerSpec):
        self.spec = spec
        self.session = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._stop: asyncio.Event | None = None
        self._ready: asyncio.Future | None = None
        self._lock: asyncio.Lock | None = None
        self.calls = 0

    def _transport(self):
        if self.spec.url:
            from mcp.client.streamable_http import streamable_http_client

            return streamable_http_client(self.spec.url)
        from mcp.client.stdio import StdioServerParameters, stdio_client

        params = StdioServerParameters(command=self.spec.command[0], args=list(self.spec.command[1:]),
                                       env=dict(self.spec.env) or None, cwd=self.spec.cwd)
        return stdio_client(params)

    async def _serve(self) -> None:
        from mcp import ClientSession

        try:
            async with AsyncExitStack() as stack:
                read, write = await stack.enter_async_context(self._transport())
                session = await stack.enter_async_context(ClientSession(read, write))
                await session.initialize()
                self.session = session
                self._ready.set_result(session)
                await self._stop.wait()
        except BaseException as e:
            if not self._ready.done():
                self._ready.set_exception(e)
            if not isinstance(e, (asyncio.CancelledError, Exception)):
                raise
        finally:
            self.session = None

    async def connect(self):
        """The open session, connecting first if needed (in the running loop)."""
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise RuntimeError(f"MCP server '{self.spec.name}' is connected in another event loop")
        if self._lock is None:
            self._loop, self._lock = loop, asyncio.Lock()
        async with self._lock:
            if self._task is None or self._task.done():
                self._stop, self._ready = asyncio.Event(), loop.create_future()
                self._task = loop.create_task(self._serve(), name=f"mcp-{self.spec.name}")
            try:
                return await asyncio.wait_for(asyncio.shield(self._ready), timeout=self.spec.startup_timeout_s)
            except asyncio.TimeoutError:
                await self.close()
                raise TimeoutError(f"MCP server '{self.spec.name}' ({self.spec.describe()}) did not start within "
                                   f"{self.spec.startup_timeout_s:g} s") from None
            except Exception as e:
                self._task = None
                cause = _first_leaf(e)
                raise RuntimeError(f"MCP server '{self.spec.name}' ({self.spec.describe()}) failed to start: "
                                   f"{type(cause).__name__}: {cause} (its stderr is in this process's log)") from e

    async def list_tools(self) -> list[Any]:
        session = await self.connect()
        tools, cursor = [], None
        while True:
            page = await session.list_tools(params=None if cursor is None else _page(cursor))
            tools += page.tools
            cursor = getattr(page, "next_cursor", None)
            if not cursor:
                return tools

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolResult:
        session = await self.connect()
        self.calls += 1
        return result_text(await session.call_tool(name, arguments))

    async def close(self) -> None:
        if self._task is None:
            return
        task, self._task = self._task, None
        self._stop.set()
        try:
            await asyncio.wait_for(task, timeout=self.spec.startup_timeout_s)
        except asyncio.TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._loop = self._lock = None


def _first_leaf(e: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups, as anyio task groups raise them."""
    while getattr(e, "exceptions", None):
        e = e.exceptions[0]
    return e


def _page(cursor: str):
    from mcp import types

    return types.PaginatedRequestParams(cursor=cursor)


_SERVERS: dict[McpServerSpec, McpServer] = {}
_SCHEMAS: dict[McpServerSpec, list[dict[str, Any]]] = {}
_GUARD = threading.Lock()


def server_for(spec: McpServerSpec) -> McpServer:
    with _GUARD:
        if spec not in _SERVERS:
            _SERVERS[spec] = McpServer(spec)
        return _SERVERS[spec]


def list_tool_schemas(spec: McpServerSpec) -> list[dict[str, Any]]:
    """``[{name, description, parameters}]`` of the server's tools, read once per process (a short
    connection of its own, in a thread, so it works whether or not an event loop is running)."""
    with _GUARD:
        if spec in _SCHEMAS:
            return _SCHEMAS[spec]

    async def read() -> list[dict[str, Any]]:
        server = McpServer(spec)
        try:
            return [
                {"name": t.name, "description": t.description or "", "parameters": dict(t.input_schema or {"type": "object"})}
                for t in await server.list_tools()
            ]
        finally:
            await server.close()

    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["tools"] = asyncio.run(read())
        except BaseException as e:  # noqa: BLE001  re-raised in the caller's thread
            out["error"] = e

    t = threading.Thread(target=run, name=f"mcp-list-{spec.name}", daemon=True)
    t.start()
    t.join(timeout=2 * spec.startup_timeout_s + 5)
    if t.is_alive():
        raise TimeoutError(f"MCP server '{spec.name}' ({spec.describe()}): listing its tools took over {2 * spec.startup_timeout_s + 5:g} s")
    if "error" in out:
        raise out["error"]
    with _GUARD:
        _SCHEMAS[spec] = out["tools"]
    return out["tools"]


def mcp_tools(spec: McpServerSpec) -> list[Tool]:
    """The server's tools as Relay tools; calling one connects (once) in the running loop."""
    server = server_for(spec)
    tools = []
    for schema in list_tool_schemas(spec):
        parameters = dict(schema["parameters"])
        parameters.setdefault("type", "object")
        tools.append(Tool(name=schema["name"], description=schema["description"], parameters=parameters,
                          fn=_caller(server, schema["name"])))
    return tools


def _caller(server: McpServer, name: str):
    async def call(**arguments: Any) -> ToolResult:
        return await server.call(name, arguments)

    call.__name__ = f"mcp_{name}"
    return call


async def close_mcp_servers() -> None:
    """Stop every MCP server this process connected to (the actor's shutdown)."""
    with _GUARD:
        servers = list(_SERVERS.values())
    for s in servers:
        await s.close()
