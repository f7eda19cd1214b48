"""Advantage estimators against hand-computed values and their definitions."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageConfig,
    AdvantageInputs,
    compute_gae,
    discounted_returns,
    gae,
    get_advantage_estimator,
    gpg,
    grpo,
    grpo_passk,
    masked_mean,
    masked_var,
    masked_whiten,
    needs_critic,
    needs_greedy_baseline,
    reinforce_plus_plus,
    reinforce_plus_plus_baseline,
    opo,
    remax,
    rloo,
)

T = torch.tensor


def whiten_list(xs):
    """Reference whitening of a plain list: (x - mean) / unbiased std."""
    v = T(xs, dtype=torch.float64)
    return ((v - v.mean()) / v.std()).tolist()


# --------------------------------------------------------------------------
# masked helpers


def test_masked_mean_all_and_per_row():
    values = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = T([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(7 / 3)
    torch.testing.assert_close(masked_mean(values, mask, dim=-1), T([1.5, 4.0]))


def test_masked_mean_empty_mask_is_zero():
    assert masked_mean(T([1.0, 2.0]), T([0, 0])).item() == 0.0


def test_masked_var_unbiased_and_biased():
    values = T([1.0, 2.0, 4.0, 100.0])
    mask = T([1, 1, 1, 0])
    # mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9
    assert masked_var(values, mask).item() == pytest.approx(21 / 9)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(14 / 9)


def test_masked_var_one_element_raises():
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(T([1.0, 2.0]), T([1, 0]))


def test_masked_whiten_zeroes_outside_mask():
    out = masked_whiten(T([1.0, 3.0, 100.0]), T([1, 1, 0]))
    # mean 2, unbiased var 2
    torch.testing.assert_close(out, T([-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]))


# --------------------------------------------------------------------------
# a batch with an observation token in the middle and right padding
#   row 0: a0 a1 obs a2 pad    rewards 0, 0.5 (turn 1 reward), -, 1 (outcome)
#   row 1: a0 a1 a2 pad pad    outcome reward 1 on a2

MASK = T([[1, 1, 0, 1, 0], [1, 1, 1, 0, 0]])
REWARDS = T([[0.0, 0.5, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
VALUES = T([[0.5, 0.4, 9.0, 0.2, 7.0], [0.1, 0.2, 0.3, 5.0, 5.0]])


def test_compute_gae_skips_observation_tokens():
    adv, ret = compute_gae(REWARDS, VALUES, MASK.float(), gamma=0.9, lam=0.8)
    # row 0 over actions (r, v) = (0, .5), (.5, .4), (1, .2):
    #   A2 = 1 - .2 = .8
    #   A1 = (.5 + .9*.2 - .4) + .72*.8 = .28 + .576 = .856
    #   A0 = (0 + .9*.4 - .5) + .72*.856 = -.14 + .61632 = .47632
    # row 1: A2 = .7, A1 = .07 + .72*.7 = .574, A0 = .08 + .72*.574 = .49328
    torch.testing.assert_close(adv, T([[0.47632, 0.856, 0.0, 0.8, 0.0], [0.49328, 0.574, 0.7, 0.0, 0.0]]))
    torch.testing.assert_close(ret, T([[0.97632, 1.256, 0.0, 1.0, 0.0], [0.59328, 0.774, 1.0, 0.0, 0.0]]))


def test_gae_estimator_whitens_advantages_not_returns():
    inputs = AdvantageInputs(REWARDS, MASK, T([0, 1]), values=VALUES)
    adv, ret = gae(inputs, AdvantageConfig(gamma=0.9, lam=0.8))
    w = whiten_list([0.47632, 0.856, 0.8, 0.49328, 0.574, 0.7])
    expected = T([[w[0], w[1], 0.0, w[2], 0.0], [w[3], w[4], w[5], 0.0, 0.0]])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, T([[0.97632, 1.256, 0.0, 1.0, 0.0], [0.59328, 0.774, 1.0, 0.0, 0.0]]))


def test_discounted_returns_skip_observation_tokens():
    ret = discounted_returns(REWARDS, MASK.float(), gamma=0.9)
    # row 0: G(a2) = 1, G(a1) = .5 + .9 = 1.4, G(a0) = .9 * 1.4 = 1.26
    torch.testing.assert_close(ret, T([[1.26, 1.4, 0.0, 1.0, 0.0], [0.81, 0.9, 1.0, 0.0, 0.0]]))


def test_reinforce_plus_plus():
    inputs = AdvantageInputs(REWARDS, MASK, T([0, 1]))
    adv, ret = reinforce_plus_plus(inputs, AdvantageConfig(gamma=0.9))
    w = whiten_list([1.26, 1.4, 1.0, 0.81, 0.9, 1.0])
    torch.testing.assert_close(adv, T([[w[0], w[1], 0.0, w[2], 0.0], [w[3], w[4], w[5], 0.0, 0.0]]))
    torch.testing.assert_close(ret, T([[1.26, 1.4, 0.0, 1.0, 0.0], [0.81, 0.9, 1.0, 0.0, 0.0]]))


# --------------------------------------------------------------------------
# outcome estimators: group 7 has three chains, group 3 two.
#   row 0 has per-turn rewards .25 + .75 (score 1) and an observation token.

G_MASK = T([[1, 0, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
G_REWARDS = T(
    [
        [0.25, 0.0, 0.75, 0.0],
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 0.5, 0.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
        [0.0, 0.0, 0.0, 0.0],
    ]
)
G_INDEX = T([7, 7, 7, 3, 3])  # scores: group 7 = [1, 0, .5], group 3 = [1, 0]


def per_traj(adv):
    """[B,T] broadcast advantage -> [B] (value on the row's action tokens)."""
    return (adv * G_MASK).sum(-1) / G_MASK.sum(-1)


def test_grpo_normalised_by_group_std():
    adv, ret = grpo(AdvantageInputs(G_REWARDS, G_MASK, G_INDEX), AdvantageConfig())
    # group 7: mean .5, unbiased std .5 -> [1, -1, 0]; group 3: mean .5, std sqrt(.5)
    s = 0.5 / math.sqrt(0.5)
    torch.testing.assert_close(per_traj(adv), T([1.0, -1.0, 0.0, s, -s]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adv, per_traj(adv).unsqueeze(-1) * G_MASK)
    torch.testing.assert_close(ret, adv)


def test_dr_grpo_does_not_divide_by_std():
    adv, _ = grpo(AdvantageInputs(G_REWARDS, G_MASK, G_INDEX), AdvantageConfig(norm_adv_by_std_in_grpo=False))
    torch.testing.assert_close(per_traj(adv), T([0.5, -0.5, 0.0, 0.5, -0.5]))
    assert adv[0, 1] == 0.0 and adv[4, 1:].abs().sum() == 0.0


def test_grpo_equal_scores_give_zero_and_singleton_keeps_score():
    rewards = T([[2.0], [1.0], [1.0]])
    adv, _ = grpo(AdvantageInputs(rewards, T([[1], [1], [1]]), T([0, 1, 1])), AdvantageConfig())
    # singleton group: mean 0, std 1 -> 2 / (1 + 1e-6); equal scores -> 0
    torch.testing.assert_close(adv, T([[2.0 / (1 + 1e-6)], [0.0], [0.0]]))


def test_rloo_leave_one_out():
    adv, ret = rloo(AdvantageInputs(G_REWARDS, G_MASK, G_INDEX), AdvantageConfig())
    # group 7: 1 - mean(0, .5) = .75; 0 - mean(1, .5) = -.75; .5 - mean(1, 0) = 0
    # group 3: 1 - 0 = 1; 0 - 1 = -1
    torch.testing.assert_close(per_traj(adv), T([0.75, -0.75, 0.0, 1.0, -1.0]))
    torch.testing.assert_close(adv, per_traj(adv).unsqueeze(-1) * G_MASK)
    torch.testing.assert_close(ret, adv)


def test_reinforce_plus_plus_baseline():
    adv, ret = reinforce_plus_plus_baseline(AdvantageInputs(G_REWARDS, G_MASK, G_INDEX), AdvantageConfig())
    # centred scores [.5, -.5, 0, .5, -.5] repeated on 2, 3, 2, 4, 1 tokens, then whitened
    centred = [0.5, -0.5, 0.0, 0.5, -0.5]
    counts = [2, 3, 2, 4, 1]
    flat = [c for c, n in zip(centred, counts) for _ in range(n)]
    w = whiten_list(flat)
    w_per_row = [w[sum(counts[:i])] for i in range(5)]
    torch.testing.assert_close(adv, T(w_per_row).unsqueeze(-1) * G_MASK, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, adv)


def test_remax_subtracts_greedy_baseline():
    inputs = AdvantageInputs(G_REWARDS, G_MASK, G_INDEX, baseline_rewards=T([0.5, 0.5, 0.5, 2.0, 2.0]))
    adv, ret = remax(inputs, AdvantageConfig())
    torch.testing.assert_close(per_traj(adv), T([0.5, -0.5, 0.0, -1.0, -2.0]))
    torch.testing.assert_close(ret, T([1.0, 0.0, 0.5, 1.0, 0.0]).unsqueeze(-1) * G_MASK)


def test_opo_subtracts_the_length_weighted_group_mean():
    # group 7: scores [1, 0, .5] over 2, 3, 2 tokens: baseline (2 + 0 + 1) / 7 = 3/7
    # group 3: scores [1, 0] over 4, 1 tokens: baseline 4 / 5
    adv, ret = opo(AdvantageInputs(G_REWARDS, G_MASK, G_INDEX), AdvantageConfig())
    torch.testing.assert_close(per_traj(adv), T([4 / 7, -3 / 7, 0.5 - 3 / 7, 0.2, -0.8]))
    assert torch.equal(adv, ret) and (adv[G_MASK == 0] == 0).all()
    # a group of one: baseline 0 (verl)
    one, _ = opo(AdvantageInputs(G_REWARDS[:1], G_MASK[:1], T([0])), AdvantageConfig())
    torch.testing.assert_close(per_traj_rows(one, G_MASK[:1]), T([1.0]))


def test_grpo_passk_credits_only_the_best_episode():
    # group 7: [1, 0, .5] -> row 0: (1 - .5) / (std .5 + eps); group 3: [1, 0] -> row 3: 1 / (std .7071 + eps)
    adv, _ = grpo_passk(AdvantageInputs(G_REWARDS, G_MASK, G_INDEX), AdvantageConfig())
    torch.testing.assert_close(per_traj(adv), T([0.5 / (0.5 + 1e-6), 0.0, 0.0, 1 / (0.5**0.5 + 1e-6), 0.0]))
    plain, _ = grpo_passk(AdvantageInputs(G_REWARDS, G_MASK, G_INDEX), AdvantageConfig(norm_adv_by_std_in_grpo=False))
    torch.testing.assert_close(per_traj(plain), T([0.5, 0.0, 0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match=">= 2 episodes"):
        grpo_passk(AdvantageInputs(G_REWARDS[:1], G_MASK[:1], T([0])), AdvantageConfig())


def test_gpg_centres_on_the_group_mean_and_scales_by_the_nonzero_share():
    # scores [1, 0, .5 | 1, 0]: 3 of the 5 are non-zero, alpha = 5/3; both group means are .5
    adv, ret = gpg(AdvantageInputs(G_REWARDS, G_MASK, G_INDEX), AdvantageConfig())
    torch.testing.assert_close(per_traj(adv), T([0.5, -0.5, 0.0, 0.5, -0.5]) * 5 / 3)
    assert torch.equal(adv, ret) and (adv[G_MASK == 0] == 0).all()
    # every score 0: alpha = 5 / max(0, 1), advantages 0 (no division by zero)
    zeros, _ = gpg(AdvantageInputs(torch.zeros_like(G_REWARDS), G_MASK, G_INDEX), AdvantageConfig())
    assert (zeros == 0).all()
    # a group of one keeps its raw score (mean 0, verl), times alpha = 1 / 1
    one, _ = gpg(AdvantageInputs(G_REWARDS[:1], G_MASK[:1], T([0])), AdvantageConfig())
    torch.testing.assert_close(per_traj_rows(one, G_MASK[:1]), T([1.0]))


def per_traj_rows(adv, mask):
    return (adv * mask).sum(-1) / mask.sum(-1)


# --------------------------------------------------------------------------
# registry and validation


def test_registry_names_and_flags():
    assert set(ADVANTAGE_ESTIMATORS) == {
        "gae",
        "grpo",
        "rloo",
        "reinforce_plus_plus",
        "reinforce_plus_plus_baseline",
        "remax",
        "opo",
        "grpo_passk",
        "gpg",
    }
    assert get_advantage_estimator("grpo") is grpo
    assert [n for n in ADVANTAGE_ESTIMATORS if needs_critic(n)] == ["gae"]
    assert [n for n in ADVANTAGE_ESTIMATORS if needs_greedy_baseline(n)] == ["remax"]


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(ValueError, match="valid names.*grpo"):
        get_advantage_estimator("ppo")
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        needs_critic("ppo")


def test_missing_critic_or_baseline_raises():
    inputs = AdvantageInputs(REWARDS, MASK, T([0, 1]))
    with pytest.raises(ValueError, match="values"):
        gae(inputs, AdvantageConfig())
    with pytest.raises(ValueError, match="baseline_rewards"):
        remax(inputs, AdvantageConfig())


def test_reward_on_masked_position_raises():
    rewards = T([[0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])  # row 0 token 2 is an observation
    with pytest.raises(ValueError, match="row 0, token 2"):
        grpo(AdvantageInputs(rewards, MASK, T([0, 0])), AdvantageConfig())


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="group_index"):
        AdvantageInputs(REWARDS, MASK, T([0, 1, 2]))


# --------------------------------------------------------------------------
# properties


@st.composite
def grouped_batches(draw):
    """(rewards[B,T], mask[B,T], group_index[B]) with rewards only on actions."""
    groups = draw(st.integers(1, 3))
    chains = draw(st.integers(2, 4))
    length = draw(st.integers(1, 6))
    mask_rows, reward_rows = [], []
    for _ in range(groups * chains):
        row = draw(st.lists(st.booleans(), min_size=length, max_size=length).filter(any))
        mask_rows.append([int(m) for m in row])
        reward_rows.append([draw(st.floats(-3, 3, width=32)) if m else 0.0 for m in row])
    index = [g for g in range(groups) for _ in range(chains)]
    perm = draw(st.permutations(range(groups * chains)))
    return (
        T([reward_rows[i] for i in perm]),
        T([mask_rows[i] for i in perm]),
        T([index[i] for i in perm]),
    )


@settings(max_examples=50, deadline=None, derandomize=True)
@given(grouped_batches(), st.booleans())
def test_grpo_advantages_sum_to_zero_per_group(batch, norm_by_std):
    rewards, mask, index = batch
    adv, _ = grpo(AdvantageInputs(rewards, mask, index), AdvantageConfig(norm_adv_by_std_in_grpo=norm_by_std))
    per_row = (adv * mask).sum(-1) / mask.sum(-1)
    for g in index.unique():
        assert abs(per_row[index == g].sum().item()) < 1e-3


@settings(max_examples=50, deadline=None, derandomize=True)
@given(grouped_batches())
def test_rloo_matches_definition(batch):
    rewards, mask, index = batch
    adv, _ = rloo(AdvantageInputs(rewards, mask, index), AdvantageConfig())
    scores = rewards.sum(-1).tolist()
    for i in range(len(scores)):
        others = [scores[j] for j in range(len(scores)) if j != i and index[j] == index[i]]
        expected = scores[i] - sum(others) / len(others)
        for t in range(mask.shape[1]):
            assert adv[i, t].item() == pytest.approx(expected * mask[i, t].item(), abs=1e-4)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(grouped_batches(), st.data())
def test_gae_gamma_lam_one_is_returns_minus_values(batch, data):
    rewards, mask, _ = batch
    values = T(data.draw(st.lists(st.floats(-2, 2, width=32), min_size=rewards.numel(), max_size=rewards.numel())))
    values = values.reshape(rewards.shape)
    adv, ret = compute_gae(rewards, values, mask.float(), gamma=1.0, lam=1.0)
    for b in range(rewards.shape[0]):
        for t in range(rewards.shape[1]):
            if mask[b, t]:
                reward_to_go = sum(rewards[b, s].item() for s in range(t, rewards.shape[1]) if mask[b, s])
                assert ret[b, t].item() == pytest.approx(reward_to_go, abs=1e-4)
                assert adv[b, t].item() == pytest.approx(reward_to_go - values[b, t].item(), abs=1e-4)
            else:
                assert adv[b, t] == 0 and ret[b, t] == 0


@settings(max_examples=50, deadline=None, derandomize=True)
@given(grouped_batches(), st.floats(0, 1), st.floats(0, 1))
def test_gae_equals_gae_on_compressed_action_sequence(batch, gamma, lam):
    """Skipping observation tokens = running plain GAE on the action tokens alone."""
    rewards, mask, _ = batch
    values = torch.linspace(-1, 1, rewards.numel()).reshape(rewards.shape)
    adv, _ = compute_gae(rewards, values, mask.float(), gamma, lam)
    for b in range(rewards.shape[0]):
        keep = mask[b].bool()
        r, v = rewards[b, keep].tolist(), values[b, keep].tolist()
        expected, last = [0.0] * len(r), 0.0
        for i in reversed(range(len(r))):
            next_v = v[i + 1] if i + 1 < len(r) else 0.0
            last = r[i] + gamma * next_v - v[i] + gamma * lam * last
            expected[i] = last
        torch.testing.assert_close(adv[b, keep], T(expected), atol=1e-4, rtol=1e-4)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(grouped_batches())
def test_every_estimator_is_zero_outside_mask(batch):
    rewards, mask, index = batch
    if mask.sum() < 2:  # whitening needs two tokens
        return
    inputs = AdvantageInputs(
        rewards, mask, index, values=torch.ones_like(rewards), baseline_rewards=torch.zeros(rewards.shape[0])
    )
    smallest_group = int(torch.unique(index, return_counts=True)[1].min())
    for name, fn in ADVANTAGE_ESTIMATORS.items():
        if name == "grpo_passk" and smallest_group < 2:  # refuses groups of one (tested above)
            continue
        adv, ret = fn(inputs, AdvantageConfig(gamma=0.9, lam=0.95))
        assert adv.shape == ret.shape == rewards.shape, name
        assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all(), name
        assert torch.isfinite(adv).all() and torch.isfinite(ret).all(), name


def test_gae_ignores_nan_values_on_observation_and_padding():
    values = VALUES.clone()
    values[MASK == 0] = float("nan")
    adv, ret = compute_gae(REWARDS, values, MASK.float(), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, T([[0.47632, 0.856, 0.0, 0.8, 0.0], [0.49328, 0.574, 0.7, 0.0, 0.0]]))
    torch.testing.assert_close(ret, T([[0.97632, 1.256, 0.0, 1.0, 0.0], [0.59328, 0.774, 1.0, 0.0, 0.0]]))
