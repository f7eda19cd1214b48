"""External agents: any OpenAI-client harness plays the episode, the endpoint records its tokens.

``agent.agent_type=external`` with ``agent.entrypoint=path/to/agent.py:run``
(or ``package.module:run``) names an async function::

    async def run(row: dict, client: openai.AsyncOpenAI) -> str | float | dict | None
    async def run(row: dict, client: openai.AsyncOpenAI, tools: RelayTools) -> ...

It gets a copy of the dataset row and a client bound to the episode's session
on the actor's endpoint (``actors/endpoint.py``; any ``model`` name is
accepted), and, when it has a ``tools`` parameter, the configured
``agent.tools`` (``RelayTools``: ``schemas`` and ``call``, with Relay's tool
limits; MCP servers' tools included). It runs whatever harness it likes and
returns

* the final answer (``str`` or ``None``): the configured ``agent.reward_name``
  scores it as for Relay's own agents;
* a reward (a number), used as is;
* a dict with ``reward`` (and other numbers, kept as reward components) and
  optionally ``final_answer``.

The episode's training sequences are the session's segments: one, or one
more per time the harness rewrote history (``splits``; the actor logs the
total). Each becomes a ``Trajectory`` of its own (``segment`` of
``num_segments``, ``ExternalEpisode.sequences``) carrying the episode's
reward, stats and final answer; the learner completes a chain when all its
segments arrived and computes advantages over chains (``learner.batch.over_chains``).

Limits: the episode runs for at most ``agent.episode_timeout_s``; requests past
``agent.max_turns`` or the token budget are refused (HTTP 400) and the episode
is truncated, and an exception the harness raises after such a refusal is
taken as the end of a truncated episode. Any other exception propagates (a bug
in the harness stops the actor, naming it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from actors.endpoint import Endpoint, Segment, Session
from actors.engines.base import Engine, SamplingSettings
from actors.rollout import Episode, EpisodeLimits, run_episode

log = logging.getLogger(__name__)


@dataclass
class ExternalEpisode(Episode):
    """An episode played through the endpoint: its fields are the last segment's (the one that
    produced the answer) and the whole episode's stats; ``segments`` are all its training sequences."""

    segments: list[Segment] = field(default_factory=list)
    splits: int = 0
    """Times the harness's history did not extend the session's (``len(segments) - 1``)."""

    def sequences(self) -> list[Episode]:
        """One episode per segment, in order, each with that segment's ids, mask, log-probs,
        versions, turn ends and messages, and the whole episode's answer, reward and stats."""
        if len(self.segments) <= 1:
            return [self]
        return [
            dataclasses.replace(
                self, prompt_ids=list(seg.prompt_ids), response_ids=list(seg.response_ids), loss_mask=list(seg.loss_mask),
                logprobs=list(seg.logprobs), versions=list(seg.versions), turn_ends=list(seg.turn_ends),
                messages=list(seg.history), segments=[],
            )
            for seg in self.segments
        ]


class RelayTools:
    """The configured ``agent.tools`` (MCP servers' included) for an entrypoint that asks for them
    (``async def run(row, client, tools)``): OpenAI ``schemas`` to send, and ``call`` with the same
    timeout, output limit and error observations as Relay's own agents get."""

    def __init__(self, toolbox: Any):
        self.toolbox = toolbox
        self.calls: list[str] = []
        self.errors = 0

    @property
    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema for t in self.toolbox.tools.values()] if self.toolbox is not None else []

    async def call(self, name: str, arguments: dict[str, Any] | str) -> str:
        """The observation text (``Error: ...`` for a failure, as the model should see it)."""
        from envs.base import ToolCall

        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                self.calls.append(name)
                self.errors += 1
                return f"Error: arguments are not valid JSON ({e.msg})"
        if self.toolbox is None:
            raise RuntimeError("no tools: this runner was given no toolbox")
        result = await self.toolbox.call(ToolCall(name=name, arguments=arguments))
        self.calls.append(name)
        self.errors += int(result.error)
        return result.text


def load_entrypoint(spec: str) -> Callable[..., Any]:
    from envs.plugins import PluginError, load_object

    fn = load_object(spec)
    if not inspect.iscoroutinefunction(fn):
        raise PluginError(f"'{spec}': an external agent's entrypoint must be an async function (async def run(row, client))")
    return fn


def scores_from(result: Any, spec: str) -> tuple[str | None, dict[str, float] | None]:
    """``(final_answer, reward components or None)`` from what an entrypoint returned."""
    if result is None or isinstance(result, str):
        return result, None
    if isinstance(result, (bool, int, float)):
        return None, {"reward": float(result)}
    if isinstance(result, dict):
        answer = result.get("final_answer")
        numbers = {k: float(v) for k, v in result.items() if isinstance(v, (bool, int, float))}
        if "reward" not in numbers:
            if answer is None:
                raise TypeError(f"'{spec}' returned a dict without 'reward' or 'final_answer': {sorted(result)}")
            return str(answer), None
        return (None if answer is None else str(answer)), numbers
    raise TypeError(f"'{spec}' returned {type(result).__name__}; expected a final answer (str), a reward (number) or a dict")


def episode_from(session: Session, final_answer: str | None, reward: dict[str, float] | None) -> ExternalEpisode:
    last = session.segments[-1]
    ep = ExternalEpisode(
        prompt_ids=list(last.prompt_ids),
        response_ids=list(last.response_ids),
        loss_mask=list(last.loss_mask),
        logprobs=list(last.logprobs),
        versions=list(last.versions),
        messages=list(last.history),
        final_answer=final_answer,
        tool_calls=[name for seg in session.segments for name in seg.tool_calls],
        num_turns=session.num_turns,
        gen_tokens=session.gen_tokens,
        gen_time_s=session.gen_time_s,
        turn_ends=list(last.turn_ends),
        segments=list(session.segments),
        splits=session.splits,
    )
    ep.reward = reward
    if session.truncated:
        ep.truncated, ep.finish_reason = True, session.finish_reason
    elif last.last_finish == "length":
        ep.truncated, ep.finish_reason = True, "length"
    else:
        ep.finish_reason = "answer"
    return ep


class EndpointRunner:
    """Plays each episode with a harness on the actor's endpoint (started on first use): one
    session per episode, the harness run for at most ``timeout_s``, its segments the episode.
    A subclass says how the harness runs (``_play``)."""

    def __init__(self, endpoint: Endpoint, spec: str, timeout_s: float):
        self.endpoint = endpoint
        self.spec = spec
        """What plays the episodes, for messages (an entrypoint, ``verifiers:NAME``)."""
        self.timeout_s = timeout_s
        self.episodes = 0
        self.splits = 0

    def _open(self, limits: EpisodeLimits, settings: SamplingSettings) -> Session:
        return self.endpoint.open_session(limits, settings)

    def _close(self, session: Session) -> None:
        self.endpoint.close_session(session)

    async def _play(self, session: Session, row: dict[str, Any], tools: RelayTools) -> Any:
        """Run the harness on ``row`` against ``session``; what it returns goes to ``scores_from``."""
        raise NotImplementedError

    async def run_episode(self, engine: Engine, agent: Any, tokenizer: Any, toolbox: Any, row: dict[str, Any],
                          limits: EpisodeLimits, settings: SamplingSettings) -> ExternalEpisode:
        """``actors.rollout.run_episode``'s signature; ``agent`` and ``toolbox`` are the harness's business."""
        await self.endpoint.start()
        session = self._open(limits, settings)
        tools = RelayTools(toolbox)
        try:
            try:
                result = await asyncio.wait_for(self._play(session, row, tools), timeout=self.timeout_s)
            except asyncio.TimeoutError:
                if not session.segments:
                    raise TimeoutError(f"external agent '{self.spec}' made no model request in {self.timeout_s:g} s") from None
                log.warning("external agent '%s' still running after %g s: episode truncated", self.spec, self.timeout_s)
                session.truncated, session.finish_reason = True, "timeout"
                result = None
            except Exception as e:
                if not session.truncated:
                    raise
                log.info("external agent ended after a refused request (%s): %s", session.finish_reason, type(e).__name__)
                result = None
        finally:
            self._close(session)  # the client is dropped; its pool is the runner's
        if not session.segments:
            raise RuntimeError(f"external agent '{self.spec}' returned without asking the model anything")
        answer, reward = scores_from(result, self.spec)
        ep = episode_from(session, answer, reward)
        if tools.calls:  # the harness ran Relay's tools: those are the episode's tool calls
            ep.tool_calls, ep.tool_errors = list(tools.calls), tools.errors
        self.episodes += 1
        self.splits += ep.splits
        if ep.splits:
            log.info("external agent: episode split into %d sequences (%d splits in %d episodes so far)",
                     len(ep.segments), self.splits, self.episodes)
        return ep

    async def close(self) -> None:
        c = self.endpoint.counters
        log.info("%s: %d episodes, %d splits (history rewritten), %d requests, %d refused",
                 self.spec, self.episodes, self.splits, c["requests"], c["refused"])
        await self.endpoint.close()


class ExternalRunner(EndpointRunner):
    """Plays ``agent_type=external`` episodes: the entrypoint gets an ``openai`` client bound to the session."""

    def __init__(self, endpoint: Endpoint, entrypoint: str, timeout_s: float, in_process: bool = True):
        """``in_process``: the client the entrypoint gets hands its requests to the endpoint in this
        event loop (``Endpoint.transport``); False sends them over the endpoint's socket."""
        super().__init__(endpoint, entrypoint, timeout_s)
        self.in_process = in_process
        self.fn = load_entrypoint(entrypoint)
        self.wants_tools = "tools" in inspect.signature(self.fn).parameters
        self._http = None

    async def _play(self, session: Session, row: dict[str, Any], tools: RelayTools) -> Any:
        import openai

        if self._http is None:  # one for every episode's client (a client each costs ~ms)
            # in-process: the endpoint's handler without the socket and HTTP parsing (a harness that
            # builds its own client from the base URL or the key still reaches the same sessions over HTTP)
            transport = self.endpoint.transport() if self.in_process else None  # None: httpx's own, over TCP
            self._http = openai.DefaultAsyncHttpxClient(timeout=self.timeout_s, transport=transport)
        # no retries: a retried request repeats an earlier history, which would read as a rewrite
        client = openai.AsyncOpenAI(base_url=session.base_url, api_key=session.key, max_retries=0, timeout=self.timeout_s,
                                    http_client=self._http)
        args = (dict(row), client, tools) if self.wants_tools else (dict(row), client)
        return await self.fn(*args)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        await super().close()


class VerifiersRunner(EndpointRunner):
    """Plays ``env.type=verifiers`` episodes: verifiers' harness runs the row's task against the
    episode's session (``envs/verifiers_env.py``); the trace's reward is the episode's reward."""

    def __init__(self, endpoint: Endpoint, env_id: str, args: dict[str, Any], size: int | None, prompt_key: str,
                 timeout_s: float, max_concurrent: int = 4):
        from envs import verifiers_env

        super().__init__(endpoint, f"verifiers:{env_id}", timeout_s)
        self.env_id, self.prompt_key = env_id, prompt_key
        verifiers_env.prepare_process()
        self.env = verifiers_env.load_env(env_id, args)
        self.tasks = verifiers_env.tasks_of(self.env, env_id, size)
        self._serving: contextlib.AsyncExitStack | None = None
        self._serving_error: Exception | None = None
        self._serving_lock = asyncio.Lock()
        # verifiers keeps one HTTP client per distinct base URL while it serves: episodes reuse the
        # keys of finished sessions, so there are as many URLs as episodes ever ran at once
        self._free_keys: list[str] = []
        self._slots = asyncio.Semaphore(max_concurrent)  # waiting for a slot is not part of the episode's timeout

    async def run_episode(self, *args: Any) -> ExternalEpisode:
        async with self._slots:
            return await super().run_episode(*args)

    def _open(self, limits: EpisodeLimits, settings: SamplingSettings) -> Session:
        return self.endpoint.open_session(limits, settings, key=self._free_keys.pop() if self._free_keys else None)

    def _close(self, session: Session) -> None:
        self.endpoint.close_session(session)
        self._free_keys.append(session.key)

    async def _play(self, session: Session, row: dict[str, Any], tools: RelayTools) -> Any:
        from envs import verifiers_env

        vf = verifiers_env.vf_module()
        task = verifiers_env.task_for(self.tasks, row, self.prompt_key, self.env_id)
        async with self._serving_lock:  # the environment's interception server and shared tools, held until close
            if self._serving_error is not None:  # every episode would fail the same way: fail at once
                raise verifiers_env.VerifiersError(str(self._serving_error))
            if self._serving is None:
                stack = contextlib.AsyncExitStack()
                try:
                    await stack.enter_async_context(self.env.serving())
                except Exception as e:
                    self._serving_error = verifiers_env.VerifiersError(
                        f"{self.spec}: starting the environment (interception server, shared toolsets) failed: "
                        + verifiers_env.hint(f"{type(e).__name__}: {e}"))
                    raise self._serving_error from e
                self._serving = stack
        ctx = vf.ModelContext(model=self.endpoint.model_name,
                              client=vf.EvalClientConfig(base_url=session.base_url, api_key_var=verifiers_env.API_KEY_VAR))
        episode = await self.env.run_episode(task, ctx)
        scores, errors = verifiers_env.episode_result(episode)
        if errors:
            if not session.segments:
                raise verifiers_env.VerifiersError(f"{self.spec}: task {row[verifiers_env.INDEX_KEY]} failed before its first "
                                                   f"model request: {errors[0][:2000]}")
            log.warning("%s: task %s ended with an error (episode truncated): %s", self.spec,
                        row[verifiers_env.INDEX_KEY], errors[0][:500])
            if not session.truncated:
                session.truncated, session.finish_reason = True, "env_error"
        trace = episode.traces[-1] if episode.traces else None
        replies = trace.assistant_messages if trace is not None else []
        answer = str(replies[-1].content) if replies and replies[-1].content is not None else None
        return {**scores, "final_answer": answer}

    async def close(self) -> None:
        if self._serving is not None:
            await self._serving.aclose()
            self._serving = None
        await super().close()


class LoopRunner:
    """Relay's own agents: the token-exact loop of ``actors/rollout.py``; nothing to close."""

    run_episode = staticmethod(run_episode)

    async def close(self) -> None:
        return None


def make_episode_runner(cfg: Any, tokenizer: Any, engine: Engine) -> EndpointRunner | LoopRunner:
    """What plays each episode for ``cfg`` (``env.type``, then ``agent.agent_type``)."""
    if cfg.env.type == "verifiers":
        endpoint = Endpoint(engine, tokenizer, cfg.agent.template)
        concurrent = cfg.env.max_concurrent_episodes or min(2 * (os.cpu_count() or 1), cfg.actor_rollout_ref.rollout.max_concurrent_episodes)
        return VerifiersRunner(endpoint, cfg.env.id, cfg.env.args, cfg.env.size, cfg.data.prompt_key, cfg.agent.episode_timeout_s,
                               max_concurrent=concurrent)
    if cfg.agent.agent_type != "external":
        return LoopRunner()
    if not cfg.agent.entrypoint:
        raise ValueError("agent.agent_type=external needs agent.entrypoint=path/to/agent.py:run (or package.module:run)")
    endpoint = Endpoint(engine, tokenizer, cfg.agent.template)
    return ExternalRunner(endpoint, cfg.agent.entrypoint, cfg.agent.episode_timeout_s)
