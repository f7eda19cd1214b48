"""``ChatAgent``: what every chat-template agent shares (start, prompt, appending observations).

Subclasses say how a turn is parsed (``parse``), which messages carry the tool
results (``result_messages``), and whether tool schemas go to the chat
template (``schemas_in_template``) or into the system prompt text.
"""

from __future__ import annotations

import abc
from typing import Any

from envs.base import Action, Agent, Conversation, ToolResult
from envs.lru import SizedLRU
from envs.templates import get_template, make_render, observation_delta, stop_strings_for
from envs.tools.base import Tool

RENDER_CACHE_BYTES = 16 << 20
"""Per agent, the budget of kept renders (``ChatAgent._render_cached``): each conversation's text
(its key) and its render."""


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
        source = get_template(template) if template is not None else tokenizer.chat_template
        # a template that reads the clock (strftime_now: Llama 3's date line) may render one prompt two ways
        self._renders: SizedLRU | None = None if "strftime_now" in source else SizedLRU(RENDER_CACHE_BYTES)
        try:  # the template is compiled at its first render (~5 ms): now, not in an actor's first batch
            self._render([{"role": "user", "content": ""}], True)
        except Exception:  # noqa: BLE001  a template that refuses this conversation is compiled at its first real one
            pass

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
        """The render of ``conv.messages`` with the generation prompt (``_render_cached``)."""
        text = self._render_cached(conv.messages)
        conv.seen = (len(conv.messages), text)
        return text

    def _render_cached(self, messages: list[dict[str, Any]]) -> str:
        """``self._render(messages, True)``; a conversation rendered lately (messages of plain strings, equal
        key for key and in order; within ``RENDER_CACHE_BYTES``) is not rendered again: a group's chains
        start from one prompt, and chains that said the same and got the same tool results continue alike."""
        key = _plain_key(messages) if self._renders is not None else None
        text = self._renders.get(key) if key is not None else None
        if text is None:
            text = self._render(messages, True)
            if key is not None:
                self._renders.put(key, text, len(text) + sum(len(x) for m in key for kv in m for x in kv))
        return text

    def forget_renders(self) -> None:
        """Empty the render cache: the next conversations are rendered anew."""
        if self._renders is not None:
            self._renders.clear()

    def add_assistant(self, conv: Conversation, text: str) -> None:
        super().add_assistant(conv, text)
        if conv.seen is not None and conv.seen[0] == len(conv.messages) - 1:  # the turn's ids end with the stop string
            conv.seen = (len(conv.messages), conv.seen[1] + text + self._stop_strings[0])

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self._stop_strings

    def observation_text(self, conv: Conversation, action: Action, results: list[ToolResult]) -> str:
        """The text after the sampled turn up to the next assistant header, such that the model's text
        equals a fresh render of the conversation. One render: when the render with the new messages
        starts with the text the model has seen (``conv.seen``), the delta is the rest of it (the same text
        ``observation_delta`` cuts from its second render); else (a template that renders earlier turns
        otherwise than the model saw them, messages added by hand) ``observation_delta``'s two renders."""
        new = self.result_messages(action, results)
        seen = conv.seen if conv.seen is not None and conv.seen[0] == len(conv.messages) else None
        after = self._render_cached(conv.messages + new) if seen is not None else None
        if after is not None and after.startswith(seen[1]):
            delta = after[len(seen[1]) :]
            conv.messages.extend(new)
            conv.seen = (len(conv.messages), after)
            return delta
        delta = observation_delta(self._render, conv.messages, new, self._stop_strings[0])
        conv.messages.extend(new)
        conv.seen = None  # the two renders from now on
        return delta

    @abc.abstractmethod
    def result_messages(self, action: Action, results: list[ToolResult]) -> list[dict[str, Any]]:
        """The messages that carry ``results`` (or ``action.parse_error``) back to the model."""


def _plain_key(messages: list[dict[str, Any]]) -> tuple | None:
    """A hashable copy of ``messages`` when every key and value is a string (None otherwise)."""
    key = tuple(tuple(m.items()) for m in messages)
    return key if all(isinstance(x, str) for m in key for kv in m for x in kv) else None
