"""Reward registry: ``@reward(name)``, ``get_reward(name)``, ``TrajectoryInfo``.

A reward function has the signature::

    fn(final_answer: str | None, trajectory: TrajectoryInfo, **row_fields) -> float | dict[str, float]

It names the dataset fields it needs as parameters (``answer``, ``tests``, ...);
a ``**kwargs`` parameter receives every field. ``get_reward`` returns a
``RewardFn`` that always gives ``dict[str, float]`` with a ``"reward"`` key:

* a float ``x`` becomes ``{"reward": x}``;
* a dict with ``"reward"`` is kept as is (the other keys are logged components);
* a dict without ``"reward"`` gets ``"reward"`` = the sum of its parts.

``final_answer`` is ``None`` when the episode ended without one (turn limit,
length truncation, unparsable turn); rewards give 0 correctness then.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

RewardResult = float | dict[str, float]


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
    response_text: str = ""
    """All assistant text of the episode, concatenated."""


class RewardFn:
    """A registered reward normalised to ``dict[str, float]`` with a ``"reward"`` key."""

    def __init__(self, name: str, fn: Callable[..., RewardResult]) -> None:
        self.name = name
        self.fn = fn
        params = list(inspect.signature(fn).parameters.values())
        if len(params) < 2:
            raise TypeError(f"reward {name}: expected fn(final_answer, trajectory, **row_fields)")
        rest = params[2:]
        self._takes_all = any(p.kind is p.VAR_KEYWORD for p in rest)
        self._fields = [p.name for p in rest if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        self._required = {p.name for p in rest if p.name in self._fields and p.default is p.empty}

    def __call__(self, final_answer: str | None, trajectory: TrajectoryInfo, **row_fields: Any) -> dict[str, float]:
        missing = sorted(self._required - set(row_fields))
        if missing:
            raise KeyError(f"reward '{self.name}' needs dataset field(s) {missing}; row has {sorted(row_fields)}")
        kwargs = row_fields if self._takes_all else {k: row_fields[k] for k in self._fields if k in row_fields}
        out = self.fn(final_answer, trajectory, **kwargs)
        if isinstance(out, dict):
            result = {k: float(v) for k, v in out.items()}
            if "reward" not in result:
                result["reward"] = sum(result.values())
            return result
        return {"reward": float(out)}

    def __repr__(self) -> str:
        return f"RewardFn({self.name!r})"


_REGISTRY: dict[str, Callable[..., RewardResult]] = {}


def reward(name: str) -> Callable[[Callable[..., RewardResult]], Callable[..., RewardResult]]:
    """Register ``fn`` under ``name``; returns ``fn`` unchanged."""

    def wrap(fn: Callable[..., RewardResult]) -> Callable[..., RewardResult]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward name '{name}' is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)


def get_reward(name: str) -> RewardFn:
    """The reward registered as ``name``, or a function at a dotted path (``pkg.mod:fn`` / ``pkg.mod.fn``)."""
    if name in _REGISTRY:
        return RewardFn(name, _REGISTRY[name])
    from envs.plugins import as_relay_reward, is_spec, load_object

    if is_spec(name):  # path/to/file.py:name or package.module:name; verl's compute_score too
        fn = load_object(name)
        if not callable(fn):
            raise TypeError(f"reward '{name}' is a {type(fn).__name__}, not a function")
        return RewardFn(name, as_relay_reward(fn))
    raise KeyError(f"unknown reward '{name}'; registered: {registered_rewards()}")
