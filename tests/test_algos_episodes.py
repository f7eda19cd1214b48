"""DAPO's overlong reward shaping and the loss filters (overlong, zero_variance): hand-computed
values, then through the real train_step."""

import numpy as np
import pytest
import torch

from learner.algos.episodes import (
    EpisodeFacts,
    add_at_last_token,
    keep_informative_groups,
    keep_not_overlong,
    loss_keep,
    overlong_penalty,
)
from protocol import messages as m
from tests.learner_support import learner_config, trainer_world_1

T = torch.tensor


def test_overlong_penalty_hand_values():
    # budget 10, buffer 4: free up to 6, then (6 - L) / 4, -1 past the budget; factor .5
    out = overlong_penalty(T([5, 6, 8, 10, 12]), max_length=10, buffer=4, factor=0.5)
    torch.testing.assert_close(out, T([0.0, 0.0, -0.25, -0.5, -0.5]))
    with pytest.raises(ValueError, match="overlong buffer"):
        overlong_penalty(T([5]), max_length=10, buffer=11)


def test_penalty_lands_on_the_last_sampled_token():
    mask = T([[1.0, 1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    rewards = torch.zeros(3, 5)
    rewards[0, 3] = 1.0
    out = add_at_last_token(rewards, mask, T([-0.5, -1.0, -2.0]))
    torch.testing.assert_close(out, T([[0.0, 0.0, 0.0, 0.5, 0.0], [-1.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 5]))
    assert rewards[0, 3] == 1.0  # not modified in place


def test_filters_hand_values():
    facts = EpisodeFacts(
        overlong=T([False, True, False, False, True]),
        rewards=T([1.0, 0.0, 1.0, 1.0, 0.0]),
        group_index=T([0, 0, 1, 1, 2]),
    )
    assert keep_not_overlong(facts).tolist() == [True, False, True, True, False]
    # group 1 (1, 1) and group 2 (one episode) have no reward variance
    assert keep_informative_groups(facts).tolist() == [True, True, False, False, False]
    keep, stats = loss_keep(facts, ["overlong", "zero_variance"])
    assert keep.tolist() == [True, False, False, False, False]
    assert stats == {"actor/filtered_frac/overlong": [pytest.approx(0.4)], "actor/filtered_frac/zero_variance": [pytest.approx(0.6)]}
    keep, stats = loss_keep(facts, [])
    assert keep.all() and stats == {}


# --------------------------------------------------------------------------
# through train_step


def traj(sample_id, chain, reward, seed, overlong=False, n_response=12):
    rng = np.random.default_rng(seed)
    mask = [1] * 5 + [0] * 3 + [1] * (n_response - 8)
    logprobs = np.where(np.array(mask) == 1, -rng.uniform(4.0, 8.0, size=len(mask)), 0.0)
    return m.Trajectory(
        actor_id="a0", sample_id=sample_id, chain=chain,
        prompt_ids=m.pack(rng.integers(10, 500, size=6), "int32"),
        response_ids=m.pack(rng.integers(10, 500, size=len(mask)), "int32"),
        loss_mask=m.pack(mask, "uint8"), logprobs=m.pack(logprobs, "float32"),
        versions=m.pack([0 if k else -1 for k in mask], "int32"),
        reward=reward, reward_components={"reward": reward},
        stats=m.EpisodeStats(num_turns=2, tool_calls={}, truncated=overlong,
                             finish_reason="token_budget" if overlong else "answer"),
    )


def grads_after_step(trainer, trajs):
    stats = trainer.train_step(trainer.step_batch(trajs).batch)
    return stats, {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}


GRADS = (  # one optimizer step, gradients compared unclipped, weights kept put
    "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.actor.grad_clip=1e9",
    "actor_rollout_ref.actor.optim.lr=1e-30",
)


def test_overlong_filter_masks_truncated_episodes(tmp_path, tiny_model_dir):
    """Two truncated episodes: with the filter their tokens do not reach the gradient (changing
    them changes nothing); without it they do."""
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]

    def batch(seed_of_truncated):
        return [traj("0:0" if i < 4 else "0:1", i % 4, r, seed=seed_of_truncated if i in (1, 6) else i,
                     overlong=i in (1, 6)) for i, r in enumerate(rewards)]

    cfg = learner_config(tiny_model_dir, tmp_path / "on", *GRADS, "algorithm.loss_filters=[overlong]")
    with trainer_world_1(cfg) as trainer:
        stats, a = grads_after_step(trainer, batch(100))
        _, b = grads_after_step(trainer, batch(200))
    assert stats["actor/filtered_frac/overlong"] == pytest.approx(0.25)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-9)
    cfg = learner_config(tiny_model_dir, tmp_path / "off", *GRADS)
    with trainer_world_1(cfg) as trainer:
        _, c = grads_after_step(trainer, batch(100))
        _, d = grads_after_step(trainer, batch(200))
    assert any(not torch.allclose(c[n], d[n]) for n in c)


def test_zero_variance_filter_drops_the_group_from_the_normaliser(tmp_path, tiny_model_dir):
    """Group 0:0 scores 1, 1, 1, 1 (GRPO advantage 0), group 0:1 is mixed; all episodes have the
    same length. token-mean with the filter divides by half the tokens: exactly twice the gradient."""
    rewards = [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    trajs = [traj("0:0" if i < 4 else "0:1", i % 4, r, seed=i) for i, r in enumerate(rewards)]
    grads = {}
    for filters in ("[]", "[zero_variance]"):
        cfg = learner_config(tiny_model_dir, tmp_path / filters.strip("[]"), *GRADS, f"algorithm.loss_filters={filters}")
        with trainer_world_1(cfg) as trainer:
            stats, grads[filters] = grads_after_step(trainer, trajs)
    assert stats["actor/filtered_frac/zero_variance"] == pytest.approx(0.5)
    for name, g in grads["[]"].items():
        torch.testing.assert_close(grads["[zero_variance]"][name], 2 * g, rtol=1e-4, atol=1e-9)


def test_overlong_reward_shaping_through_train_step(tmp_path, tiny_model_dir):
    """Responses of 12 tokens, budget 14, buffer 4: free up to 10, penalty (10 - 12) / 4 * .5 = -.25."""
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    trajs = [traj("0:0" if i < 4 else "0:1", i % 4, r, seed=i) for i, r in enumerate(rewards)]
    cfg = learner_config(tiny_model_dir, tmp_path, "actor_rollout_ref.rollout.response_length=14",
                         "algorithm.overlong_buffer_len=4", "algorithm.overlong_penalty_factor=0.5")
    with trainer_world_1(cfg) as trainer:
        stats = trainer.train_step(trainer.step_batch(trajs).batch)
    assert stats["actor/overlong_penalty_mean"] == pytest.approx(-0.25)
    assert stats["actor/overlong_penalised_frac"] == 1.0
