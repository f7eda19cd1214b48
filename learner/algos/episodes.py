"""What is done to whole episodes before the loss: DAPO's overlong reward shaping, and the
loss filters that take episodes out of the policy loss.

Overlong reward shaping (DAPO's soft overlong punishment), with L the
episode's response length (every token after the prompt, sampled and
observation: what ``rollout.response_length`` budgets), L_max the budget and
C the buffer:

    penalty = 0                          if L <= L_max - C
            = (L_max - C - L) / C * f    if L_max - C < L <= L_max
            = -f                         if L > L_max

added to the reward on the episode's last sampled token (f the penalty factor).

Loss filters (`registry.SAMPLE_FILTERS`): each maps the batch's per-episode
facts to a keep mask [N]; a dropped episode's tokens leave the policy loss and
its normaliser (they still count for group statistics and advantages, and the
critic still regresses on them):

    overlong       drop episodes truncated by length (DAPO overlong filtering)
    zero_variance  drop episodes of groups whose rewards are all equal (their
                   group-relative advantage is 0; DAPO's dynamic sampling drops
                   them, without refilling the batch here)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from learner.algos import registry

# --------------------------------------------------------------------------
# overlong reward shaping


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (module docstring).

    Args:
        lengths: [N] response lengths in tokens.
        max_length: the response budget L_max.
        buffer: C, 0 < C <= L_max.
        factor: f, the penalty at and beyond L_max.

    Returns:
        [N] float32 penalties in [-factor, 0].
    """
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer must be in (0, max_length={max_length}], got {buffer}")
    lengths = lengths.to(torch.float32)
    start = max_length - buffer
    ramp = (start - lengths) / buffer
    penalty = torch.where(lengths <= start, 0.0, torch.where(lengths <= max_length, ramp, -1.0))
    return penalty * factor


def add_at_last_token(token_rewards: Tensor, mask: Tensor, values: Tensor) -> Tensor:
    """``token_rewards`` [N,T] with ``values`` [N] added on each row's last masked token
    (rows without a masked token are left alone)."""
    has = mask.sum(-1) > 0
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, -1).max(-1).values.clamp(min=0)
    out = token_rewards.clone()
    out[torch.arange(len(out), device=out.device), last] += torch.where(has, values.to(out.dtype), 0.0)
    return out


class NoShaping:
    """Rewards as the environment gave them."""

    def __call__(self, token_rewards: Tensor, mask: Tensor, lengths: Tensor) -> tuple[Tensor, dict[str, list[float]]]:
        return token_rewards, {}


class OverlongShaping:
    """Adds `overlong_penalty` to each episode's reward."""

    def __init__(self, max_length: int, buffer: int, factor: float):
        overlong_penalty(torch.zeros(1), max_length, buffer, factor)  # checks the arguments once
        self.max_length, self.buffer, self.factor = max_length, buffer, factor

    def __call__(self, token_rewards: Tensor, mask: Tensor, lengths: Tensor) -> tuple[Tensor, dict[str, list[float]]]:
        penalty = overlong_penalty(lengths, self.max_length, self.buffer, self.factor)
        stats = {
            "actor/overlong_penalty_mean": [float(penalty.mean())],
            "actor/overlong_penalised_frac": [float((penalty < 0).float().mean())],
        }
        return add_at_last_token(token_rewards, mask, penalty), stats


# --------------------------------------------------------------------------
# loss filters


@dataclass
class EpisodeFacts:
    """Per-episode facts the filters read, all [N]."""

    overlong: Tensor
    """Bool: the episode was cut by the token budget or a turn's token limit."""
    rewards: Tensor
    """Float: the episode's reward."""
    group_index: Tensor
    """Long: episodes of the same prompt share an index."""


@registry.SAMPLE_FILTERS.implementation("overlong")
def keep_not_overlong(facts: EpisodeFacts) -> Tensor:
    return ~facts.overlong


@registry.SAMPLE_FILTERS.implementation("zero_variance")
def keep_informative_groups(facts: EpisodeFacts) -> Tensor:
    _, inverse = torch.unique(facts.group_index, return_inverse=True)
    groups = int(inverse.max()) + 1 if len(inverse) else 0
    r = facts.rewards.to(torch.float64)
    hi = torch.full((groups,), -torch.inf, dtype=r.dtype).scatter_reduce(0, inverse, r, "amax")
    lo = torch.full((groups,), torch.inf, dtype=r.dtype).scatter_reduce(0, inverse, r, "amin")
    return (hi > lo)[inverse]


SAMPLE_FILTERS = registry.SAMPLE_FILTERS.implementations()
"""Filter name -> fn(EpisodeFacts) -> keep [N] bool."""


def loss_keep(facts: EpisodeFacts, names: list[str]) -> tuple[Tensor, dict[str, list[float]]]:
    """The episodes the policy loss keeps under the filters ``names`` (all of them must keep an
    episode), and the fraction each filter drops (``actor/filtered_frac/<name>``)."""
    keep = torch.ones_like(facts.overlong, dtype=torch.bool)
    stats = {}
    for name in names:
        kept = SAMPLE_FILTERS[name](facts)
        stats[f"actor/filtered_frac/{name}"] = [float((~kept).float().mean())] if len(kept) else [0.0]
        keep &= kept
    return keep, stats
