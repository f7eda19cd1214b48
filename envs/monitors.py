"""Reward-hacking monitors over a batch of finished episodes.

``monitor_batch(summaries)`` returns flat metrics for logging:

* ``monitor/tool_use_rate/<tool>``: share of episodes that called ``<tool>`` at least once.
* ``monitor/tool_calls_per_episode/<tool>``: mean number of calls.
* ``monitor/format_reward_share``: sum of the format components (``FORMAT_COMPONENTS``:
  ``format``, ``tool``) over the sum of absolute total rewards (0 when all totals are 0).
  Near 1 means the policy is paid for form, not correctness.
* ``monitor/length_reward_corr``: Pearson correlation of response length and total
  reward (0 when either is constant). Strongly positive: length may be being gamed.
* ``monitor/mean_turns``: mean assistant turns per episode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from envs.rewards import FORMAT_COMPONENTS


@dataclass
class EpisodeSummary:
    """What the monitors need from one episode."""

    reward: dict[str, float]
    """The reward function's output (``"reward"`` total plus components)."""
    tool_calls: list[str] = field(default_factory=list)
    """Names of the tools called, one entry per call."""
    num_turns: int = 0
    response_length: int = 0
    """Response tokens (sampled plus observation) or characters: anything monotone in length."""


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation; 0.0 when fewer than two points or either side is constant."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return 0.0
    return sxy / math.sqrt(sxx * syy)


def monitor_batch(summaries: Sequence[EpisodeSummary], format_components: Sequence[str] = FORMAT_COMPONENTS) -> dict[str, float]:
    if not summaries:
        raise ValueError("monitor_batch needs at least one episode")
    n = len(summaries)
    metrics: dict[str, float] = {}
    tools = sorted({name for s in summaries for name in s.tool_calls})
    for tool in tools:
        metrics[f"monitor/tool_use_rate/{tool}"] = sum(tool in s.tool_calls for s in summaries) / n
        metrics[f"monitor/tool_calls_per_episode/{tool}"] = sum(s.tool_calls.count(tool) for s in summaries) / n
    totals = [s.reward["reward"] for s in summaries]
    format_sum = sum(s.reward.get(k, 0.0) for s in summaries for k in format_components)
    abs_total = sum(abs(t) for t in totals)
    metrics["monitor/format_reward_share"] = format_sum / abs_total if abs_total else 0.0
    metrics["monitor/length_reward_corr"] = pearson([float(s.response_length) for s in summaries], totals)
    metrics["monitor/mean_turns"] = sum(s.num_turns for s in summaries) / n
    return metrics
