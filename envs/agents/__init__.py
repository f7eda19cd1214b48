"""Agent types and the ``make_agent`` factory.

``AGENT_TYPES`` maps a type name to its class; a new agent type is one class
plus one line here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from envs.agents.chat import ChatAgent
from envs.agents.code import CodeAgent
from envs.agents.external import ExternalAgent
from envs.agents.hf import HFAgent
from envs.agents.react import ReActAgent
from envs.base import Agent
from envs.tools.base import Tool

if TYPE_CHECKING:
    from configs.schema import RelayConfig

AGENT_TYPES: dict[str, type[ChatAgent]] = {
    "hf": HFAgent,
    "react": ReActAgent,
    "code": CodeAgent,
    "external": ExternalAgent,
}


def make_agent(
    agent_type: str,
    tokenizer: Any,
    tools: list[Tool],
    template: str | None = None,
    system_prompt: str | None = None,
    prompt_key: str = "question",
) -> Agent:
    """An agent of ``agent_type`` rendering with ``template`` (default: the tokenizer's own).

    ``prompt_key`` is the dataset field holding the question.
    """
    try:
        cls = AGENT_TYPES[agent_type]
    except KeyError:
        raise KeyError(f"unknown agent type '{agent_type}'; known: {sorted(AGENT_TYPES)}") from None
    return cls(tokenizer, tools, template=template, system_prompt=system_prompt, prompt_key=prompt_key)


def agent_for_config(cfg: RelayConfig, tokenizer: Any) -> Agent:
    """The agent ``cfg`` describes (``agent.*`` with its tools built with their
    ``agent.tool_configs`` options, ``data.prompt_key``): the one place actors, the learner's
    prompt-length filter and the launcher's checks build it, so all render alike."""
    return make_agent(
        cfg.agent.agent_type,
        tokenizer,
        tools_for_config(cfg),
        template=cfg.agent.template,
        system_prompt=cfg.agent.system_prompt,
        prompt_key=cfg.data.prompt_key,
    )


def tools_for_config(cfg: RelayConfig) -> list[Tool]:
    """The tools ``agent.tools`` names, built with their ``agent.tool_configs`` options; ``mcp:NAME``
    stands for every tool of the MCP server ``agent.mcp_servers.NAME``."""
    from envs.tools import TOOL_ALIASES, get_tool
    from envs.tools.mcp import MCP_PREFIX, McpServerSpec, mcp_tools

    def options(name: str) -> dict[str, Any]:
        configs = cfg.agent.tool_configs
        return configs.get(name, configs.get(TOOL_ALIASES.get(name, name), {}))

    tools: list[Tool] = []
    for name in cfg.agent.tools:
        if name.startswith(MCP_PREFIX):
            server = name[len(MCP_PREFIX):]
            if server not in cfg.agent.mcp_servers:
                raise KeyError(f"agent.tools: '{name}' names no MCP server; configured: {sorted(cfg.agent.mcp_servers)} "
                               f"(set agent.mcp_servers.{server}.command=... or .url=...)")
            tools += mcp_tools(McpServerSpec.from_options(server, **cfg.agent.mcp_servers[server].model_dump()))
        else:
            tools.append(get_tool(name, **options(name)))
    seen: set[str] = set()
    for t in tools:
        if t.name in seen:
            raise ValueError(f"agent.tools: two tools are named '{t.name}' (an MCP server's tool and another)")
        seen.add(t.name)
    return tools


__all__ = ["AGENT_TYPES", "ChatAgent", "CodeAgent", "ExternalAgent", "HFAgent", "ReActAgent", "agent_for_config", "make_agent",
           "tools_for_config"]
