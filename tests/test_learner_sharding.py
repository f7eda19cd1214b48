"""learner/sharding.py: rows per rank, equal pass counts, and one loss scale per micro-batch that
makes the gradient of every aggregation mode independent of the micro-batch and rank split,
checked on hand-computed tensors and through the real Trainer on 1 and 2 gloo ranks."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from learner.algos.losses import LOSS_AGG_MODES, agg_loss
from learner.sharding import MicroBatching, chunks, plan_minibatches, shard_rows

T = torch.tensor
MODES = sorted(LOSS_AGG_MODES)


def test_shard_rows_interleave():
    assert shard_rows(7, 0, 2).tolist() == [0, 2, 4, 6]
    assert shard_rows(7, 1, 2).tolist() == [1, 3, 5]
    assert shard_rows(2, 2, 3).tolist() == []


def test_chunks_give_every_rank_the_same_number_of_passes():
    # 7 rows over 2 ranks: rank 0 holds 4, rank 1 holds 3; passes of 3 rows
    rank0 = [(idx.tolist(), real) for idx, real in chunks(4, 7, 2, 3)]
    rank1 = [(idx.tolist(), real) for idx, real in chunks(3, 7, 2, 3)]
    assert rank0 == [([0, 1, 2], True), ([3], True)]
    assert rank1 == [([0, 1, 2], True), ([0], False)]  # a padding pass on row 0, output dropped


# Four rows with 3, 1, 2, 2 sampled tokens.
MASK = T([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)


@pytest.mark.parametrize(
    "mode, scale",
    [
        ("token-mean", 1 / 8),  # 8 tokens
        ("seq-mean-token-sum", 1 / 4),  # 4 rows
        ("seq-mean-token-mean", 1 / 4),
        ("seq-mean-token-sum-norm", 1 / (4 * 16)),  # 4 rows, horizon 16
    ],
)
def test_plan_one_rank_three_plus_one(mode, scale):
    """A 3 + 1 micro-batch split: both micro-batches get the mini-batch's scale. (Dr. GRPO used to
    get 3/4 and 1/4 on a token sum, so the lone row's tokens weighed a third of the others'.)"""
    (mini,) = plan_minibatches(MASK, 0, 1, rows_per_mini=4, micro_size=3, agg_mode=mode, horizon=16)
    assert [m.idx.tolist() for m in mini] == [[0, 1, 2], [3]]
    assert [m.loss_scale for m in mini] == pytest.approx([scale, scale])


def test_plan_two_ranks_with_a_padding_pass():
    # 5 rows over 2 ranks: rank 0 owns rows 0, 2, 4 and rank 1 rows 1, 3; 2 shard rows per mini-batch
    mask = torch.cat([MASK, T([[1.0, 1.0, 1.0, 1.0]])])
    plans = [plan_minibatches(mask, r, 2, rows_per_mini=2, micro_size=1, agg_mode="token-mean") for r in (0, 1)]
    # mini-batch 1 = rows 0, 2 (rank 0) and 1, 3 (rank 1): 3 + 2 + 1 + 2 = 8 tokens -> 2 / 8
    # mini-batch 2 = row 4 (rank 0) alone: 4 tokens -> 2 / 4; rank 1 runs a zero-scale pass
    assert [[(m.idx.tolist(), m.loss_scale) for m in mini] for mini in plans[0]] == [
        [([0], 0.25), ([1], 0.25)], [([2], 0.5)]
    ]
    assert [[(m.idx.tolist(), m.loss_scale) for m in mini] for mini in plans[1]] == [
        [([0], 0.25), ([1], 0.25)], [([0], 0.0)]
    ]


def test_plan_rejects_sum_norm_without_a_horizon():
    with pytest.raises(ValueError, match="horizon"):
        plan_minibatches(MASK, 0, 1, 4, 2, "seq-mean-token-sum-norm")


def test_token_budget_groups_longest_first_within_the_budget():
    """Budget 8 over rows of 5, 3, 8, 2, 9, 1 tokens: longest first, each pass's rows times its
    longest row <= 8; the 9-token row is a pass alone; 5 + 3 fit 8 real tokens but not 2 x 5."""
    assert MicroBatching(rows=99, max_tokens=8).groups([5, 3, 8, 2, 9, 1]) == [[4], [2], [0], [1, 3], [5]]
    assert MicroBatching(rows=2).groups([5, 3, 8]) == [[0, 1], [2]]  # by rows: lengths play no part
    assert MicroBatching(rows=1, max_tokens=100).groups([4, 4, 4]) == [[0, 1, 2]]  # ties keep row order


def test_plan_token_budget_two_ranks_with_a_padding_pass():
    # 5 rows of 9, 4, 3, 6, 2 tokens (L = 9) with 3, 1, 2, 2, 1 sampled: rank 0 owns rows 0, 2, 4
    # (9, 3, 2 tokens), rank 1 rows 1, 3 (4, 6); one mini-batch, budget 12
    mask = torch.zeros(5, 8)
    mask[0, 5:8] = mask[1, 2] = mask[2, 0:2] = mask[3, 3:5] = mask[4, 0] = 1
    lengths = T([9, 4, 3, 6, 2])
    plans = [plan_minibatches(mask, r, 2, rows_per_mini=3, micro_size=MicroBatching(1, 12), agg_mode="token-mean",
                              lengths=lengths) for r in (0, 1)]
    # rank 0: the 9-token row alone (2 x 9 > 12), then its 3- and 2-token rows (2 x 3 <= 12), cut to 3
    # columns (trim 9 - 3 = 6); rank 1: both rows in one pass (2 x 6 = 12), cut to 6, then a
    # zero-scale pass on its row 0 (4 tokens: trim 5). 9 sampled tokens over 2 ranks: scale 2 / 9
    s = 2 / 9
    assert [[(m.idx.tolist(), m.loss_scale, m.trim) for m in mini] for mini in plans[0]] == [[([0], s, 0), ([1, 2], s, 6)]]
    assert [[(m.idx.tolist(), m.loss_scale, m.trim) for m in mini] for mini in plans[1]] == [[([1, 0], s, 3), ([0], 0.0, 5)]]
    # the cut columns hold no sampled token of the rows they are cut from
    for r, plan in enumerate(plans):
        rows = shard_rows(5, r, 2)
        for m in plan[0]:
            assert mask[rows[m.idx], mask.shape[1] - m.trim:].sum() == 0


def test_plan_token_budget_needs_lengths():
    with pytest.raises(ValueError, match="lengths"):
        plan_minibatches(MASK, 0, 1, 4, MicroBatching(1, 8), "token-mean")


def _planned_grad(loss_mat, mask, mode, world, micro, rows_per_mini, horizon=8, lengths=None):
    """The gradient FSDP would see: every rank's planned micro-batch losses (each cut by its
    ``trim`` columns, as ``Micro.take`` cuts it), averaged over ranks."""
    grads = []
    for mini_i in range(len(plan_minibatches(mask, 0, world, rows_per_mini, micro, mode, horizon, lengths))):
        total = torch.zeros_like(loss_mat)
        for rank in range(world):
            mine = shard_rows(len(mask), rank, world)
            mini = plan_minibatches(mask, rank, world, rows_per_mini, micro, mode, horizon, lengths)[mini_i]
            for m in mini:
                x = loss_mat.detach().clone().requires_grad_()
                rows = mine[m.idx] if len(mine) else torch.tensor([0])
                cols = mask.shape[1] - m.trim
                agg_loss(x[rows][:, :cols], mask[rows][:, :cols], mode, scale=m.loss_scale).backward()
                total += x.grad
        grads.append(total / world)
    return grads


@pytest.mark.parametrize("mode", MODES)
def test_gradient_is_the_same_for_micro_splits_1_2_4_and_ranks_1_2(mode):
    """8 rows of varied length in one mini-batch: d loss / d per-token loss is the hand-computed
    aggregation weight for every split (token-mean 1/N_tokens, seq modes 1/N_rows times 1/n_b or 1/H)."""
    gen = torch.Generator().manual_seed(0)
    lengths = [1, 2, 3, 4, 5, 6, 7, 8]
    mask = T([[1.0] * n + [0.0] * (8 - n) for n in lengths])
    loss_mat = torch.randn(8, 8, generator=gen)
    coef = {
        "token-mean": [1 / sum(lengths)] * 8,
        "seq-mean-token-sum": [1 / 8] * 8,
        "seq-mean-token-mean": [1 / 8 / n for n in lengths],
        "seq-mean-token-sum-norm": [1 / 8 / 8] * 8,  # horizon 8
    }[mode]
    expected = mask * T(coef).unsqueeze(-1)
    for world in (1, 2):
        for micro in (1, 2, 4):
            (grad,) = _planned_grad(loss_mat, mask, mode, world, micro, rows_per_mini=8 // world)
            torch.testing.assert_close(grad, expected, msg=f"world {world}, micro {micro}")


@pytest.mark.parametrize("mode", MODES)
def test_gradient_is_the_same_for_token_budget_splits_and_ranks_1_2(mode):
    """The same 8 rows (2..9 real tokens, one prompt token each) split by token budgets of 4 (every
    row alone, most of them over the budget), 9, 20 and 40 tokens, cut to each pass's longest row,
    on 1 and 2 ranks: the same hand-computed gradient as the fixed splits."""
    lengths = [1, 2, 3, 4, 5, 6, 7, 8]
    mask = T([[1.0] * n + [0.0] * (8 - n) for n in lengths])
    loss_mat = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    coef = {
        "token-mean": [1 / sum(lengths)] * 8,
        "seq-mean-token-sum": [1 / 8] * 8,
        "seq-mean-token-mean": [1 / 8 / n for n in lengths],
        "seq-mean-token-sum-norm": [1 / 8 / 8] * 8,
    }[mode]
    expected = mask * T(coef).unsqueeze(-1)
    tokens = T([n + 1 for n in lengths])
    for world in (1, 2):
        for budget in (4, 9, 20, 40):
            plan = plan_minibatches(mask, 0, world, 8 // world, MicroBatching(1, budget), mode, 8, tokens)
            if budget == 4:
                assert all(len(m.idx) == 1 for m in plan[0])
            if budget == 40:
                assert max(len(m.idx) for m in plan[0]) > 2
            (grad,) = _planned_grad(loss_mat, mask, mode, world, MicroBatching(1, budget), 8 // world, lengths=tokens)
            torch.testing.assert_close(grad, expected, msg=f"world {world}, budget {budget}")


@pytest.mark.parametrize("mode", MODES)
def test_each_ppo_mini_batch_is_normalised_by_its_own_rows(mode):
    """Two mini-batches of 4 rows: each optimizer step's gradient is the aggregation over its own
    4 rows, whatever the micro and rank split."""
    lengths = [1, 2, 3, 4, 5, 6, 7, 8]
    mask = T([[1.0] * n + [0.0] * (8 - n) for n in lengths])
    loss_mat = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    reference = None
    for world in (1, 2):
        for micro in (1, 2, 4):
            grads = _planned_grad(loss_mat, mask, mode, world, micro, rows_per_mini=4 // world)
            # which rows a mini-batch holds depends on the rank split; its gradient is the
            # aggregation over those rows alone
            for g in grads:
                rows = g.abs().sum(-1) > 0
                x = loss_mat.clone().requires_grad_()
                agg_loss(x[rows], mask[rows], mode, 8).backward()
                whole = torch.zeros_like(loss_mat)
                whole[rows] = x.grad[rows]
                torch.testing.assert_close(g, whole)
            if world == 1 and micro == 1:
                reference = grads
    assert reference is not None and len(reference) == 2


# --------------------------------------------------------------------------
# through the real Trainer (FSDP2, gloo): 1 rank in-process, 2 ranks spawned


def _traj(sample_id: str, chain: int, reward: float, n_sampled: int, seed: int):
    from protocol import messages as m

    rng = np.random.default_rng(seed)
    mask = [1] * n_sampled + [0] * 3 + [1] * 2  # a turn, an observation, a short second turn
    logprobs = np.where(np.array(mask) == 1, -rng.uniform(4.0, 8.0, size=len(mask)), 0.0)
    return m.Trajectory(
        actor_id="a0", sample_id=sample_id, chain=chain,
        prompt_ids=m.pack(rng.integers(10, 500, size=5), "int32"),
        response_ids=m.pack(rng.integers(10, 500, size=len(mask)), "int32"),
        loss_mask=m.pack(mask, "uint8"), logprobs=m.pack(logprobs, "float32"),
        versions=m.pack([0 if k else -1 for k in mask], "int32"),
        reward=reward, reward_components={"reward": reward},
        stats=m.EpisodeStats(num_turns=2, tool_calls={}),
    )


def _trajs():
    """7 rows (groups of 4 and 3) with 1..7 + 2 sampled tokens, so every mode weighs them differently."""
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    return [_traj("0:0" if i < 4 else "0:1", i % 4, r, n_sampled=i + 1, seed=i) for i, r in enumerate(rewards)]


def _full(grad: torch.Tensor) -> torch.Tensor:
    """A gradient in full: FSDP2's (2 ranks) is a DTensor, the plain module's (1 rank) a tensor."""
    from torch.distributed.tensor import DTensor

    return grad.full_tensor() if isinstance(grad, DTensor) else grad.detach()


def _grads_for(trainer, batch, runs) -> dict[str, dict[str, torch.Tensor]]:
    """Policy gradient of one train_step per (agg mode, micro size) in ``runs``, full tensors; a
    micro size ``"t<N>"`` is a token budget of N tokens (``use_dynamic_bsz``)."""
    out = {}
    actor = trainer.cfg.actor_rollout_ref.actor
    for mode, micro in runs:
        actor.loss_agg_mode = mode
        actor.use_dynamic_bsz = isinstance(micro, str)
        if actor.use_dynamic_bsz:
            actor.ppo_max_token_len_per_gpu = int(micro[1:])
        else:
            actor.ppo_micro_batch_size_per_gpu = micro
        trainer.loss_cfg = dataclasses.replace(trainer.loss_cfg, loss_agg_mode=mode)
        trainer.train_step(batch)
        out[f"{mode}/{micro}"] = {n: _full(p.grad).clone() for n, p in trainer.model.named_parameters()}
    return out


def _logprobs_for(trainer, batch, budgets) -> dict[str, torch.Tensor]:
    """The proximal log-prob pass over the whole batch ([N, L-1], gathered from every rank) with
    passes of 3 rows and with each token budget in ``budgets``."""
    from learner.sharding import gather_rows

    rollout = trainer.cfg.actor_rollout_ref.rollout
    full = batch.to(trainer.device)
    shard = full.select(shard_rows(len(batch), trainer.rank, trainer.world))
    out = {}
    for budget in (None, *budgets):
        rollout.log_prob_use_dynamic_bsz = budget is not None
        rollout.log_prob_micro_batch_size_per_gpu = 3
        rollout.log_prob_max_token_len_per_gpu = budget or 1
        out[str(budget)] = gather_rows(trainer.logprobs(shard, len(batch)), len(batch))
    return out


def _config(model_dir, run_dir, packed: bool = False):
    from tests.learner_support import learner_config

    return learner_config(
        model_dir, run_dir,
        f"actor_rollout_ref.model.use_remove_padding={str(packed).lower()}",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",  # both prompts: one optimizer step per train_step
        "actor_rollout_ref.actor.grad_clip=1e9",  # gradients are compared unclipped
        "actor_rollout_ref.actor.optim.lr=1e-30",  # and the weights stay put between runs
        "actor_rollout_ref.actor.loss_agg_horizon=12",
    )


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal up to float32 summation order: 1e-5 of the tensor's largest entry."""
    atol = 1e-5 * float(want.abs().max()) + 1e-12
    torch.testing.assert_close(got, want, rtol=1e-4, atol=atol, msg=lambda e: f"{what}: {e}")


RUNS_1 = [(mode, micro) for mode in MODES for micro in (1, 2, 4, "t17", "t30", "t40")]
RUNS_2 = [(mode, micro) for mode in MODES for micro in (1, 2, "t30")]
# token budgets over rows of 11..17 tokens (5 prompt + 6..12 response): 17 = one row per pass;
# 30 = two rows of <= 15 (the 17- and 16-token rows alone), on 2 ranks 3 passes on rank 0 (17 | 15 13 | 11)
# but 2 on rank 1 (16 | 14 12), which runs a zero-scale padding pass; 40 = pairs of any rows


def _rank_main(rank: int, cfg, port: int, out_path: str) -> None:
    from learner.trainer import Trainer

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    trainer = Trainer(cfg, [{"question": f"q{i}", "answer": "1"} for i in range(8)])
    trainer.setup()
    try:
        batch = trainer.step_batch(_trajs()).batch
        grads = _grads_for(trainer, batch, RUNS_2)
        logprobs = _logprobs_for(trainer, batch, (30,))
        if rank == 0:
            torch.save((grads, logprobs), out_path)
    finally:
        trainer.cleanup()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_trainer_gradient_is_the_same_for_micro_splits_and_ranks(tmp_path, tiny_model_dir, packed):
    """Padded rows, and rows packed without padding (``model.use_remove_padding``), which must
    give the same numbers. Every aggregation mode: the gradient of a real train_step (7 rows, one mini-batch) is the
    same with micro-batches of 1, 2 and 4 rows and of token budgets of 17, 30 and 40 tokens on one
    rank, and of 1 and 2 rows and 30 tokens on two gloo ranks (where rank 1 holds 3 rows and runs a
    zero-scale padding pass). The proximal log-prob pass gives the same log-probs, in row order,
    by rows or by a token budget, on one rank or two."""
    from launcher.local import free_port
    from tests.learner_support import run_ranks, trainer_world_1

    with trainer_world_1(_config(tiny_model_dir, tmp_path / "w1", packed)) as trainer:
        batch = trainer.step_batch(_trajs()).batch
        one = _grads_for(trainer, batch, RUNS_1)
        logprobs_one = _logprobs_for(trainer, batch, (17, 30, 40))

    out = tmp_path / "grads_w2.pt"
    run_ranks(_rank_main, (_config(tiny_model_dir, tmp_path / "w2", packed), free_port(), str(out)), "2-rank trainer",
              timeout_s=600)
    two, logprobs_two = torch.load(out)

    for mode in MODES:
        ref = one[f"{mode}/1"]
        assert max(float(g.abs().max()) for g in ref.values()) > 0, mode
        for key in [f"{mode}/2", f"{mode}/4", f"{mode}/t17", f"{mode}/t30", f"{mode}/t40"]:
            for name, g in one[key].items():
                _close(g, ref[name], f"{key} {name}")
        for micro in (1, 2, "t30"):
            for name, g in two[f"{mode}/{micro}"].items():
                _close(g, ref[name], f"2 ranks {mode}/{micro} {name}")
    by_rows = logprobs_one["None"]
    assert (by_rows != 0).sum() == sum(t.loss_mask.numpy().sum() for t in _trajs())  # every sampled token
    for key, lp in [*logprobs_one.items(), *(("2 ranks " + k, v) for k, v in logprobs_two.items())]:
        _close(lp, by_rows, f"log-probs {key}")
    # the modes really differ (the test would not notice a mode silently falling back to another)
    names = list(one["token-mean/1"])
    assert any(not torch.allclose(one["token-mean/1"][n], one["seq-mean-token-mean/1"][n]) for n in names)
    assert any(not torch.allclose(one["seq-mean-token-sum/1"][n], one["seq-mean-token-sum-norm/1"][n]) for n in names)
