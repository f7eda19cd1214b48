"""Turning trajectories into the padded tensors one training step consumes.

Every per-token tensor is aligned with *next-token prediction*: column ``t``
is about predicting ``input_ids[:, t + 1]`` from the logits at ``t``. Prompt
positions, observation tokens and padding have ``loss_mask`` 0; the sampled
tokens have 1. Rewards sit on the last sampled token of the response (the
outcome reward) and, when an environment gives per-turn rewards, on the last
sampled token of each assistant turn.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from protocol.messages import Trajectory


@dataclass
class TrainBatch:
    """N trajectories, right-padded to length L (per-token tensors are [N, L-1])."""

    input_ids: torch.Tensor
    """[N, L] prompt then response ids, right-padded with ``pad_id``."""
    attention_mask: torch.Tensor
    """[N, L] 1 on real tokens."""
    loss_mask: torch.Tensor
    """[N, L-1] 1 where the target token was sampled by the policy."""
    behaviour_logprobs: torch.Tensor
    """[N, L-1] the actor's sampling log-probs of the target tokens (0 elsewhere)."""
    token_rewards: torch.Tensor
    """[N, L-1] rewards placed on target positions."""
    versions: torch.Tensor
    """[N, L-1] policy version that sampled each target token (-1 elsewhere)."""
    group_index: torch.Tensor
    """[N] trajectories of the same prompt share an index."""
    rewards: torch.Tensor
    """[N] total episode reward."""
    baseline_rewards: torch.Tensor
    """[N] reward of the greedy rollout of the row's prompt (ReMax); NaN when there is none."""
    response_lengths: torch.Tensor
    """[N] long: tokens after the prompt (sampled and observation), what ``rollout.response_length`` budgets."""
    overlong: torch.Tensor
    """[N] bool: the episode was cut by the token budget or a turn's token limit (``finish_reason``
    ``token_budget`` / ``length``)."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor | list[int]) -> "TrainBatch":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return TrainBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def to(self, device: torch.device) -> "TrainBatch":
        return TrainBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


OVERLONG_REASONS = ("token_budget", "length")
"""``EpisodeStats.finish_reason`` values of an episode cut by length (not by ``max_turns``)."""


class TrajectoryMismatch(ValueError):
    """A trajectory's ids, mask and log-probs do not line up; it is refused."""


def check_alignment(t: Trajectory) -> None:
    """Refuse a trajectory whose observation and sampled tokens are mislabelled.

    Sampled tokens (mask 1) carry a version >= 0 and a log-prob <= 0; observation
    tokens (mask 0) carry version -1 and log-prob exactly 0. Cheap: a few vector ops.
    """
    mask = t.loss_mask.numpy().astype(bool)
    ver = t.versions.numpy()
    lp = t.logprobs.numpy()
    where = f"trajectory {t.sample_id}#{t.chain} from {t.actor_id}"
    if not mask.any():
        raise TrajectoryMismatch(f"{where}: no sampled token")
    if (ver[mask] < 0).any() or (ver[~mask] != -1).any():
        raise TrajectoryMismatch(f"{where}: versions do not match the loss mask")
    if (lp[~mask] != 0).any():
        raise TrajectoryMismatch(f"{where}: observation tokens carry log-probs")


def collate(
    trajs: list[Trajectory], group_of: dict[str, int], pad_id: int, baselines: dict[str, float] | None = None
) -> TrainBatch:
    """Pad ``trajs`` into a ``TrainBatch``; ``group_of`` maps sample_id to group index,
    ``baselines`` sample_id to the greedy rollout's reward (ReMax)."""
    baselines = baselines or {}
    if not trajs:
        raise ValueError("collate: no trajectories (every one of the batch was refused or filtered)")
    n = len(trajs)
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in trajs]
    L = max(lengths)
    ids = np.full((n, L), pad_id, dtype=np.int64)
    attn = np.zeros((n, L), dtype=np.int64)
    mask = np.zeros((n, L - 1), dtype=np.float32)
    blp = np.zeros((n, L - 1), dtype=np.float32)
    rew = np.zeros((n, L - 1), dtype=np.float32)
    ver = np.full((n, L - 1), -1, dtype=np.int64)
    for i, t in enumerate(trajs):
        p, r = t.prompt_ids.numpy(), t.response_ids.numpy()
        P, R = len(p), len(r)
        ids[i, :P] = p
        ids[i, P : P + R] = r
        attn[i, : P + R] = 1
        # target position of response token j is P - 1 + j
        sl = slice(P - 1, P - 1 + R)
        m = t.loss_mask.numpy()
        mask[i, sl] = m
        blp[i, sl] = t.logprobs.numpy()
        ver[i, sl] = t.versions.numpy()
        sampled = np.nonzero(m)[0]
        if len(t.turn_rewards):
            turn_ends = _turn_ends(m)
            for end, tr in zip(turn_ends, t.turn_rewards):
                rew[i, P - 1 + end] += tr
        rew[i, P - 1 + sampled[-1]] += t.reward
    return TrainBatch(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(attn),
        loss_mask=torch.from_numpy(mask),
        behaviour_logprobs=torch.from_numpy(blp),
        token_rewards=torch.from_numpy(rew),
        versions=torch.from_numpy(ver),
        group_index=torch.tensor([group_of[t.sample_id] for t in trajs], dtype=torch.long),
        rewards=torch.tensor([t.reward for t in trajs], dtype=torch.float32),
        baseline_rewards=torch.tensor([baselines.get(t.sample_id, float("nan")) for t in trajs], dtype=torch.float32),
        response_lengths=torch.tensor([len(t.response_ids) for t in trajs], dtype=torch.long),
        overlong=torch.tensor([t.stats.truncated and t.stats.finish_reason in OVERLONG_REASONS for t in trajs]),
    )


def _turn_ends(mask: np.ndarray) -> list[int]:
    """Indices of the last sampled token of each run of 1s in ``mask``."""
    ends = np.nonzero((mask[:-1] == 1) & (mask[1:] == 0))[0].tolist()
    if mask[-1] == 1:
        ends.append(len(mask) - 1)
    return ends
