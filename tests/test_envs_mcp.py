"""MCP servers as tools: a small stdio server written here, listed and called through the mcp SDK.

The server's tools become Relay tools with their schemas; calls go through
``Tool.call`` (same timeout, output limit and error observations as built-in
tools); an ``hf`` agent rolls out an episode that calls one; the server
process is stopped by ``close_mcp_servers``.
"""

import asyncio
import json
import sys
import textwrap

import pytest

pytest.importorskip("mcp.server.mcpserver")

from envs.tools.mcp import McpServerSpec, close_mcp_servers, mcp_tools, server_for

SERVER = textwrap.dedent('''
    import asyncio, os
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    server = MCPServer("relay-test")

    @server.tool()
    def multiply(a: int, b: int) -> str:
        """Multiply two integers."""
        return str(a * b)

    @server.tool()
    def fail(reason: str) -> str:
        """Always fails."""
        raise ToolError(reason)

    @server.tool()
    async def slow(seconds: float) -> str:
        """Sleeps."""
        await asyncio.sleep(seconds)
        return "done"

    @server.tool()
    def big(n: int) -> str:
        """A long output."""
        return "x" * n

    @server.tool()
    def pid() -> str:
        """The server's process id."""
        return str(os.getpid())

    if __name__ == "__main__":
        server.run("stdio")
''')


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "server.py"
    path.write_text(SERVER)
    return McpServerSpec.from_options("test", command=[sys.executable, str(path)], startup_timeout_s=60)


def test_server_tools_become_relay_tools_with_the_builtins_limits(spec):
    tools = {t.name: t for t in mcp_tools(spec)}
    assert set(tools) == {"multiply", "fail", "slow", "big", "pid"}
    schema = tools["multiply"].schema["function"]
    assert schema["description"] == "Multiply two integers."
    assert set(schema["parameters"]["properties"]) == {"a", "b"} and sorted(schema["parameters"]["required"]) == ["a", "b"]

    async def go():
        try:
            ok = await tools["multiply"].call({"a": 12, "b": 3}, timeout_s=30, max_output_tokens=64)
            failed = await tools["fail"].call({"reason": "no"}, timeout_s=30, max_output_tokens=64)
            missing = await tools["multiply"].call({"a": 1}, timeout_s=30, max_output_tokens=64)
            late = await tools["slow"].call({"seconds": 30}, timeout_s=0.5, max_output_tokens=64)
            big = await tools["big"].call({"n": 5000}, timeout_s=30, max_output_tokens=10)
            again = await tools["multiply"].call({"a": 2, "b": 2}, timeout_s=30, max_output_tokens=64)
            pid = int((await tools["pid"].call({}, timeout_s=30, max_output_tokens=64)).text)
            return ok, failed, missing, late, big, again, pid
        finally:
            await close_mcp_servers()

    ok, failed, missing, late, big, again, pid = asyncio.run(go())
    assert (ok.text, ok.error) == ("36", False)
    assert failed.error and failed.text == "Error: Error executing tool fail: no"  # the server's is_error result
    assert missing.error and "missing required argument" in missing.text
    assert late.error and "timed out after 0.5 s" in late.text
    assert len(big.text) <= 40 and "[truncated" in big.text
    assert again.text == "4"  # the connection survived a timed-out call
    assert server_for(spec).session is None  # closed
    import os

    with pytest.raises(ProcessLookupError):  # the server process is gone
        for _ in range(100):
            os.kill(pid, 0)
            import time

            time.sleep(0.1)


def test_an_agent_episode_calls_an_mcp_tool(spec, tiny_model_dir):
    """The hf agent with the server's tools, through the real rollout loop."""
    from transformers import AutoTokenizer

    from actors.engines.base import SamplingSettings
    from actors.engines.scripted import ScriptedEngine
    from actors.rollout import EpisodeLimits, ToolBox, run_episode
    from envs import make_agent

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tools = mcp_tools(spec)
    agent = make_agent("hf", tok, tools)
    call = "<tool_call>" + json.dumps({"name": "multiply", "arguments": {"a": 12, "b": 3}}) + "</tool_call>"
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    engine = ScriptedEngine(tok, [call, "36"], stop)
    limits = EpisodeLimits(max_turns=4, max_tokens_per_turn=64, max_response_tokens=400, max_context=2048)

    async def go():
        try:
            return await run_episode(engine, agent, tok, ToolBox(tools, 30, 64, None), {"question": "12*3?"}, limits,
                                     SamplingSettings(max_tokens=64, stop_token_ids=(stop,)))
        finally:
            await close_mcp_servers()

    ep = asyncio.run(go())
    assert ep.tool_calls == ["multiply"] and ep.tool_errors == 0 and ep.final_answer == "36"
    assert "<tool_response>\n36\n</tool_response>" in tok.decode(ep.response_ids)


def test_config_names_a_missing_server():
    from configs.schema import RelayConfig
    from envs.agents import tools_for_config

    cfg = RelayConfig.model_validate({"agent": {"tools": ["mcp:nope"]}})
    with pytest.raises(KeyError, match="names no MCP server"):
        tools_for_config(cfg)
    with pytest.raises(ValueError, match="exactly one of command"):
        RelayConfig.model_validate({"agent": {"mcp_servers": {"x": {}}}})
