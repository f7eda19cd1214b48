"""An OpenAI-compatible endpoint on the actor's engine that records exact tokens.

Any agent harness that speaks the OpenAI API (a hand-written ``openai`` loop, a
framework built on the ``openai`` client, a program in another process on the
same host given the base URL) can play Relay episodes: each episode gets a
session, and every request made with the session's key is served by the
actor's engine and recorded token for token.

Routes (aiohttp, in the actor's event loop, bound to ``127.0.0.1``)::

    POST /s/<key>/v1/chat/completions     messages, tools (function calling), max_tokens
    POST /s/<key>/v1/completions          prompt (text or token ids), max_tokens
    POST /s/<key>/v1/responses            the Responses API (input items, function tools,
                                          previous_response_id), served as chat; no streaming
    GET  /s/<key>/v1/models
    (or /v1/... with ``Authorization: Bearer <key>``)

The session key is in the base URL (``Session.base_url``) and is also accepted
as the API key, so ``AsyncOpenAI(base_url=session.base_url, api_key=session.key)``
works, whatever the harness does with either.

``Endpoint.handle`` serves a request from its method, path, headers and body;
the aiohttp routes call it, and so does ``Endpoint.transport()``, an ``httpx``
transport for clients in the actor's own process (``actors.external`` gives
the entrypoint's client one): the same code, without the socket and the HTTP
parsing on both sides.

Token tracking (``Session``). The session keeps the ids of every turn it
rendered and sampled. A chat request whose messages extend the previous
request's messages plus the assistant message the endpoint returned (same
tools) is an extension: only the new messages are rendered, as the text the
chat template puts after the last sampled turn (``envs.templates.
observation_delta``), tokenized on their own and appended with loss mask 0;
earlier ids, sampled ones included, are never re-tokenized. A request that
does not extend (the harness rewrote or trimmed history, changed the tools,
switched between chat and text completions), or that the chat template
renders differently once the new messages are added (templates that drop
earlier turns' reasoning), starts a new *segment*: a fresh prompt rendered
from its messages. The episode is then split into separate training
sequences, and ``Session.splits`` counts the splits. Comparison is on
meaning, not object identity: message content (``None``, a string or a list of
text parts), tool calls (name and parsed arguments; ids ignored) and tool
results.

What the harness does not choose: temperature, top-p, top-k and the seed are
the actor's (the learner recomputes log-probs at the configured temperature,
so the behaviour policy must be the configured one); ``max_tokens`` is capped
by ``agent.max_tokens_per_turn`` and the episode's token budget; ``n`` must be
1; ``stop`` strings are not supported (the chat template's end-of-turn token
stops a turn). A request past ``agent.max_turns`` or the token budget gets
HTTP 400 (``context_length_exceeded`` / ``max_turns_exceeded``) and the episode
is marked truncated. ``stream: true`` is answered as server-sent events with
the whole turn in one chunk. ``return_token_ids: true`` (vLLM's extension,
``extra_body``) adds ``prompt_token_ids`` and ``choices[0].token_ids``.

Tool calls: with ``tools`` in the request, the sampled turn is parsed the
``hf`` agent's way (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
blocks) and returned as OpenAI ``tool_calls`` (``finish_reason:
"tool_calls"``); a malformed block is returned as plain content.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from actors.engines.base import Engine, SamplingSettings
from actors.rollout import EpisodeLimits, encode
from envs.agents.hf import parse_tool_call_json
from envs.templates import make_render, observation_delta, stop_strings_for

log = logging.getLogger(__name__)


class RequestRefused(Exception):
    """A request the endpoint answers with an OpenAI-style error (HTTP ``status``)."""

    def __init__(self, message: str, code: str, status: int = 400):
        super().__init__(message)
        self.code = code
        self.status = status


# --------------------------------------------------------------------------- messages


def _text(content: Any) -> str:
    """Message content as text: ``None`` -> "", a list of parts -> their texts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type") in ("text", "input_text", "output_text"):
                parts.append(str(p.get("text", "")))
            elif isinstance(p, str):
                parts.append(p)
            else:
                raise RequestRefused(f"unsupported content part {p!r}: only text parts are served", "invalid_content")
        return "".join(parts)
    raise RequestRefused(f"message content must be a string or a list of text parts, got {type(content).__name__}", "invalid_content")


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            return raw
    return raw


def _tool_calls(message: dict) -> list[dict]:
    out = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function", call) if isinstance(call, dict) else {}
        out.append({"name": fn.get("name"), "arguments": _arguments(fn.get("arguments", {}))})
    return out


def normalize(message: dict) -> dict:
    """What a message means, for comparing a request's history with the session's."""
    if not isinstance(message, dict) or "role" not in message:
        raise RequestRefused(f"each message needs a 'role', got {message!r:.200}", "invalid_messages")
    out = {"role": message["role"], "content": _text(message.get("content"))}
    calls = _tool_calls(message)
    if calls:
        out["tool_calls"] = calls
    if message["role"] == "tool" and message.get("name"):
        out["name"] = message["name"]
    return out


def for_template(message: dict) -> dict:
    """A request message as chat templates expect it: text content, tool-call arguments as objects."""
    out: dict[str, Any] = {"role": message["role"], "content": _text(message.get("content"))}
    calls = _tool_calls(message)
    if calls:
        out["tool_calls"] = [{"type": "function", "function": c} for c in calls]
    for key in ("name", "tool_call_id"):
        if message.get(key):
            out[key] = message[key]
    return out


def _tools_key(tools: list | None) -> str:
    return json.dumps(tools or [], sort_keys=True)


def responses_tools(tools: list | None) -> list[dict] | None:
    """Responses-API function tools (flat) as chat-completions tools; other tool types are refused."""
    out = []
    for t in tools or []:
        if not isinstance(t, dict) or t.get("type") != "function":
            raise RequestRefused(f"only function tools are served, got {t!r:.120}", "unsupported_tool")
        fn = t.get("function", t)
        out.append({"type": "function", "function": {k: fn[k] for k in ("name", "description", "parameters") if k in fn}})
    return out or None


def responses_to_messages(body: dict) -> list[dict]:
    """A Responses-API request's ``instructions`` and ``input`` as chat messages: message items as
    messages (``developer`` as ``system``), ``function_call`` items as the preceding assistant
    message's tool calls, ``function_call_output`` items as tool messages; reasoning items dropped."""
    messages: list[dict] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        return messages + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise RequestRefused("'input' must be a string or a non-empty list of items", "invalid_input")
    for item in items:
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = "system" if item.get("role") == "developer" else item.get("role")
            messages.append({"role": role, "content": _text(item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": _text(item.get("output"))})
        elif kind == "reasoning":
            continue
        else:
            raise RequestRefused(f"unsupported input item {item!r:.120}", "unsupported_input")
    return messages


# --------------------------------------------------------------------------- token tracking


@dataclass
class Segment:
    """One training sequence of an episode: a prompt and everything appended after it."""

    kind: str
    """``chat`` or ``completions``."""
    prompt_ids: list[int]
    tools_key: str = ""
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    turn_ends: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    """Chat: the normalized messages so far, ending with the last assistant message returned."""
    rendered: list[dict] = field(default_factory=list)
    """Chat: the same messages as rendered (the assistant turns as the text that was sampled)."""
    text: str = ""
    """Completions: the prompt text so far plus the returned completions."""
    ended_with_stop: bool = True
    num_turns: int = 0
    tool_calls: list[str] = field(default_factory=list)
    last_finish: str = ""

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def append_observation(self, ids: list[int]) -> None:
        self.response_ids += ids
        self.loss_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [-1] * len(ids)


@dataclass
class Turn:
    """One served request."""

    token_ids: list[int]
    prompt_ids: list[int]
    text: str
    """Decoded sampled text without the stop token."""
    finish_reason: str
    """The engine's: ``stop`` or ``length``."""
    version: int


class Session:
    """The token record of one episode (see the module docstring)."""

    def __init__(self, key: str, base_url: str, engine: Engine, tokenizer: Any, template: str | None,
                 limits: EpisodeLimits, settings: SamplingSettings):
        self.key = key
        self.base_url = base_url
        self.engine = engine
        self.tokenizer = tokenizer
        self.template = template
        self.limits = limits
        self.settings = settings
        self.stop_string = stop_strings_for(tokenizer, template)[0]
        self.stop_ids = set(settings.stop_token_ids)
        self.segments: list[Segment] = []
        self.truncated = False
        self.finish_reason = ""
        self.num_turns = 0
        self.gen_tokens = 0
        self.gen_time_s = 0.0
        self.requests = 0
        self.lock = asyncio.Lock()
        self.closed = False
        self._parser = _ToolCallParser()
        self._renders: dict[str, Any] = {}
        self._responses: dict[str, list[dict]] = {}

    def remember_response(self, rid: str, messages: list[dict]) -> None:
        """Keep a Responses-API answer's whole history, for a later ``previous_response_id``."""
        self._responses[rid] = messages

    def responses_history(self, previous_response_id: str | None) -> list[dict]:
        if not previous_response_id:
            return []
        if previous_response_id not in self._responses:
            raise RequestRefused(f"no response {previous_response_id!r} in this episode", "unknown_previous_response", 404)
        return list(self._responses[previous_response_id])

    @property
    def splits(self) -> int:
        """How many times the harness's history did not extend the session's (segments - 1)."""
        return max(0, len(self.segments) - 1)

    def _render(self, tools: list | None):
        key = _tools_key(tools)
        if key not in self._renders:
            self._renders[key] = make_render(self.tokenizer, self.template, tools)
        return self._renders[key]

    # -- chat

    async def chat(self, messages: list[dict], tools: list | None, max_tokens: int | None) -> tuple[Turn, dict]:
        """Serve one chat request; returns the turn and the assistant message (OpenAI format)."""
        if not isinstance(messages, list) or not messages:
            raise RequestRefused("'messages' must be a non-empty list", "invalid_messages")
        history = [normalize(m) for m in messages]
        render = self._render(tools)
        seg = self.segments[-1] if self.segments else None
        tkey = _tools_key(tools)
        n = len(seg.history) if seg is not None else 0
        delta = None
        if seg is not None and seg.kind == "chat" and seg.tools_key == tkey and len(history) > n and history[:n] == seg.history:
            new = [for_template(m) for m in messages[n:]]
            try:
                delta = observation_delta(render, seg.rendered, new, self.stop_string)
            except ValueError as e:  # the template renders earlier turns differently now (e.g. drops old reasoning)
                log.info("session %s: cannot append to the rendered history (%s); starting a new sequence", self.key[:8], e)
        if delta is not None:
            if not seg.ended_with_stop:  # the turn was cut by length: the template closes it
                delta = self.stop_string + delta
            rendered, obs, fresh = seg.rendered + new, encode(self.tokenizer, delta), False
        else:
            rendered = [for_template(m) for m in messages]
            seg = Segment(kind="chat", prompt_ids=encode(self.tokenizer, render(rendered, True)), tools_key=tkey)
            obs, fresh = [], True
        turn = await self._sample(seg, obs, fresh, max_tokens)
        message = self._parser.message(turn.text, tools)
        seg.tool_calls += [c["function"]["name"] for c in message.get("tool_calls", [])]
        seg.history = history + [normalize(message)]
        seg.rendered = rendered + [{"role": "assistant", "content": turn.text}]
        return turn, message

    # -- completions

    async def complete(self, prompt: str | list[int], max_tokens: int | None) -> Turn:
        seg = self.segments[-1] if self.segments else None
        extends = seg is not None and seg.kind == "completions"
        if isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt):
            if extends and len(prompt) > len(seg.context) and prompt[: len(seg.context)] == seg.context:
                obs, fresh = prompt[len(seg.context):], False
            else:
                seg, obs, fresh = Segment(kind="completions", prompt_ids=list(prompt)), [], True
            text = None
        elif isinstance(prompt, str) and prompt:
            if extends and seg.text and len(prompt) > len(seg.text) and prompt.startswith(seg.text):
                obs, fresh = encode(self.tokenizer, prompt[len(seg.text):]), False
            else:
                seg, obs, fresh = Segment(kind="completions", prompt_ids=encode(self.tokenizer, prompt)), [], True
            text = prompt
        else:
            raise RequestRefused("'prompt' must be one non-empty string or list of token ids (batches are not served)", "invalid_prompt")
        turn = await self._sample(seg, obs, fresh, max_tokens)
        seg.text = "" if text is None else text + turn.text  # token-id prompts extend by ids only
        return turn

    # -- shared

    def _budget(self, seg: Segment) -> int:
        return min(self.limits.max_response_tokens, self.limits.max_context - len(seg.prompt_ids))

    def _refuse(self, finish_reason: str, message: str, code: str) -> RequestRefused:
        self.truncated, self.finish_reason = True, finish_reason
        return RequestRefused(message, code)

    async def _sample(self, seg: Segment, obs: list[int], fresh: bool, max_tokens: int | None) -> Turn:
        """Sample one turn after ``seg`` plus the observation ids ``obs``; ``fresh``: ``seg`` is a new
        segment. Nothing is recorded unless the engine returns (a failed or cancelled request leaves
        the session as it was, so a retry of the same request extends it the same way)."""
        if self.num_turns >= self.limits.max_turns:
            raise self._refuse("max_turns", f"the episode's {self.limits.max_turns} assistant turns are used", "max_turns_exceeded")
        budget = self._budget(seg)
        if budget <= 0:
            raise self._refuse("token_budget", f"prompt of {len(seg.prompt_ids)} tokens leaves no room in a context of "
                               f"{self.limits.max_context}", "context_length_exceeded")
        room = budget - len(seg.response_ids) - len(obs)
        if room <= 0:
            raise self._refuse("token_budget", f"the episode's token budget ({budget} tokens after the prompt) is spent",
                               "context_length_exceeded")
        cap = min(self.limits.max_tokens_per_turn, room)
        if max_tokens is not None:
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
                raise RequestRefused(f"max_tokens must be a positive integer, got {max_tokens!r}", "invalid_max_tokens")
            cap = min(cap, max_tokens)
        s = self.settings
        prompt = seg.context + obs
        t0 = time.perf_counter()
        gen = await self.engine.generate(
            prompt,
            SamplingSettings(max_tokens=cap, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                             stop_token_ids=s.stop_token_ids, seed=s.seed),
        )
        self.gen_time_s += time.perf_counter() - t0
        if fresh:
            if self.segments:
                log.info("session %s: history rewritten, episode split (segment %d)", self.key[:8], len(self.segments) + 1)
            self.segments.append(seg)
        seg.append_observation(obs)
        self.num_turns += 1
        seg.num_turns += 1
        self.gen_tokens += len(gen.token_ids)
        seg.response_ids += gen.token_ids
        seg.loss_mask += [1] * len(gen.token_ids)
        seg.logprobs += gen.logprobs
        seg.versions += [gen.version] * len(gen.token_ids)
        seg.turn_ends.append(len(seg.response_ids) - 1)
        seg.ended_with_stop = bool(gen.token_ids) and gen.token_ids[-1] in self.stop_ids
        seg.last_finish = gen.finish_reason
        body = gen.token_ids[:-1] if seg.ended_with_stop else gen.token_ids
        text = self.tokenizer.decode(body, skip_special_tokens=False)
        return Turn(list(gen.token_ids), prompt, text, gen.finish_reason, gen.version)


_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


class _ToolCallParser:
    """Sampled text -> an OpenAI assistant message, parsing ``<tool_call>`` blocks as the ``hf``
    agent does; a turn with a malformed block is returned as plain content."""

    def __init__(self):
        self._count = 0

    def message(self, text: str, tools: list | None) -> dict:
        bodies = _TOOL_CALL.findall(text) if tools else []
        rest = _TOOL_CALL.sub("", text)
        if not bodies or "<tool_call>" in rest:
            return {"role": "assistant", "content": text}
        try:
            parsed = [parse_tool_call_json(b.strip()) for b in bodies]
        except ValueError:
            return {"role": "assistant", "content": text}
        calls = []
        for c in parsed:
            self._count += 1
            calls.append({
                "id": f"call_{self._count}_{secrets.token_hex(4)}",
                "type": "function",
                "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
            })
        return {"role": "assistant", "content": rest.strip() or None, "tool_calls": calls}


# --------------------------------------------------------------------------- server


@dataclass
class Reply:
    """One answer to one request, whichever way it came (HTTP, or ``InProcessTransport``)."""

    status: int
    body: bytes
    content_type: str = "application/json"


def _json(obj: Any, status: int = 200) -> Reply:
    return Reply(status, msgspec.json.encode(obj))


def _error(e: RequestRefused) -> Reply:
    return _json({"error": {"message": str(e), "type": "invalid_request_error", "code": e.code, "param": None}}, status=e.status)


_ROUTE = re.compile(r"(?:/s/([^/]+))?/v1/(chat/completions|completions|responses|models)/?")


class Endpoint:
    """The actor's OpenAI-compatible server; ``open_session`` gives each episode its key."""

    def __init__(self, engine: Engine, tokenizer: Any, template: str | None, host: str = "127.0.0.1", port: int = 0,
                 model_name: str = "relay"):
        self.engine = engine
        self.tokenizer = tokenizer
        self.template = template
        self.host = host
        self.port = port
        self.model_name = model_name
        self.sessions: dict[str, Session] = {}
        self.counters = {"sessions": 0, "requests": 0, "refused": 0, "splits": 0}
        self._runner = None
        self._start_lock = asyncio.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Start serving (idempotent); binds ``port`` (0 = any free port, read back)."""
        from aiohttp import web

        async with self._start_lock:
            if self._runner is not None:
                return
            app = web.Application(client_max_size=64 * 1024 * 1024)
            for prefix in ("/s/{key}/v1", "/v1"):
                for path in ("/chat/completions", "/completions", "/responses"):
                    app.router.add_post(prefix + path, self._aiohttp)
                app.router.add_get(prefix + "/models", self._aiohttp)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            self.port = runner.addresses[0][1]
            self._runner = runner
            log.info("OpenAI-compatible endpoint on %s", self.url)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def open_session(self, limits: EpisodeLimits, settings: SamplingSettings, key: str | None = None) -> Session:
        """A new episode's session; ``key`` reuses the key (and so the base URL) of a closed session
        (a harness that keeps a client per base URL then sees a bounded set of them), None draws one."""
        if self._runner is None:
            raise RuntimeError("the endpoint is not started (await endpoint.start() first)")
        if key is None:
            key = secrets.token_urlsafe(18)
        elif key in self.sessions:
            raise ValueError(f"session key {key[:8]}... is in use by an open session")
        s = Session(key, f"{self.url}/s/{key}/v1", self.engine, self.tokenizer, self.template, limits, settings)
        self.sessions[key] = s
        self.counters["sessions"] += 1
        return s

    def close_session(self, session: Session) -> None:
        """No more requests for ``session`` (they get 404); its record stays with the caller."""
        session.closed = True
        self.sessions.pop(session.key, None)
        self.counters["splits"] += session.splits

    async def handle(self, method: str, path: str, headers: Any, raw: bytes) -> Reply:
        """Serve one request: ``path`` (``/s/<key>/v1/...`` or ``/v1/...``), ``headers`` (a mapping
        with ``Authorization`` when the key is not in the path) and the raw body."""
        route = _ROUTE.fullmatch(path)
        handler = route and {("POST", "chat/completions"): self._chat, ("POST", "completions"): self._completions,
                             ("POST", "responses"): self._responses, ("GET", "models"): self._models}.get((method, route[2]))
        if handler is None:
            return _error(RequestRefused(f"no route {method} {path[:200]}", "not_found", 404))
        key = route[1]
        if key is None:
            auth = headers.get("Authorization", "")
            key = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        return await handler(key, raw)

    async def _aiohttp(self, request):
        from aiohttp import web

        reply = await self.handle(request.method, request.path, request.headers, await request.read())
        headers = {"Cache-Control": "no-cache"} if reply.content_type == "text/event-stream" else None
        return web.Response(body=reply.body, status=reply.status, content_type=reply.content_type, headers=headers)

    def transport(self) -> Any:
        """An ``httpx`` transport (of the ``httpx`` the installed ``openai`` uses) that hands each
        request to ``handle`` in this event loop: the same serving code without the socket and
        the HTTP parsing on both sides (``actors.external.ExternalRunner`` gives its client one)."""
        return InProcessTransport.of(self)

    def _session(self, key: str | None) -> Session:
        session = self.sessions.get(key) if key else None
        if session is None:
            raise RequestRefused("no open episode session for this key (base URL /s/<key>/v1 or API key)", "unknown_session", 404)
        return session

    async def _body(self, raw: bytes) -> dict:
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError as e:
            raise RequestRefused(f"the request body is not JSON: {e}", "invalid_json") from None
        if not isinstance(body, dict):
            raise RequestRefused("the request body must be a JSON object", "invalid_json")
        if body.get("n", 1) != 1:
            raise RequestRefused("n must be 1 (each episode samples one continuation per request)", "unsupported_n")
        if body.get("stop"):
            raise RequestRefused("'stop' strings are not supported; turns end at the chat template's end-of-turn token", "unsupported_stop")
        return body

    async def _models(self, key, raw) -> Reply:
        try:
            self._session(key)
        except RequestRefused as e:
            return _error(e)
        return _json({"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "relay"}]})

    async def _chat(self, key, raw) -> Reply:
        self.counters["requests"] += 1
        try:
            session = self._session(key)
            body = await self._body(raw)
            session.requests += 1
            async with session.lock:
                turn, message = await session.chat(body.get("messages"), body.get("tools") or None,
                                                   body.get("max_completion_tokens", body.get("max_tokens")))
        except RequestRefused as e:
            self.counters["refused"] += 1
            return _error(e)
        finish = "tool_calls" if message.get("tool_calls") else turn.finish_reason
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        out = self._envelope("chat.completion", turn, choice, body)
        if body.get("stream"):
            return self._stream(out, message, finish)
        return _json(out)

    async def _completions(self, key, raw) -> Reply:
        self.counters["requests"] += 1
        try:
            session = self._session(key)
            body = await self._body(raw)
            session.requests += 1
            async with session.lock:
                turn = await session.complete(body.get("prompt"), body.get("max_tokens"))
        except RequestRefused as e:
            self.counters["refused"] += 1
            return _error(e)
        choice = {"index": 0, "text": turn.text, "finish_reason": turn.finish_reason, "logprobs": None}
        return _json(self._envelope("text_completion", turn, choice, body))

    async def _responses(self, key, raw) -> Reply:
        self.counters["requests"] += 1
        try:
            session = self._session(key)
            body = await self._body(raw)
            if body.get("stream"):
                raise RequestRefused("the Responses API is served without streaming (stream: false)", "unsupported_stream")
            session.requests += 1
            async with session.lock:
                messages = session.responses_history(body.get("previous_response_id")) + responses_to_messages(body)
                tools = responses_tools(body.get("tools"))
                turn, message = await session.chat(messages, tools, body.get("max_output_tokens"))
                rid = f"resp_{secrets.token_hex(12)}"
                session.remember_response(rid, messages + [message])
        except RequestRefused as e:
            self.counters["refused"] += 1
            return _error(e)
        output: list[dict[str, Any]] = []
        if message.get("content"):
            output.append({"type": "message", "id": f"msg_{secrets.token_hex(8)}", "status": "completed", "role": "assistant",
                           "content": [{"type": "output_text", "text": message["content"], "annotations": []}]})
        for c in message.get("tool_calls", []):
            output.append({"type": "function_call", "id": f"fc_{secrets.token_hex(8)}", "call_id": c["id"], "status": "completed",
                           "name": c["function"]["name"], "arguments": c["function"]["arguments"]})
        if not output:  # an empty turn is still a message
            output.append({"type": "message", "id": f"msg_{secrets.token_hex(8)}", "status": "completed", "role": "assistant",
                           "content": [{"type": "output_text", "text": "", "annotations": []}]})
        out = {
            "id": rid, "object": "response", "created_at": int(time.time()), "model": body.get("model") or self.model_name,
            "status": "completed" if turn.finish_reason == "stop" else "incomplete",
            "incomplete_details": None if turn.finish_reason == "stop" else {"reason": "max_output_tokens"},
            "output": output, "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice", "auto"),
            "parallel_tool_calls": True, "error": None, "instructions": body.get("instructions"), "metadata": {},
            "previous_response_id": body.get("previous_response_id"),
            "usage": {"input_tokens": len(turn.prompt_ids), "output_tokens": len(turn.token_ids),
                      "total_tokens": len(turn.prompt_ids) + len(turn.token_ids),
                      "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}},
        }
        return _json(out)

    def _envelope(self, obj: str, turn: Turn, choice: dict, body: dict) -> dict:
        if body.get("return_token_ids"):
            choice["token_ids"] = turn.token_ids
        out = {
            "id": f"relay-{secrets.token_hex(8)}",
            "object": obj,
            "created": int(time.time()),
            "model": body.get("model") or self.model_name,
            "choices": [choice],
            "usage": {"prompt_tokens": len(turn.prompt_ids), "completion_tokens": len(turn.token_ids),
                      "total_tokens": len(turn.prompt_ids) + len(turn.token_ids)},
        }
        if body.get("return_token_ids"):
            out["prompt_token_ids"] = turn.prompt_ids
        return out

    def _stream(self, out: dict, message: dict, finish: str) -> Reply:
        """The whole turn as one ``chat.completion.chunk``, then the finish chunk and ``[DONE]``."""
        delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
        if message.get("tool_calls"):
            delta["tool_calls"] = [dict(c, index=i) for i, c in enumerate(message["tool_calls"])]
        base = {"id": out["id"], "object": "chat.completion.chunk", "created": out["created"], "model": out["model"]}
        events = [
            dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": None}]),
            dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": finish}], usage=out["usage"]),
        ]
        body = b"".join(b"data: " + msgspec.json.encode(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
        return Reply(200, body, "text/event-stream")


class InProcessTransport:
    """Requests of an ``httpx`` client served by an ``Endpoint`` in the same event loop, with no
    socket: ``handle_async_request`` passes method, path, headers and body to ``Endpoint.handle``
    and wraps the ``Reply``. Built against the ``httpx`` module the installed ``openai`` uses
    (``httpx2`` for openai 3, ``httpx`` for openai 2), subclassing its ``AsyncBaseTransport``."""

    _classes: dict[Any, type] = {}

    @classmethod
    def of(cls, endpoint: Endpoint) -> Any:
        import importlib

        import openai

        client = next(c for c in openai.DefaultAsyncHttpxClient.__mro__ if c.__name__ == "AsyncClient")
        httpx = importlib.import_module(client.__module__.split(".")[0])
        if httpx not in cls._classes:

            class Transport(httpx.AsyncBaseTransport):
                def __init__(self, endpoint: Endpoint):
                    self.endpoint = endpoint

                async def handle_async_request(self, request):
                    reply = await self.endpoint.handle(request.method, request.url.path, request.headers, await request.aread())
                    return httpx.Response(reply.status, headers={"content-type": reply.content_type}, content=reply.body,
                                          request=request)

            Transport.__name__ = Transport.__qualname__ = "InProcessTransport"
            cls._classes[httpx] = Transport
        return cls._classes[httpx](endpoint)
