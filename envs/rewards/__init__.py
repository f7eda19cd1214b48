"""Reward functions: the registry and the built-ins (registered on import)."""

from envs.rewards import math_rewards as _math_rewards  # noqa: F401  (registers the built-ins)
from envs.rewards.base import RewardFn, TrajectoryInfo, get_reward, registered_rewards, reward

__all__ = ["RewardFn", "TrajectoryInfo", "get_reward", "registered_rewards", "reward"]
