"""Reward registry: ``@reward(name)``, ``get_reward(name)``, ``TrajectoryInfo``.

A reward function has the signature::

    fn(final_answer: str | None, trajectory: TrajectoryInfo, **row_fields) -> float | dict

It names the dataset fields it needs as parameters (``answer``, ``tests``, ...);
a ``**kwargs`` parameter receives every field. ``get_reward`` returns a
``RewardFn`` that always gives ``Scores``: a ``dict[str, float]`` with a
``"reward"`` key (the outcome), plus the per-turn rewards in ``.turn_rewards``:

* a float ``x`` becomes ``{"reward": x}``;
* a dict with ``"reward"`` is kept as is (the other keys are logged components);
* a dict without ``"reward"`` gets ``"reward"`` = the sum of its parts;
* a dict may also hold ``"turn_rewards"``: a list of numbers, one per assistant
  turn of the episode in order (``trajectory.num_turns`` of them at most; a
  shorter list leaves the remaining turns 0). It is not a component: it moves
  to ``Scores.turn_rewards`` and is not part of the sum above. A longer list,
  an entry that is not a number, or a non-finite one is an error naming the
  reward (a ``RewardError`` under ``run_reward``).

The outcome ``"reward"`` lands on the episode's last sampled token; turn ``k``'s
reward on the last sampled token of assistant turn ``k``
(``Trajectory.turn_rewards``, placed by ``learner.batch.collate``). Token-level
estimators (``gae``, ``reinforce_plus_plus``) see each where it lands; outcome
estimators (``grpo``, ``rloo``, ...) score an episode by the sum of all of them.

``final_answer`` is ``None`` when the episode ended without one (turn limit,
length truncation, unparsable turn); rewards give 0 correctness then.

Rewards are plain blocking functions. ``run_reward`` is how the actor calls
one: in a thread of its own, off the event loop, for at most ``timeout_s``
(config ``reward.timeout_s``). A reward that raises, or does not return in
time, becomes a ``RewardError`` naming the reward and the sample. Python cannot
stop a thread, so a reward that never returns keeps its (daemon) thread;
``abandoned_reward_threads()`` counts them. A reward registered with
``@reward(name, inline=True)`` is pure and bounded (a string comparison:
``math_reward_string_equal``, ``gsm8k_reward``): ``run_reward`` calls it in
place, without the thread hop (~50 us of CPU, and the GIL waits beside the
engine's thread) and without a timeout; what it raises is a ``RewardError`` all
the same.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

RewardResult = float | dict[str, Any]


class _ReadOnFirstUse:
    """A ``str`` dataclass field that may also be given as a zero-argument callable: called at its
    first read, and the text kept (the actor's decode of an episode's response is skipped for the
    rewards that never read it)."""

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj, objtype=None) -> str:
        if obj is None:
            return ""  # the field's default
        value = obj.__dict__[self.slot]
        if callable(value):
            value = obj.__dict__[self.slot] = value()
        return value

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = value


@dataclass
class TrajectoryInfo:
    """What a reward may look at besides the final answer."""

    messages: list[dict[str, Any]]
    num_turns: int
    """Assistant turns sampled."""
    tool_calls: list[str] = field(default_factory=list)
    """Names of the tools called, in order, one entry per call."""
    truncated: bool = False
    """The episode hit the token or turn limit."""
    response_text: str = _ReadOnFirstUse()
    """The episode's response decoded: everything after the prompt, its sampled turns and the
    observations between them (verl's ``solution_str``). May be given as a zero-argument callable
    that returns it: called at the first read."""
    turn_tool_errors: list[int] = field(default_factory=list)
    """Per assistant turn, in order: its tool calls that failed (an unparsable tool call counts as
    one, unless the turn was cut by its token limit; a tool that returned an error as one each); 0
    for a turn without tool calls. Filled for Relay's own agents (``actors.rollout.run_episode``);
    empty for an external agent's episode."""


class Scores(dict):
    """What a ``RewardFn`` returns: ``dict[str, float]`` (``"reward"``, the outcome, and the logged
    components) plus ``turn_rewards``, one float per assistant turn (possibly fewer: the rest are 0)."""

    def __init__(self, values: dict[str, float] | None = None, turn_rewards: list[float] | None = None) -> None:
        super().__init__(values or {})
        self.turn_rewards: list[float] = list(turn_rewards or [])


class RewardFn:
    """A registered reward normalised to ``Scores``: ``dict[str, float]`` with a ``"reward"`` key,
    and ``turn_rewards`` (checked: at most ``trajectory.num_turns`` finite numbers)."""

    def __init__(self, name: str, fn: Callable[..., RewardResult], timeout_s: float | None = None, inline: bool = False) -> None:
        self.name = name
        self.fn = fn
        self.timeout_s = timeout_s
        """Longest one call may take under ``run_reward`` (``reward.timeout_s``)."""
        self.inline = inline
        """Pure and bounded: ``run_reward`` calls it in place (no thread, no timeout)."""
        params = list(inspect.signature(fn).parameters.values())
        if len(params) < 2:
            raise TypeError(f"reward {name}: expected fn(final_answer, trajectory, **row_fields)")
        rest = params[2:]
        self._takes_all = any(p.kind is p.VAR_KEYWORD for p in rest)
        self._fields = [p.name for p in rest if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        self._required = {p.name for p in rest if p.name in self._fields and p.default is p.empty}

    def __call__(self, final_answer: str | None, trajectory: TrajectoryInfo, **row_fields: Any) -> Scores:
        missing = sorted(self._required - set(row_fields))
        if missing:
            raise KeyError(f"reward '{self.name}' needs dataset field(s) {missing}; row has {sorted(row_fields)}")
        kwargs = row_fields if self._takes_all else {k: row_fields[k] for k in self._fields if k in row_fields}
        out = self.fn(final_answer, trajectory, **kwargs)
        if isinstance(out, dict):
            turns = self._turn_rewards(out["turn_rewards"], trajectory.num_turns) if "turn_rewards" in out else []
            result = {k: float(v) for k, v in out.items() if k != "turn_rewards"}
            if "reward" not in result:
                result["reward"] = sum(result.values())
            return Scores(result, turns)
        return Scores({"reward": float(out)})

    def _turn_rewards(self, value: Any, num_turns: int) -> list[float]:
        """``value`` as a list of floats, one per assistant turn at most; a clear error otherwise."""
        where = f"reward '{self.name}': turn_rewards"
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where} must be a list of numbers (one per assistant turn), got {type(value).__name__}")
        if len(value) > num_turns:
            raise ValueError(f"{where} has {len(value)} entries but the episode has {num_turns} assistant turn(s)")
        out = []
        for k, x in enumerate(value):
            if isinstance(x, bool) or not isinstance(x, numbers.Real):
                raise TypeError(f"{where}[{k}] is {x!r} ({type(x).__name__}), not a number")
            if not math.isfinite(x):
                raise ValueError(f"{where}[{k}] is {x}, not finite")
            out.append(float(x))
        return out

    def __repr__(self) -> str:
        return f"RewardFn({self.name!r})"


_REGISTRY: dict[str, Callable[..., RewardResult]] = {}
_INLINE: set[str] = set()
"""Names registered with ``inline=True``."""


def reward(name: str, inline: bool = False) -> Callable[[Callable[..., RewardResult]], Callable[..., RewardResult]]:
    """Register ``fn`` under ``name``; returns ``fn`` unchanged. ``inline=True``: ``fn`` is pure and
    bounded (it cannot hang), and ``run_reward`` calls it in place (see the module docstring)."""

    def wrap(fn: Callable[..., RewardResult]) -> Callable[..., RewardResult]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward name '{name}' is already registered")
        _REGISTRY[name] = fn
        if inline:
            _INLINE.add(name)
        return fn

    return wrap


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)


def get_reward(name: str, timeout_s: float | None = None) -> RewardFn:
    """The reward registered as ``name``, or a function at a dotted path (``pkg.mod:fn`` / ``pkg.mod.fn``);
    ``timeout_s`` is what ``run_reward`` allows one call (``reward.timeout_s``)."""
    if name in _REGISTRY:
        return RewardFn(name, _REGISTRY[name], timeout_s, inline=name in _INLINE)
    from envs.plugins import as_relay_reward, is_spec, load_object

    if is_spec(name):  # path/to/file.py:name or package.module:name; verl's compute_score too
        fn = load_object(name)
        if not callable(fn):
            raise TypeError(f"reward '{name}' is a {type(fn).__name__}, not a function")
        return RewardFn(name, as_relay_reward(fn), timeout_s)
    raise KeyError(f"unknown reward '{name}'; registered: {registered_rewards()}")


# ----------------------------------------------------------------------------- calling with a timeout


class RewardError(RuntimeError):
    """A reward raised or did not return within its timeout; the message names the reward and the sample."""

    def __init__(self, message: str, reward: str, sample: str) -> None:
        super().__init__(message)
        self.reward = reward
        self.sample = sample


_abandoned = 0
_abandoned_lock = threading.Lock()


class _Workers:
    """Reward threads, reused: a job goes to an idle worker, or to a new one when none is idle
    (so a reward that never returns holds only its own thread, never another call's). Starting
    a thread waits for the GIL that the engine's thread holds (~10 ms measured on the actor's
    loop); handing a job to an idle worker does not."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1  # that worker is waiting on the queue: it takes this job (or an equal one)
        self._jobs.put(job)
        if spawn:
            threading.Thread(target=self._serve, name="reward", daemon=True).start()

    def _serve(self) -> None:
        while True:
            self._jobs.get()()  # a job never raises (work() catches everything)
            with self._lock:
                self._idle += 1


_workers = _Workers()


def abandoned_reward_threads() -> int:
    """Reward calls given up on (timed out, or their caller cancelled) whose threads have not returned yet."""
    return _abandoned


def _abandon(state: dict[str, bool]) -> None:
    global _abandoned
    with _abandoned_lock:
        if not state["returned"]:
            state["abandoned"] = True
            _abandoned += 1


async def run_reward(
    reward: RewardFn, call: Callable[[], Scores], sample: str, timeout_s: float | None = None
) -> Scores:
    """``call()`` (which scores one episode with ``reward``) in a reward thread (``_Workers``), for at most
    ``timeout_s`` (default: ``reward.timeout_s``); its result, or a ``RewardError`` naming
    ``reward`` and ``sample`` when it raises (anything, ``BaseException`` included) or runs late.
    A cancellation of the calling task passes through."""
    limit = timeout_s if timeout_s is not None else reward.timeout_s
    if limit is None or limit <= 0:
        raise ValueError(f"reward '{reward.name}': run_reward needs a positive timeout_s (reward.timeout_s), got {limit}")
    if reward.inline:  # pure and bounded: called here
        try:
            return call()
        except Exception as e:  # a KeyboardInterrupt raised here is the process's own, as anywhere on the loop
            message = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise RewardError(f"reward '{reward.name}' failed on sample {sample}: {message}", reward.name, sample) from e
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()
    state = {"returned": False, "abandoned": False}  # guarded by _abandoned_lock

    def settle(result: Any, error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(result)
        else:
            done.set_exception(error)

    def work() -> None:
        global _abandoned
        result: Any = None
        error: BaseException | None = None
        try:
            result = call()
        except BaseException as e:  # noqa: BLE001  handed to the caller, never raised in this thread
            error = e
        with _abandoned_lock:
            state["returned"] = True
            if state["abandoned"]:
                _abandoned -= 1
                return
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    _workers.submit(work)
    try:
        return await asyncio.wait_for(done, limit)
    except asyncio.TimeoutError:
        _abandon(state)
        n = _abandoned
        raise RewardError(
            f"reward '{reward.name}' did not return within {limit:g} s (reward.timeout_s) on sample {sample}; "
            f"its thread is abandoned ({n} such thread(s) in this process)",
            reward.name,
            sample,
        ) from None
    except asyncio.CancelledError as e:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            _abandon(state)
            raise  # our caller is being cancelled
        raise RewardError(f"reward '{reward.name}' failed on sample {sample}: CancelledError: {e}", reward.name, sample) from e
    except BaseException as e:  # noqa: BLE001  whatever the reward raised
        message = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise RewardError(f"reward '{reward.name}' failed on sample {sample}: {message}", reward.name, sample) from e
