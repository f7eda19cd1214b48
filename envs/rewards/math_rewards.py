"""Math rewards: string equality on the last number, and GSM8K's ``#### N`` ground truth."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from envs.rewards.base import TrajectoryInfo, reward

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_number(text: str | None) -> str | None:
    """The last number written in ``text`` (commas allowed), as written; ``None`` when there is none."""
    if not text:
        return None
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def normalize_number(text: str) -> str:
    """``"1,234.0"`` → ``"1234"``, ``"$5.50"`` → ``"5.5"``, ``"-0"`` → ``"0"``; non-numbers are only stripped."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return s
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def gsm8k_ground_truth(answer: str) -> str:
    """The number on the ``#### N`` line of a GSM8K ``answer`` field."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####' line: {answer[-80:]!r}")
    return normalize_number(answer.split("####")[-1])


@reward("math_reward_string_equal")
def math_reward_string_equal(final_answer: str | None, trajectory: TrajectoryInfo, answer: str) -> float:
    """1.0 when the last number of the final answer equals ``answer`` after normalisation."""
    pred = last_number(final_answer)
    return float(pred is not None and normalize_number(pred) == normalize_number(str(answer)))


@reward("gsm8k_reward")
def gsm8k_reward(final_answer: str | None, trajectory: TrajectoryInfo, answer: str) -> float:
    """1.0 when the last number of the final answer equals the ``#### N`` line of ``answer``."""
    pred = last_number(final_answer)
    return float(pred is not None and normalize_number(pred) == gsm8k_ground_truth(answer))
