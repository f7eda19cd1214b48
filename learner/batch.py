"""Turning trajectories into the padded tensors one training step consumes.

Every per-token tensor is aligned with *next-token prediction*: column ``t``
is about predicting ``input_ids[:, t + 1]`` from the logits at ``t``. Prompt
positions, observation tokens and padding have ``loss_mask`` 0; the sampled
tokens have 1. Rewards sit on the last sampled token of the response (the
outcome reward) and, when an environment gives per-turn rewards, on the last
sampled token of each assistant turn.

A chain's episode may come as several trajectories (``Trajectory.segment`` of
``num_segments``: an external agent's harness rewrote its history, see
``actors/endpoint.py``). Each is a row of its own; the outcome reward sits on
the last sampled token of the chain's last segment, and ``over_chains`` runs
the advantage estimator on the chain's segments laid end to end, so group
statistics count chains, not segments, and every segment gets its chain's
advantage.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from protocol.messages import Trajectory, sampled_run_ends


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
    chain_index: torch.Tensor
    """[N] long: rows of the same episode (one chain of one prompt) share an index; a chain split
    into several training sequences has several rows."""
    segment_index: torch.Tensor
    """[N] long: the row's place in its chain's episode (``Trajectory.segment``); 0 for a chain of one row."""
    host_lengths: torch.Tensor
    """[N] long, always on the host (``to`` leaves the ``HOST_FIELDS`` there): the row's real tokens.
    With ``host_groups`` and ``shared_prefix`` it plans a forward's shared-prefix layout
    (``learner.packing``) without reading the device."""
    host_groups: torch.Tensor
    """[N] long, on the host: ``group_index``."""
    shared_prefix: torch.Tensor
    """[N] long, on the host: the leading tokens every row of the row's group starts with (the
    group's prompt, at least, when its chains were sampled from one prompt)."""

    HOST_FIELDS = ("host_lengths", "host_groups", "shared_prefix")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor | list[int]) -> "TrainBatch":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return TrainBatch(**{f.name: getattr(self, f.name)[idx.cpu() if f.name in self.HOST_FIELDS else idx] for f in fields(self)})

    def to(self, device: torch.device) -> "TrainBatch":
        return TrainBatch(**{f.name: getattr(self, f.name) if f.name in self.HOST_FIELDS else getattr(self, f.name).to(device)
                             for f in fields(self)})


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
    chain_of: dict[tuple[str, int, bool], int] = {}
    groups = [group_of[t.sample_id] for t in trajs]
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
            turn_ends = sampled_run_ends(m)
            for end, tr in zip(turn_ends, t.turn_rewards):
                rew[i, P - 1 + end] += tr
        if t.segment == t.num_segments - 1:  # the chain's outcome, once, at the end of its episode
            rew[i, P - 1 + sampled[-1]] += t.reward
        chain_of.setdefault((t.sample_id, t.chain, t.greedy), len(chain_of))
    return TrainBatch(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(attn),
        loss_mask=torch.from_numpy(mask),
        behaviour_logprobs=torch.from_numpy(blp),
        token_rewards=torch.from_numpy(rew),
        versions=torch.from_numpy(ver),
        group_index=torch.tensor(groups, dtype=torch.long),
        rewards=torch.tensor([t.reward for t in trajs], dtype=torch.float32),
        baseline_rewards=torch.tensor([baselines.get(t.sample_id, float("nan")) for t in trajs], dtype=torch.float32),
        response_lengths=torch.tensor([len(t.response_ids) for t in trajs], dtype=torch.long),
        overlong=torch.tensor([t.stats.truncated and t.stats.finish_reason in OVERLONG_REASONS for t in trajs]),
        chain_index=torch.tensor([chain_of[(t.sample_id, t.chain, t.greedy)] for t in trajs], dtype=torch.long),
        segment_index=torch.tensor([t.segment for t in trajs], dtype=torch.long),
        host_lengths=torch.tensor(lengths, dtype=torch.long),
        host_groups=torch.tensor(groups, dtype=torch.long),
        shared_prefix=torch.from_numpy(group_prefixes(ids, lengths, groups)),
    )


def group_prefixes(ids: np.ndarray, lengths: list[int], groups: list[int]) -> np.ndarray:
    """[N] int64: for each row of ``ids`` [N, L] (``lengths`` real tokens each), how many leading
    tokens every row with the same ``groups`` value starts with (a row alone: its length)."""
    out = np.zeros(len(lengths), dtype=np.int64)
    members: dict[int, list[int]] = {}
    for r, g in enumerate(groups):
        members.setdefault(g, []).append(r)
    for rows in members.values():
        prefix = min(lengths[r] for r in rows)
        differ = (ids[rows, :prefix] != ids[rows[0], :prefix]).any(0).nonzero()[0]
        out[rows] = differ[0] if len(differ) else prefix
    return out


def over_chains(adv_fn, inputs, cfg, chain_index: torch.Tensor, segment_index: torch.Tensor):
    """``adv_fn(inputs, cfg)`` with one row per chain instead of one per training sequence.

    The rows of a chain (``chain_index``) are laid end to end in ``segment_index`` order: every
    [N,T] tensor becomes [C, K*T] (C chains, K the most segments of any chain, missing segments
    masked out), the per-row ``group_index`` and ``baseline_rewards`` become per-chain. The
    estimator then sees each episode as one sequence: group statistics (GRPO, RLOO, ...) count
    chains, an outcome advantage is broadcast over every segment of its chain, and token-level
    estimators (GAE, REINFORCE++) carry returns across a split, the positions between a segment's
    end and the next one's first sampled token being masked out like observations. The
    advantages and returns are cut back into the rows, [N,T].

    Args:
        adv_fn: an estimator, ``fn(AdvantageInputs, AdvantageConfig) -> (adv[B,T], returns[B,T])``.
        inputs: ``learner.algos.AdvantageInputs`` over the N rows.
        chain_index: [N] long, rows of one chain share an index (any ids).
        segment_index: [N] long, each row's segment within its chain (0..K-1, unique per chain).
    """
    from learner.algos import AdvantageInputs

    n, t = inputs.token_rewards.shape
    chains, row_chain = torch.unique(chain_index, return_inverse=True)
    if len(chains) == n:  # no chain was split: nothing to lay out
        return adv_fn(inputs, cfg)
    c, k = len(chains), int(segment_index.max()) + 1
    seg = segment_index.to(row_chain.device)

    def grid(x: torch.Tensor) -> torch.Tensor:  # [N,T] -> [C, K*T]
        out = x.new_zeros((c, k, t))
        out[row_chain, seg] = x
        return out.view(c, k * t)

    def per_chain(x: torch.Tensor) -> torch.Tensor:  # [N] -> [C] (every row of a chain holds the same value)
        out = x.new_zeros(c)
        out[row_chain] = x
        return out

    laid = AdvantageInputs(
        grid(inputs.token_rewards), grid(inputs.response_mask), per_chain(inputs.group_index),
        values=None if inputs.values is None else grid(inputs.values),
        baseline_rewards=None if inputs.baseline_rewards is None else per_chain(inputs.baseline_rewards),
    )
    adv, returns = adv_fn(laid, cfg)
    return adv.view(c, k, t)[row_chain, seg], returns.view(c, k, t)[row_chain, seg]


