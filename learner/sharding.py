"""Splitting one learner batch over ranks, mini-batches and micro-batches.

Plumbing shared by the policy and critic updates (and their no-grad passes).
Rank ``r`` of ``world`` owns rows ``r, r + world, ...`` of the batch (its
*shard*). FSDP runs a collective in every forward and backward, so every rank
must run the same number of passes even when the shards differ in size (a
refused trajectory leaves ``N`` not a multiple of ``world``): a rank whose
shard has no rows for a pass runs it on its row 0 with weight 0.

Loss weighting: every aggregation mode is a weighted token sum over a
normaliser that does not depend on the loss (``learner.algos.losses``), so
each micro-batch's loss is its weighted token sum times one ``loss_scale``,
computed here from the whole mini-batch of every rank
(``algos.loss_scale(mode, U_mini, world, horizon)``). After FSDP averages
gradients over ranks, the gradient equals that of the chosen aggregation over
the whole mini-batch, however it is split into micro-batches and ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from learner.algos.losses import agg_units, loss_scale


def shard_rows(n: int, rank: int, world: int) -> torch.Tensor:
    """[ceil((n - rank) / world)] indices of the rows rank ``rank`` owns."""
    return torch.arange(rank, n, world)


def gather_rows(local: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Reassemble a per-row tensor computed on every rank's shard into the whole batch.

    Args:
        local: [n_r, *] rows of this rank's shard (``shard_rows``), or None on every rank.
        n: rows in the whole batch.

    Returns:
        [n, *] on every rank (None if ``local`` is None). A collective.
    """
    if local is None:
        return None
    world = dist.get_world_size()
    if world == 1:
        return local
    width = math.ceil(n / world)
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = local.new_empty((n, *local.shape[1:]))
    for r, part in enumerate(parts):
        idx = shard_rows(n, r, world)
        out[idx] = part[: len(idx)]
    return out


@dataclass(frozen=True)
class Micro:
    idx: torch.Tensor
    """Row indices into this rank's shard (never empty)."""
    loss_scale: float
    """Factor on the micro-batch's weighted token sum (``algos.agg_loss(..., scale=)``);
    0 for a padding pass."""


def chunks(n_local: int, n: int, world: int, size: int) -> list[tuple[torch.Tensor, bool]]:
    """No-grad passes over a shard of ``n_local`` rows, the same count on every rank.

    Returns (row indices, real) pairs; a padding pass (``real`` False) reuses row 0
    and its output is discarded.
    """
    n_max = math.ceil(n / world)
    out = []
    for start in range(0, n_max, size):
        idx = torch.arange(start, min(start + size, n_local))
        out.append((idx, True) if len(idx) else (torch.tensor([0]), False))
    return out


def map_chunks(fn, shard, n: int, world: int, size: int) -> torch.Tensor:
    """``fn`` (a no-grad forward: micro-batch -> [m, *]) over a shard in passes of ``size`` rows,
    the same number of passes on every rank (``chunks``); returns [n_r, *]."""
    outs = []
    for idx, real in chunks(len(shard), n, world, size):
        out = fn(shard.select(idx))
        if real:
            outs.append(out)
    return torch.cat(outs)


def plan_minibatches(
    mask: torch.Tensor,
    rank: int,
    world: int,
    rows_per_mini: int,
    micro_size: int,
    agg_mode: str,
    horizon: int | None = None,
) -> list[list[Micro]]:
    """Mini-batches (one optimizer step each) of micro-batches (one backward each).

    Args:
        mask: [N, T] loss mask of the *whole* batch (every rank passes the same).
        rank, world: this process.
        rows_per_mini: rows of one rank's shard per mini-batch.
        micro_size: rows per micro-batch.
        agg_mode: loss aggregation (``algos.LOSS_AGG_MODES``).
        horizon: the constant H of ``seq-mean-token-sum-norm`` (required there).

    Returns:
        One list of ``Micro`` per mini-batch; every rank gets the same number of
        mini-batches and of micro-batches in each. Every micro-batch of a
        mini-batch has the same ``loss_scale``, that of the mini-batch's rows on
        every rank.
    """
    n = mask.shape[0]
    shards = [shard_rows(n, r, world) for r in range(world)]
    mine = len(shards[rank])
    n_max = len(shards[0])
    plan = []
    for start in range(0, n_max, rows_per_mini):
        end = start + rows_per_mini
        units = sum(agg_units(mask[s[start:end]], agg_mode) for s in shards)
        scale = loss_scale(agg_mode, units, world, horizon)
        micros = []
        for m_start in range(start, min(end, n_max), micro_size):
            idx = torch.arange(m_start, min(m_start + micro_size, end, mine))
            micros.append(Micro(idx, scale) if len(idx) else Micro(torch.tensor([0]), 0.0))
        plan.append(micros)
    return plan
