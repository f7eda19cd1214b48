"""``ChatAgent``: what every chat-template agent shares (start, prompt, appending observations).

Subclasses say how a turn is parsed (``parse``), which messages carry the tool
results (``result_messages``), and whether tool schemas go to the chat
template (``schemas_in_template``) or into the system prompt text.
"""

from __future__ import annotations

import abc
from typing import Any

from envs.base import Action, Agent, Conversation, ToolResult
from envs.templates import make_render, observation_delta, stop_strings_for
from envs.tools.base import Tool


class ChatAgent(Agent):
    schemas_in_template: bool = False

    def __init__(
        self,
        tokenizer: Any,
        tools: list[Tool],
        template: str | None = None,
        system_prompt: str | None = None,
        prompt_key: str = "question",
    ) -> None:
        self.tools = {t.name: t for t in tools}
        self.prompt_key = prompt_key
        self.system_prompt = self.build_system_prompt(system_prompt)
        schemas = [t.schema for t in tools] if self.schemas_in_template else None
        self._render = make_render(tokenizer, template, schemas)
        self._stop_strings = stop_strings_for(tokenizer, template)

    def build_system_prompt(self, system_prompt: str | None) -> str | None:
        """The system message text (``None``: no system message; the template may add its default)."""
        return system_prompt

    def start(self, row: dict[str, Any]) -> Conversation:
        prompt = row[self.prompt_key]  # text, or a chat list (verl's `prompt`; see envs.data)
        messages: list[dict[str, Any]] = (
            [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        )
        if self.system_prompt is not None:
            if messages[0]["role"] == "system":  # the agent's instructions, then the row's own
                messages[0] = {"role": "system", "content": f"{self.system_prompt}\n\n{messages[0]['content']}"}
            else:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
        return Conversation(messages=messages, row=row)

    def prompt_text(self, conv: Conversation) -> str:
        return self._render(conv.messages, True)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self._stop_strings

    def observation_text(self, conv: Conversation, action: Action, results: list[ToolResult]) -> str:
        new = self.result_messages(action, results)
        delta = observation_delta(self._render, conv.messages, new, self._stop_strings[0])
        conv.messages.extend(new)
        return delta

    @abc.abstractmethod
    def result_messages(self, action: Action, results: list[ToolResult]) -> list[dict[str, Any]]:
        """The messages that carry ``results`` (or ``action.parse_error``) back to the model."""
