"""Splitting one learner batch over ranks, mini-batches and micro-batches.

Plumbing shared by the policy and critic updates (and their no-grad passes).
Rank ``r`` of ``world`` owns rows ``r, r + world, ...`` of the batch (its
*shard*). FSDP runs a collective in every forward and backward, so every rank
must run the same number of passes even when the shards differ in size (a
refused trajectory leaves ``N`` not a multiple of ``world``) or a token budget
cuts them into different numbers of passes: a rank with fewer passes runs the
missing ones on its row 0 with weight 0.

Micro-batches (``MicroBatching``) hold a fixed number of rows (verl's
``*_micro_batch_size_per_gpu``) or, with a token budget (verl's
``use_dynamic_bsz`` and ``*_max_token_len_per_gpu``), as many rows as fit it,
rows of like length together. Rows are right-padded to the batch's longest
row; a pass is cut to its own longest row (``Micro.take``), so a pass of short
rows runs no padding columns of the long ones.

Loss weighting: every aggregation mode is a weighted token sum over a
normaliser that does not depend on the loss (``learner.algos.losses``), so
each micro-batch's loss is its weighted token sum times one ``loss_scale``,
computed here from the whole mini-batch of every rank
(``algos.loss_scale(mode, U_mini, world, horizon)``). After FSDP averages
gradients over ranks, the gradient equals that of the chosen aggregation over
the whole mini-batch, however it is split into micro-batches (by rows or by
tokens) and ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from learner.algos.losses import agg_units, loss_scale

Rows = TypeVar("Rows")


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
class MicroBatching:
    """How one rank's rows are cut into passes (micro-batches)."""

    rows: int
    """Rows per pass (verl ``ppo_micro_batch_size_per_gpu`` / ``log_prob_micro_batch_size_per_gpu``);
    not used with ``max_tokens``."""
    max_tokens: int | None = None
    """Token budget per pass (verl ``use_dynamic_bsz`` with ``*_max_token_len_per_gpu``); None =
    ``rows`` per pass."""

    def groups(self, lengths: list[int]) -> list[list[int]]:
        """Positions into ``lengths`` (the real tokens of one rank's rows, in order) grouped into passes.

        By rows: consecutive runs of ``rows``. By tokens: rows longest first, each pass taking
        rows while ``rows in the pass * its longest row <= max_tokens``. That product is what
        the pass's forward runs (it is cut to its longest row and pads the others to it), so it
        bounds the real tokens too; a row longer than the budget is a pass alone. On rows sorted
        by length, taking as many as fit gives the fewest passes for this count."""
        if self.max_tokens is None:
            return [list(range(i, min(i + self.rows, len(lengths)))) for i in range(0, len(lengths), self.rows)]
        out: list[list[int]] = []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: equal lengths keep row order
            if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= self.max_tokens:
                out[-1].append(i)
            else:
                out.append([i])
        return out


def micro_batching(rows: int, use_dynamic_bsz: bool, max_token_len: int) -> MicroBatching:
    """The ``MicroBatching`` of a config section's three verl keys (``*_micro_batch_size_per_gpu``,
    ``*use_dynamic_bsz``, ``*_max_token_len_per_gpu``)."""
    return MicroBatching(rows, max_token_len if use_dynamic_bsz else None)


def _as_batching(size: int | MicroBatching) -> MicroBatching:
    return size if isinstance(size, MicroBatching) else MicroBatching(size)


def take(rows: Rows, idx: torch.Tensor, trim: int = 0) -> Rows:
    """``rows`` (a dataclass of per-row tensors, e.g. ``TrainBatch``; None fields stay None) at the
    row indices ``idx``, with the last ``trim`` columns of every tensor of 2 or more dims cut
    (columns that are padding in each of these rows: right padding, so [N, L] and [N, L-1]
    tensors lose the same columns)."""

    def cut(t: Any) -> Any:
        if t is None:
            return None
        t = t[idx]
        return t[:, : t.shape[1] - trim] if trim and t.dim() > 1 else t

    return type(rows)(**{f.name: cut(getattr(rows, f.name)) for f in fields(rows)})


@dataclass(frozen=True)
class Micro:
    idx: torch.Tensor
    """Row indices into this rank's shard (never empty)."""
    loss_scale: float
    """Factor on the micro-batch's weighted token sum (``algos.agg_loss(..., scale=)``);
    0 for a padding pass."""
    trim: int = 0
    """Trailing columns of the batch that are padding in every one of these rows."""

    def take(self, rows: Rows) -> Rows:
        """This micro-batch of ``rows`` (the shard's ``TrainBatch`` or per-row tensors), padding
        columns cut (``take``)."""
        return take(rows, self.idx, self.trim)


def chunks(n_local: int, n: int, world: int, size: int) -> list[tuple[torch.Tensor, bool]]:
    """No-grad passes of ``size`` rows over a shard of ``n_local`` rows, the same count on every rank.

    Returns (row indices, real) pairs; a padding pass (``real`` False) reuses row 0
    and its output is discarded.
    """
    n_max = math.ceil(n / world)
    out = []
    for start in range(0, n_max, size):
        idx = torch.arange(start, min(start + size, n_local))
        out.append((idx, True) if len(idx) else (torch.tensor([0]), False))
    return out


def token_chunks(lengths: list[int], world: int, batching: MicroBatching, device: torch.device) -> list[tuple[torch.Tensor, bool]]:
    """No-grad passes of a token budget over a shard whose rows have ``lengths`` real tokens, the
    same count on every rank (the most any rank needs: one all-reduce when ``world`` > 1).
    Returns (row indices, real) pairs as ``chunks``."""
    groups = batching.groups(lengths)
    count = len(groups)
    if world > 1:
        t = torch.tensor([count], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        count = int(t.item())
    return [(torch.tensor(g), True) for g in groups] + [(torch.tensor([0]), False)] * (count - len(groups))


def map_chunks(fn, shard, n: int, world: int, size: int | MicroBatching) -> torch.Tensor:
    """``fn`` (a no-grad forward: micro-batch -> [m, c, *] per-token values) over a shard in passes
    of ``size`` rows or of a token budget (``MicroBatching``), the same number of passes on every
    rank; returns [n_r, L-1, *] in the shard's row order. Each pass is cut to its longest row
    (``take``); the columns it did not run are 0 (padding in every one of its rows)."""
    batching = _as_batching(size)
    lengths = shard.host_lengths.tolist()  # kept on the host: no device read
    if batching.max_tokens is None:
        passes = chunks(len(shard), n, world, batching.rows)
    else:
        passes = token_chunks(lengths, world, batching, shard.attention_mask.device)
    cols = shard.attention_mask.shape[1]
    out = None
    for idx, real in passes:
        trim = cols - max(lengths[i] for i in idx.tolist()) if lengths else 0
        y = fn(take(shard, idx, trim))
        if not real:
            continue
        if out is None:
            out = y.new_zeros((len(shard), y.shape[1] + trim, *y.shape[2:]))
        out[idx, : y.shape[1]] = y
    return out


def plan_minibatches(
    mask: torch.Tensor,
    rank: int,
    world: int,
    rows_per_mini: int,
    micro_size: int | MicroBatching,
    agg_mode: str,
    horizon: int | None = None,
    lengths: torch.Tensor | None = None,
) -> list[list[Micro]]:
    """Mini-batches (one optimizer step each) of micro-batches (one backward each).

    Args:
        mask: [N, L-1] loss mask of the *whole* batch (every rank passes the same).
        rank, world: this process.
        rows_per_mini: rows of one rank's shard per mini-batch.
        micro_size: rows per micro-batch, or a ``MicroBatching`` (rows or a token budget).
        agg_mode: loss aggregation (``algos.LOSS_AGG_MODES``).
        horizon: the constant H of ``seq-mean-token-sum-norm`` (required there).
        lengths: [N] real tokens of each row of the whole batch (a host tensor; required by a
            token budget); given, each micro-batch is cut to its longest row (``Micro.trim``).

    Returns:
        One list of ``Micro`` per mini-batch; every rank gets the same number of
        mini-batches and of micro-batches in each. Every micro-batch of a
        mini-batch has the same ``loss_scale``, that of the mini-batch's rows on
        every rank.
    """
    batching = _as_batching(micro_size)
    if batching.max_tokens is not None and lengths is None:
        raise ValueError("plan_minibatches: a token budget (MicroBatching.max_tokens) needs the rows' lengths")
    n, cols = mask.shape[0], mask.shape[1] + 1
    real = [0] * n if lengths is None else [int(x) for x in lengths.tolist()]
    shards = [shard_rows(n, r, world) for r in range(world)]
    mine = shards[rank].tolist()
    n_max = len(shards[0])

    def trim(rows: list[int]) -> int:
        return 0 if lengths is None else cols - max(real[mine[i]] for i in rows)

    plan = []
    for start in range(0, n_max, rows_per_mini):
        end = start + rows_per_mini
        units = sum(agg_units(mask[s[start:end]], agg_mode) for s in shards)
        scale = loss_scale(agg_mode, units, world, horizon)
        groups = [batching.groups([real[i] for i in s[start:end].tolist()]) for s in shards]
        micros = [Micro(torch.tensor([start + p for p in g]), scale, trim([start + p for p in g])) for g in groups[rank]]
        pad = Micro(torch.tensor([0]), 0.0, trim([0]) if mine else 0)  # a pass on row 0, weight 0
        plan.append(micros + [pad] * (max(len(g) for g in groups) - len(micros)))
    return plan
