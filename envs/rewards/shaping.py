"""Per-turn reward shaping for tool agents: a penalty on each turn whose tool call failed.

A reward returns per-turn rewards under ``"turn_rewards"`` (one number per
assistant turn, see ``envs.rewards.base``). The ones here use
``TrajectoryInfo.turn_tool_errors``, which Relay's own agents fill in: per
assistant turn, its tool calls that could not be parsed or whose tool returned
an error.

* ``math_tool_error_penalty`` (registered): ``math_reward_string_equal`` as the
  outcome, and ``-TOOL_ERROR_PENALTY`` on every turn with a failed tool call.
* ``tool_error_penalty(outcome, penalty)``: the same around any reward, with
  its own penalty, for a user's file (``agent.reward_name=my_rewards.py:NAME``).

The penalty is a reward on the failed turn's last sampled token. ``gae`` and
``reinforce_plus_plus`` credit it to that turn's tokens and the ones before it
(discounted by ``gamma`` per sampled token); outcome estimators (``grpo``,
``rloo``, ...) subtract it from the episode's score.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

from envs.rewards.base import TrajectoryInfo, get_reward, reward
from envs.rewards.math_rewards import math_reward_string_equal

TOOL_ERROR_PENALTY = 0.1
"""``math_tool_error_penalty``: the reward of a turn with a failed tool call is ``-TOOL_ERROR_PENALTY``."""


@reward("math_tool_error_penalty")
def math_tool_error_penalty(final_answer: str | None, trajectory: TrajectoryInfo, answer: str) -> dict:
    """1 for the right number, and -0.1 on every turn whose tool call failed."""
    turn_rewards = [-TOOL_ERROR_PENALTY if errors else 0.0 for errors in trajectory.turn_tool_errors]
    return {
        "reward": math_reward_string_equal(final_answer, trajectory, answer),
        "tool_error_turns": float(sum(1 for errors in trajectory.turn_tool_errors if errors)),
        "turn_rewards": turn_rewards,
    }


def tool_error_penalty(outcome: str, penalty: float = TOOL_ERROR_PENALTY) -> Callable[..., dict[str, Any]]:
    """A reward function: ``outcome`` (a registered reward name or ``path/to/file.py:fn``) scores the
    episode, and every assistant turn with a failed tool call gets ``-penalty`` added to the
    outcome's own turn reward for it. Components: the outcome's, plus ``tool_error_turns``. It
    takes the dataset fields ``outcome`` takes (the preflight checks them). In a file of yours::

        from envs.rewards.shaping import tool_error_penalty

        qa_tool_penalty = tool_error_penalty("qa_em", penalty=0.2)

    then ``agent.reward_name=my_rewards.py:qa_tool_penalty``.
    """
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not math.isfinite(penalty):
        raise ValueError(f"tool_error_penalty: penalty must be a finite number, got {penalty!r}")
    inner = get_reward(outcome)

    def shaped(final_answer: str | None, trajectory: TrajectoryInfo, **row_fields: Any) -> dict[str, Any]:
        scores = inner(final_answer, trajectory, **row_fields)
        turns = scores.turn_rewards + [0.0] * (trajectory.num_turns - len(scores.turn_rewards))
        failed = 0
        for k, errors in enumerate(trajectory.turn_tool_errors[: trajectory.num_turns]):
            if errors:
                turns[k] -= penalty
                failed += 1
        return {**scores, "tool_error_turns": float(failed), "turn_rewards": turns}

    shaped.__signature__ = inspect.signature(inner.fn)  # the outcome's dataset fields
    shaped.__name__ = f"tool_error_penalty_{inner.name}"
    return shaped
