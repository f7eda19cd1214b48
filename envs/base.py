"""The agent-surface contract: what the actor's rollout loop calls.

The rollout loop (``actors/rollout.py``) owns tokens; envs own text. One
episode goes:

    conv = agent.start(row)                       # messages for one dataset row
    ids  = tokenizer(agent.prompt_text(conv))     # tokenized once
    loop up to max_turns:
        gen    = engine.generate(ids)             # sampled ids (mask 1)
        action = agent.parse(text of gen)         # tool calls or a final answer
        agent.add_assistant(conv, text)
        if action.final: break
        results = [await tools.call(c) for c in action.tool_calls]
        obs  = agent.observation_text(conv, action, results)   # appends messages
        ids += tokenizer(obs)                     # observation ids (mask 0)

``observation_text`` returns exactly the text that follows the sampled
assistant tokens (which end with the stop token) up to and including the next
assistant header, so earlier tokens are never re-tokenized.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    """One tool invocation the model asked for."""

    name: str
    arguments: dict[str, Any]
    call_id: str = ""


@dataclass
class ToolResult:
    """What a tool returned; errors are results too (the model sees them)."""

    text: str
    error: bool = False
    final_answer: str | None = None
    """Set by tools that end the episode (``answer``)."""


@dataclass
class Action:
    """The parsed meaning of one assistant turn."""

    tool_calls: list[ToolCall] = field(default_factory=list)
    final_answer: str | None = None
    parse_error: str | None = None

    @property
    def final(self) -> bool:
        """No tool call and nothing unparseable: the turn answers. A parse error is not final:
        the agent shows the model the error as an observation."""
        return not self.tool_calls and self.parse_error is None


@dataclass
class Conversation:
    """Chat messages of one episode (OpenAI-style dicts) plus the dataset row."""

    messages: list[dict[str, Any]]
    row: dict[str, Any]
    seen: tuple[int, str] | None = None
    """``(n, text)``: the text the model has been shown for ``messages[:n]`` (the prompt's render, each
    assistant turn with its stop string, each observation), kept by ``ChatAgent``; None: not known."""


class Agent(abc.ABC):
    """Turn logic of one agent type (``hf``, ``react``, ``code``). Stateless across episodes."""

    tools: dict[str, Any]
    """The tools it offers the model, by name (``envs.tools.Tool``)."""

    @abc.abstractmethod
    def start(self, row: dict[str, Any]) -> Conversation:
        """The opening messages (system prompt with tools, user question) for ``row``."""

    @abc.abstractmethod
    def prompt_text(self, conv: Conversation) -> str:
        """The full prompt text, ending with the assistant header."""

    @abc.abstractmethod
    def parse(self, text: str) -> Action:
        """Read one assistant turn (decoded, without the stop token)."""

    def add_assistant(self, conv: Conversation, text: str) -> None:
        conv.messages.append({"role": "assistant", "content": text})

    @abc.abstractmethod
    def observation_text(self, conv: Conversation, action: Action, results: list[ToolResult]) -> str:
        """Append the tool messages to ``conv``; return the text to add after the sampled tokens."""

    @property
    @abc.abstractmethod
    def stop_strings(self) -> tuple[str, ...]:
        """Tokens (as text) that end an assistant turn, e.g. ``<|im_end|>``."""
