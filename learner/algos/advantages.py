"""Advantage estimators: token rewards -> (advantages[B,T], returns[B,T]).

Layout of a batch (one row = one trajectory, right padded to T):

    prompt is not included; position t is the t-th response token.
    response_mask[b, t] = 1 on tokens the policy sampled (actions),
                          0 on tool-observation tokens inside a multi-turn
                          response and on right padding.
    token_rewards[b, t] = the outcome reward on the last sampled token of the
                          response; per-turn rewards (when an environment
                          gives them) on the last sampled token of each
                          assistant turn; 0 everywhere else. Rewards on a
                          position with mask 0 are rejected (ValueError),
                          since every estimator would silently drop them.

Every estimator has the signature `fn(inputs, cfg) -> (advantages, returns)`,
both float32 [B,T], zero where response_mask is 0, computed without grad.
The estimator is picked once at setup with `get_advantage_estimator(name)`.

Token-level estimators (`gae`, `reinforce_plus_plus`) see per-turn rewards
where they are; outcome estimators (`grpo`, `rloo`, `remax`,
`reinforce_plus_plus_baseline`) use the per-trajectory sum of token rewards
as the score and broadcast one advantage over the trajectory's action tokens.

Observation tokens are skipped, not treated as time steps: for `gae` and
`reinforce_plus_plus` the step after an action token is the next *action*
token of the same row, so gamma discounts once per sampled token and the
critic is never bootstrapped from a value at an observation token (that
value predicts nothing the policy chose). This matches verl's multi-turn GAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from learner.algos import registry

# --------------------------------------------------------------------------
# masked statistics


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` over positions where `mask` is 1.

    Args:
        values: [*] any shape.
        mask: same shape as `values`, 0/1 (bool or numeric).
        dim: reduce only this dim (e.g. -1 for a per-sequence mean [B]);
            None reduces everything to a scalar.

    Returns:
        The masked mean; 0 where the mask is empty. Values under mask 0 are
        never read (NaN there does not propagate).
    """
    kept = torch.where(mask > 0, values, 0.0)
    mask = mask.to(values.dtype)
    total = kept.sum() if dim is None else kept.sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `values` over positions where `mask` is 1 (scalar).

    Args:
        values: [*] any shape.
        mask: same shape, 0/1.
        unbiased: apply Bessel's correction n / (n - 1), as verl does.

    Raises:
        ValueError: if the mask is empty, or has one element and unbiased=True.
    """
    count = int(mask.sum().item())
    if count == 0 or (unbiased and count == 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} masked elements, got {count}")
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        var = var * count / (count - 1)
    return var


def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(values - mean) / sqrt(var + eps) with the masked mean and unbiased var.

    Args:
        values: [*] any shape.
        mask: same shape, 0/1.
        eps: added to the variance before the square root.

    Returns:
        Same shape as `values`; positions where mask is 0 are set to 0.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    return torch.where(mask > 0, (values - mean) * torch.rsqrt(var + eps), 0.0)


# --------------------------------------------------------------------------
# inputs and config


@dataclass
class AdvantageInputs:
    """What the learner hands to an advantage estimator (see module docstring)."""

    token_rewards: Tensor
    """[B,T] float. Rewards on sampled-token positions (outcome reward on the
    last sampled token; per-turn rewards on each turn's last sampled token)."""
    response_mask: Tensor
    """[B,T] 0/1. 1 on tokens the policy sampled; 0 on tool observations and padding."""
    group_index: Tensor
    """[B] long. Trajectories sampled from the same prompt share an index."""
    values: Tensor | None = None
    """[B,T] float critic values V(s_t) at each response position; needed by `gae`."""
    baseline_rewards: Tensor | None = None
    """[B] float. Reward of a greedy rollout of the same prompt, one per
    trajectory; needed by `remax`."""

    def __post_init__(self) -> None:
        shape = tuple(self.token_rewards.shape)
        if len(shape) != 2:
            raise ValueError(f"token_rewards must be [B,T], got {shape}")
        if tuple(self.response_mask.shape) != shape:
            raise ValueError(f"response_mask {tuple(self.response_mask.shape)} != token_rewards {shape}")
        if tuple(self.group_index.shape) != (shape[0],):
            raise ValueError(f"group_index must be [B]={shape[0]}, got {tuple(self.group_index.shape)}")
        if self.values is not None and tuple(self.values.shape) != shape:
            raise ValueError(f"values {tuple(self.values.shape)} != token_rewards {shape}")
        if self.baseline_rewards is not None and tuple(self.baseline_rewards.shape) != (shape[0],):
            raise ValueError(f"baseline_rewards must be [B]={shape[0]}, got {tuple(self.baseline_rewards.shape)}")


@dataclass
class AdvantageConfig:
    """Hyper-parameters shared by the advantage estimators."""

    gamma: float = 1.0
    """Discount per sampled token (gae, reinforce_plus_plus). Observation
    tokens are not steps and are not discounted."""
    lam: float = 1.0
    """GAE lambda (gae only)."""
    norm_adv_by_std_in_grpo: bool = True
    """grpo: divide by the group std. False gives Dr. GRPO (mean-centering only)."""
    eps: float = 1e-6
    """grpo: added to the group std before dividing."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")


# --------------------------------------------------------------------------
# shared pieces


def _rewards_and_mask(inputs: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """float32 rewards [B,T] and mask [B,T]; rejects rewards on mask-0 positions."""
    mask = inputs.response_mask.to(torch.float32)
    rewards = inputs.token_rewards.to(torch.float32)
    stray = (rewards != 0) & (mask == 0)
    if bool(stray.any()):
        b, t = (int(i) for i in stray.nonzero()[0])
        raise ValueError(
            f"non-zero reward at a position with response_mask 0 (row {b}, token {t}); "
            "rewards must sit on sampled tokens"
        )
    return rewards, mask


def _group_mean_std(scores: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-trajectory statistics of its group.

    Args:
        scores: [B] float.
        group_index: [B] long, arbitrary ids.

    Returns:
        (mean[B], std[B], count[B]): mean and unbiased std of the scores in
        each trajectory's group, and the group size. A group of one gets
        mean 0 and std 1 (as verl does), so its advantage is its raw score.
    """
    _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
    num_groups = counts.numel()
    counts_f = counts.to(scores.dtype)
    sums = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device).index_add_(0, inverse, scores)
    mean = sums / counts_f
    sq = torch.zeros_like(sums).index_add_(0, inverse, (scores - mean[inverse]) ** 2)
    std = (sq / (counts_f - 1).clamp(min=1)).sqrt()
    single = counts == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return mean[inverse], std[inverse], counts[inverse]


def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation over the action tokens of each row.

    Observation tokens (mask 0) are skipped: for an action token t, the next
    value is V at the next action token t' > t of the same row (0 after the
    last one), and delta_t = r_t + gamma * V(t') - V(t). Not whitened.

    Args:
        rewards: [B,T] float, zero where mask is 0.
        values: [B,T] float critic values.
        mask: [B,T] float 0/1.
        gamma: discount per action token.
        lam: GAE lambda.

    Returns:
        (advantages[B,T], returns[B,T]) with returns = advantages + values,
        both zero where mask is 0 (values there are never read, may be NaN).
    """
    batch, length = rewards.shape
    next_value = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    last_gae = torch.zeros_like(next_value)
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(length)):
        is_action = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        gae_t = delta + gamma * lam * last_gae
        last_gae = torch.where(is_action, gae_t, last_gae)
        next_value = torch.where(is_action, values[:, t], next_value)
        advantages[:, t] = torch.where(is_action, gae_t, 0.0)
    returns = torch.where(mask > 0, advantages + values, 0.0)
    return advantages, returns


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go over the action tokens of each row.

    G_t = r_t + gamma * G_t' where t' is the next action token of the row
    (observation tokens are skipped, neither adding reward nor discounting).

    Args:
        rewards: [B,T] float, zero where mask is 0.
        mask: [B,T] float 0/1.
        gamma: discount per action token.

    Returns:
        [B,T] returns, zero where mask is 0.
    """
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    returns = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        is_action = mask[:, t] > 0
        running = torch.where(is_action, rewards[:, t] + gamma * running, running)
        returns[:, t] = running * mask[:, t]
    return returns


def _broadcast(per_traj: Tensor, mask: Tensor) -> Tensor:
    """[B] -> [B,T], zero where mask is 0."""
    return per_traj.unsqueeze(-1) * mask


# --------------------------------------------------------------------------
# estimators


@torch.no_grad()
def gae(inputs: AdvantageInputs, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """PPO with a critic: `compute_gae`, then batch whitening of the advantages
    over masked tokens (as verl does). Returns are not whitened; they are the
    critic's regression targets."""
    if inputs.values is None:
        raise ValueError("gae needs AdvantageInputs.values (critic values)")
    rewards, mask = _rewards_and_mask(inputs)
    advantages, returns = compute_gae(rewards, inputs.values.to(torch.float32), mask, cfg.gamma, cfg.lam)
    return masked_whiten(advantages, mask), returns


@torch.no_grad()
def grpo(inputs: AdvantageInputs, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """GRPO outcome advantage: score = sum of the row's token rewards;
    A = (score - group mean) / (group std + eps), or score - group mean when
    cfg.norm_adv_by_std_in_grpo is False (Dr. GRPO). std is unbiased (n - 1).
    Broadcast over action tokens; returns == advantages."""
    rewards, mask = _rewards_and_mask(inputs)
    scores = rewards.sum(-1)
    mean, std, _ = _group_mean_std(scores, inputs.group_index)
    adv = scores - mean
    if cfg.norm_adv_by_std_in_grpo:
        adv = adv / (std + cfg.eps)
    adv = _broadcast(adv, mask)
    return adv, adv


@torch.no_grad()
def rloo(inputs: AdvantageInputs, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """RLOO: A_i = score_i - mean of the other scores in the group
    = n / (n - 1) * (score_i - group mean). A group of one keeps its raw score.
    Broadcast over action tokens; returns == advantages."""
    rewards, mask = _rewards_and_mask(inputs)
    scores = rewards.sum(-1)
    mean, _, count = _group_mean_std(scores, inputs.group_index)
    n = count.to(scores.dtype)
    adv = torch.where(count > 1, (scores - mean) * n / (n - 1).clamp(min=1), scores)
    adv = _broadcast(adv, mask)
    return adv, adv


@torch.no_grad()
def opo(inputs: AdvantageInputs, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """OPO's optimal baseline: A_i = score_i - sum_j n_j score_j / sum_j n_j over the group, n_j
    the sampled tokens of episode j (a length-weighted mean; a group of one gets baseline 0, as
    verl). Broadcast over action tokens; returns == advantages."""
    rewards, mask = _rewards_and_mask(inputs)
    scores, lengths = rewards.sum(-1), mask.sum(-1)
    _, inverse, counts = torch.unique(inputs.group_index, return_inverse=True, return_counts=True)
    weighted = torch.zeros(len(counts), dtype=scores.dtype).index_add_(0, inverse, scores * lengths)
    total = torch.zeros(len(counts), dtype=scores.dtype).index_add_(0, inverse, lengths)
    baseline = torch.where(counts > 1, weighted / total.clamp(min=1), 0.0)[inverse]
    adv = _broadcast(scores - baseline, mask)
    return adv, adv


@torch.no_grad()
def grpo_passk(inputs: AdvantageInputs, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """Pass@k advantage (verl's ``grpo_passk``): in each group only the best episode gets an
    advantage, score_max - second-best score (divided by the group's unbiased std + eps when
    cfg.norm_adv_by_std_in_grpo); the others get 0. Groups need >= 2 episodes."""
    rewards, mask = _rewards_and_mask(inputs)
    scores = rewards.sum(-1)
    adv = torch.zeros_like(scores)
    for g in torch.unique(inputs.group_index):
        rows = torch.nonzero(inputs.group_index == g).squeeze(-1)
        if len(rows) < 2:
            raise ValueError(f"grpo_passk needs groups of >= 2 episodes; group {int(g)} has {len(rows)}")
        top, where = torch.topk(scores[rows], 2)
        value = top[0] - top[1]
        if cfg.norm_adv_by_std_in_grpo:
            value = value / (scores[rows].std() + cfg.eps)
        adv[rows[where[0]]] = value
    adv = _broadcast(adv, mask)
    return adv, adv


@torch.no_grad()
def gpg(inputs: AdvantageInputs, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """GPG (group policy gradient): A_i = alpha (score_i - group mean), no std; alpha = B / (rows
    of the whole batch with a non-zero score, at least 1), which scales the gradient up when most
    episodes score 0 (verl's ``compute_gpg_outcome_advantage`` with ``f_norm`` 1). A group of one
    gets mean 0 (verl). Broadcast over action tokens; returns == advantages."""
    rewards, mask = _rewards_and_mask(inputs)
    scores = rewards.sum(-1)
    mean, _, _ = _group_mean_std(scores, inputs.group_index)
    alpha = scores.numel() / (scores != 0).sum().clamp(min=1).to(scores.dtype)
    adv = _broadcast(alpha * (scores - mean), mask)
    return adv, adv


@torch.no_grad()
def reinforce_plus_plus(inputs: AdvantageInputs, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """REINFORCE++: token-level discounted returns over action tokens
    (`discounted_returns` with cfg.gamma), whitened over all masked tokens of
    the batch. Returns are the un-whitened discounted returns."""
    rewards, mask = _rewards_and_mask(inputs)
    returns = discounted_returns(rewards, mask, cfg.gamma)
    return masked_whiten(returns, mask), returns


@torch.no_grad()
def reinforce_plus_plus_baseline(inputs: AdvantageInputs, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """REINFORCE++ with a group baseline (as verl): score - group mean (a group
    of one: mean 0), broadcast over action tokens, then whitened over all
    masked tokens of the batch. returns == advantages."""
    rewards, mask = _rewards_and_mask(inputs)
    scores = rewards.sum(-1)
    mean, _, _ = _group_mean_std(scores, inputs.group_index)
    adv = masked_whiten(_broadcast(scores - mean, mask), mask)
    return adv, adv


@torch.no_grad()
def remax(inputs: AdvantageInputs, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """ReMax: A = score - reward of the greedy rollout of the same prompt.

    returns = score on every action token; advantages = returns - baseline.
    With an outcome reward on the last sampled token this equals verl's
    reward-to-go formulation; with per-turn rewards the whole-trajectory score
    is used, so it stays comparable to the greedy rollout's total reward."""
    if inputs.baseline_rewards is None:
        raise ValueError("remax needs AdvantageInputs.baseline_rewards (greedy rollout rewards)")
    if not bool(torch.isfinite(inputs.baseline_rewards).all()):
        raise ValueError("remax: some rows have no greedy-rollout baseline (baseline_rewards is NaN)")
    rewards, mask = _rewards_and_mask(inputs)
    scores = rewards.sum(-1)
    returns = _broadcast(scores, mask)
    adv = _broadcast(scores - inputs.baseline_rewards.to(torch.float32), mask)
    return adv, returns


# --------------------------------------------------------------------------
# registry (names, rules and sources: `learner.algos.registry.ESTIMATORS`)

AdvantageFn = Callable[[AdvantageInputs, AdvantageConfig], tuple[Tensor, Tensor]]

for _name, _fn in [
    ("gae", gae),
    ("grpo", grpo),
    ("rloo", rloo),
    ("reinforce_plus_plus", reinforce_plus_plus),
    ("reinforce_plus_plus_baseline", reinforce_plus_plus_baseline),
    ("remax", remax),
    ("opo", opo),
    ("grpo_passk", grpo_passk),
    ("gpg", gpg),
]:
    registry.ESTIMATORS.bind(_fn, _name)

ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = registry.ESTIMATORS.implementations()
"""Estimator name -> `fn(inputs, cfg) -> (advantages[B,T], returns[B,T])`."""


def _lookup(name: str) -> registry.Choice:
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; valid names: {sorted(ADVANTAGE_ESTIMATORS)}")
    return registry.ESTIMATORS[name]


def get_advantage_estimator(name: str) -> AdvantageFn:
    """The estimator function registered under `name` (ValueError listing valid names otherwise)."""
    _lookup(name)
    return ADVANTAGE_ESTIMATORS[name]


def needs_critic(name: str) -> bool:
    """Whether estimator `name` needs critic values (AdvantageInputs.values)."""
    return _lookup(name).needs_critic


def needs_greedy_baseline(name: str) -> bool:
    """Whether estimator `name` needs a greedy rollout per prompt (AdvantageInputs.baseline_rewards)."""
    return _lookup(name).needs_greedy_baseline
