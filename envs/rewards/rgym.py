"""Reward ``reasoning_gym``: a reasoning-gym task's own scorer (see ``envs/tasks/rgym.py``)."""

from __future__ import annotations

from typing import Any

from envs.rewards.base import reward


@reward("reasoning_gym")
def reasoning_gym_reward(final_answer: str | None, trajectory: Any, **row: Any) -> float:
    from envs.tasks.rgym import score

    return score(final_answer, row)
