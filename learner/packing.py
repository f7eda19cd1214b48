"""Shared-prefix layout of a learner forward: a group's prompt runs through the model once.

In GRPO-style training every prompt is sampled ``num_chains`` times, and the prompt is most of a
row's tokens (the demo: 72 prompt tokens, about 13 response tokens per row). A causal decoder's
hidden states at the prompt's positions depend only on the prompt, so the rows of a group can
share them: each group becomes one sequence ``[prefix, suffix_1, ..., suffix_k]`` in which
``suffix_i`` (row i's tokens after the shared prefix, at their original positions) attends to the
prefix and to itself, causally, and to no other suffix. The result is the same function of the
same parameters as the padded forward (the prefix's gradient is the sum of what each row would
send it), computed on ``P + sum(len_i - P)`` tokens instead of ``k * L``.

The shared prefix is measured, not assumed: the longest run of tokens that every row of the
group starts with (a multi-turn group's rows may share more than the prompt; a row split from a
rewritten history may share less), found once per batch on the host (``TrainBatch.shared_prefix``,
``learner.batch.group_prefixes``), so planning a forward's layout reads nothing from the device.

The layout needs an attention that takes an arbitrary boolean mask (SDPA; not flash-attention,
whose kernels take sequence boundaries only); ``shares_prefix`` says whether a model runs with one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASKED_ATTENTION = ("sdpa",)
"""Attention implementations that take the layout's [G, 1, T, T] boolean mask as given."""


def shares_prefix(model) -> bool:
    """Whether ``model`` runs an attention that takes the shared-prefix mask (``MASKED_ATTENTION``)."""
    return getattr(model.config, "_attn_implementation", None) in MASKED_ATTENTION


@dataclass
class PrefixLayout:
    """One micro-batch of n right-padded rows [n, L] laid out as G group sequences [G, T]."""

    input_ids: torch.Tensor
    """[G, T] each group's shared prefix, then each of its rows' suffixes; 0 after the end."""
    position_ids: torch.Tensor
    """[G, T] every token's position in its original row (prefix 0..P-1, a suffix from P on)."""
    attention_mask: torch.Tensor
    """[G, 1, T, T] bool, True = the query token (row) may attend to the key token (column): the
    prefix and its own suffix, causally. A padding token attends to itself only (so no softmax row
    is empty and nothing reads it)."""
    source: torch.Tensor
    """[n, L] long: where each of the batch's tokens is in the flattened [G * T] layout (its
    group's prefix for t < P); 0 at padding."""

    tokens: int
    """Real tokens the layout runs (the padded batch runs ``n * L`` slots)."""


def prefix_layout(input_ids: torch.Tensor, lengths: list[int], groups: list[int], shared: list[int]) -> PrefixLayout | None:
    """The shared-prefix layout of right-padded rows, or None where it would not be smaller than
    the padded batch.

    input_ids: [n, L] (on any device; only indexed, never read on the host); lengths: each row's
    real tokens (they come first); groups: rows with the same value form one group; shared: the
    leading tokens each row has in common with every other row of its group (``TrainBatch``'s
    host fields: ``learner.batch.group_prefixes``). The layout is used when it runs fewer token
    slots than the padded batch (``G * T < n * L``) and its attention scores cover at most twice
    the area of the padded forward's (``G * T * T <= 2 * n * L * L``; the padded forward's SDPA
    mask is [n, 1, L, L] too): long responses after a short prompt give long group sequences that
    share little. Planned on the host from the lists, O(n * L) plus the [G, T, T] mask."""
    device = input_ids.device
    n, L = input_ids.shape
    members: dict[int, list[int]] = {}
    for r, g in enumerate(groups):
        members.setdefault(g, []).append(r)
    plans = []  # (rows, prefix length, sequence length)
    for rows in members.values():
        prefix = min(shared[r] for r in rows)
        plans.append((rows, prefix, prefix + sum(lengths[r] - prefix for r in rows)))
    G, T = len(plans), max(p[2] for p in plans)
    if G * T >= n * L or G * T * T > 2 * n * L * L:
        return None
    take = torch.zeros(G, T, dtype=torch.long)  # flat index into input_ids of each layout token
    pos = torch.zeros(G, T, dtype=torch.long)
    seg = torch.full((G, T), -1, dtype=torch.long)  # 0 prefix, i + 1 the group's i-th suffix, -1 padding
    source = torch.zeros(n, L, dtype=torch.long)
    for g, (rows, prefix, _) in enumerate(plans):
        base = g * T
        take[g, :prefix] = rows[0] * L + torch.arange(prefix)
        pos[g, :prefix] = torch.arange(prefix)
        seg[g, :prefix] = 0
        at = prefix
        for i, r in enumerate(rows):
            k = lengths[r] - prefix
            take[g, at : at + k] = r * L + torch.arange(prefix, lengths[r])
            pos[g, at : at + k] = torch.arange(prefix, lengths[r])
            seg[g, at : at + k] = i + 1
            source[r, :prefix] = base + torch.arange(prefix)
            source[r, prefix : lengths[r]] = base + at + torch.arange(k)
            at += k
    q, k = seg.unsqueeze(-1), seg.unsqueeze(-2)  # [G, T, 1], [G, 1, T]
    mask = ((k == 0) | (k == q)) & (k >= 0) & (q >= 0) & torch.ones(T, T, dtype=torch.bool).tril()
    mask |= torch.eye(T, dtype=torch.bool)  # padding attends to itself
    pad = seg < 0
    ids = input_ids.reshape(-1)[take.to(device)].masked_fill(pad.to(device), 0)
    return PrefixLayout(
        input_ids=ids, position_ids=pos.to(device), attention_mask=mask.unsqueeze(1).to(device),
        source=source.to(device), tokens=sum(p[2] for p in plans),
    )
