"""Reward functions: the registry and the built-ins (registered on import).

Built-ins: ``math_reward_string_equal``, ``gsm8k_reward``, ``math_reward``,
``math_reward_format`` (components ``correct``/``format``/``tool``),
``qa_em``, ``qa_f1_reward``, ``code_reward``, ``reasoning_gym`` (a reasoning-gym task's scorer),
``math_tool_error_penalty`` (per-turn rewards: a penalty on each turn whose tool call failed; see
``envs.rewards.shaping``, whose ``tool_error_penalty`` wraps any reward the same way).
"""

from envs.rewards import code as _code  # noqa: F401  (registers the built-ins)
from envs.rewards import math_rewards as _math_rewards  # noqa: F401
from envs.rewards import qa as _qa  # noqa: F401
from envs.rewards import rgym as _rgym  # noqa: F401
from envs.rewards import shaping as _shaping  # noqa: F401
from envs.rewards.base import (
    RewardError,
    RewardFn,
    Scores,
    TrajectoryInfo,
    abandoned_reward_threads,
    get_reward,
    registered_rewards,
    reward,
    run_reward,
)

FORMAT_COMPONENTS = ("format", "tool")
"""Component names that reward form rather than correctness (see ``envs.monitors``)."""

__all__ = [
    "FORMAT_COMPONENTS",
    "RewardError",
    "RewardFn",
    "Scores",
    "TrajectoryInfo",
    "abandoned_reward_threads",
    "get_reward",
    "registered_rewards",
    "reward",
    "run_reward",
]
