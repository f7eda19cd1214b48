"""Policy/value losses, aggregation and log-prob helpers against hand-computed values."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.algos.losses import (
    LOSS_AGG_MODES,
    OFF_POLICY_CORRECTIONS,
    POLICY_LOSSES,
    PolicyLossConfig,
    PolicyLossInputs,
    agg_loss,
    agg_units,
    entropy_from_logits,
    logprobs_from_logits,
    loss_scale,
    policy_loss,
    value_loss,
)

T = torch.tensor
LN2 = math.log(2.0)


# --------------------------------------------------------------------------
# log-probs and entropy


def test_logprobs_from_logits_hand_values():
    # softmax([0, 0, ln 2]) = [.25, .25, .5]
    logits = T([[[0.0, 0.0, LN2], [0.0, 0.0, LN2]]])
    out = logprobs_from_logits(logits, T([[2, 0]]))
    torch.testing.assert_close(out, T([[math.log(0.5), math.log(0.25)]]))


def test_logprobs_from_logits_chunks_bf16_and_grad_match_log_softmax():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 4, 11, generator=gen) * 30).requires_grad_()
    labels = torch.randint(0, 11, (2, 4), generator=gen)
    out = logprobs_from_logits(logits, labels, chunk_size=3)  # 8 rows -> chunks of 3, 3, 2
    ref = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, ref)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    (ref_grad,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(grad, ref_grad)
    out_bf16 = logprobs_from_logits(logits.detach().bfloat16(), labels)
    assert out_bf16.dtype == torch.float32
    ref_bf16 = torch.log_softmax(logits.detach().bfloat16().float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out_bf16, ref_bf16)


def test_entropy_from_logits_hand_values():
    logits = T([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, LN2, -math.inf]]], requires_grad=True)
    # uniform over 4: ln 4; [.25, .25, .5, 0]: .5 ln 4 + .5 ln 2 = 1.5 ln 2
    entropy = entropy_from_logits(logits, chunk_size=1)
    torch.testing.assert_close(entropy, T([[math.log(4.0), 1.5 * LN2]]))
    (grad,) = torch.autograd.grad(entropy.sum(), logits)
    assert torch.isfinite(grad).all()


# --------------------------------------------------------------------------
# aggregation: row 0 has an observation token in the middle, row 1 right
# padding, row 2 no tokens at all.

LOSS = T([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]])
AGG_MASK = T([[1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize(
    "mode, norm_horizon, expected",
    [
        ("token-mean", None, 22 / 5),  # (1 + 3 + 5 + 6 + 7) / 5
        ("seq-mean-token-sum", None, (4 + 18) / 2),  # empty row 2 excluded
        ("seq-mean-token-mean", None, (2 + 6) / 2),
        ("seq-mean-token-sum-norm", None, (4 + 18) / 4 / 2),  # default horizon T = 4
        ("seq-mean-token-sum-norm", 10, (4 + 18) / 10 / 2),  # Dr. GRPO: mean over rows of sum / H
    ],
)
def test_agg_loss_modes(mode, norm_horizon, expected):
    assert agg_loss(LOSS, AGG_MASK, mode, norm_horizon).item() == pytest.approx(expected)


@pytest.mark.parametrize(
    "mode, units, scale",
    [
        ("token-mean", 5, 1 / 5),
        ("seq-mean-token-sum", 2, 1 / 2),
        ("seq-mean-token-mean", 2, 1 / 2),
        ("seq-mean-token-sum-norm", 2, 1 / (2 * 10)),
    ],
)
def test_loss_scale_is_world_over_units_times_horizon(mode, units, scale):
    assert agg_units(AGG_MASK, mode) == units
    assert loss_scale(mode, units, world=1, horizon=10) == pytest.approx(scale)
    assert loss_scale(mode, units, world=2, horizon=10) == pytest.approx(2 * scale)
    # the explicit scale reproduces the default aggregation
    expected = agg_loss(LOSS, AGG_MASK, mode, 10).item()
    assert agg_loss(LOSS, AGG_MASK, mode, scale=scale).item() == pytest.approx(expected)


def test_sum_norm_needs_a_horizon_for_its_scale():
    with pytest.raises(ValueError, match="horizon"):
        loss_scale("seq-mean-token-sum-norm", 4, 1, None)
    assert loss_scale("token-mean", 4, 1, None) == 0.25


@pytest.mark.parametrize("mode", sorted(LOSS_AGG_MODES))
def test_micro_batch_sums_with_one_scale_equal_the_whole_batch(mode):
    """Rows split 2 + 1 (and 1 + 1 + 1): the micro-batch sums times the whole batch's scale
    give the whole batch's loss and gradient (the Dr. GRPO weighting that was wrong)."""
    loss_mat = LOSS.clone().requires_grad_()
    whole = agg_loss(loss_mat, AGG_MASK, mode, 10)
    (g_whole,) = torch.autograd.grad(whole, loss_mat)
    scale = loss_scale(mode, agg_units(AGG_MASK, mode), 1, 10)
    for split in ([[0, 1], [2]], [[0], [1], [2]], [[1], [0, 2]]):
        total = sum(agg_loss(loss_mat[rows], AGG_MASK[rows], mode, scale=scale) for rows in split)
        (g,) = torch.autograd.grad(total, loss_mat)
        assert total.item() == pytest.approx(whole.item())
        torch.testing.assert_close(g, g_whole)
    # hand values of the gradient: token-mean 1/5 per token; seq modes 1/2 per row (times 1/n_b or 1/H)
    per_row = {"token-mean": [1 / 5] * 3, "seq-mean-token-sum": [1 / 2] * 3,
               "seq-mean-token-mean": [1 / 4, 1 / 6, 0.0], "seq-mean-token-sum-norm": [1 / 20] * 3}[mode]
    torch.testing.assert_close(g_whole, AGG_MASK.float() * T(per_row).unsqueeze(-1))


def test_agg_loss_empty_mask_is_zero_and_unknown_mode_raises():
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        assert agg_loss(LOSS, torch.zeros_like(AGG_MASK), mode).item() == 0.0
    with pytest.raises(ValueError, match="valid modes"):
        agg_loss(LOSS, AGG_MASK, "seq-mean")


# --------------------------------------------------------------------------
# policy loss. One row of four tokens plus a padding token with garbage.
#   ratio vs old r = [1, 1.5, .5, 5], advantages [1, 1, -1, -1], clip .2, c = 3
#   t0: max(-1, -1) = -1
#   t1: max(-1.5, -1.2) = -1.2                      (clipped)
#   t2: max(.5, .8) = .8, min(.8, 3) = .8           (clipped)
#   t3: max(5, 1.2) = 5, min(5, 3) = 3              (dual clip)
#   token-mean = (-1 - 1.2 + .8 + 3) / 4 = .4

OLD = T([[-1.0, -1.0, -1.0, -1.0, -1.0]])
RATIO = T([[1.0, 1.5, 0.5, 5.0, 1.0]])
ADV = T([[1.0, 1.0, -1.0, -1.0, 50.0]])
PMASK = T([[1, 1, 1, 1, 0]])
WEIGHT = T([[2.0, 0.5, 1.0, 4.0, 1.0]])  # pi_old / pi_behaviour


def make_inputs(behaviour=OLD, ratio=RATIO):
    logprobs = (OLD + ratio.log()).requires_grad_()
    return PolicyLossInputs(logprobs, OLD, behaviour, ADV, PMASK)


def scalar_loss(inputs, cfg):
    """policy_loss reduced with the config's aggregation over the rows given."""
    per_token, metrics = policy_loss(inputs, cfg)
    return agg_loss(per_token, inputs.mask, cfg.loss_agg_mode, cfg.norm_horizon), metrics


def test_ppo_clip_and_dual_clip_hand_values():
    inputs = make_inputs()
    loss, metrics = scalar_loss(inputs, PolicyLossConfig(off_policy_correction="none"))
    assert loss.item() == pytest.approx(0.4)
    assert metrics["pg_loss"] == pytest.approx(0.4)
    assert metrics["pg_clipfrac"] == pytest.approx(0.5)  # t1, t2
    assert metrics["pg_clipfrac_lower"] == pytest.approx(0.25)  # t3
    assert metrics["ppo_kl"] == pytest.approx(-math.log(1.5 * 0.5 * 5.0) / 4)
    assert metrics["is_weight_mean"] == pytest.approx(1.0)
    (grad,) = torch.autograd.grad(loss, inputs.logprobs)
    # only t0 is unclipped: d(-A r)/d logp / 4 = -1 * 1 / 4
    torch.testing.assert_close(grad, T([[-0.25, 0.0, 0.0, 0.0, 0.0]]))


def test_asymmetric_clip_higher():
    loss, _ = scalar_loss(make_inputs(), PolicyLossConfig(off_policy_correction="none", clip_ratio_high=0.28))
    # t1 becomes -1.28: (-1 - 1.28 + .8 + 3) / 4
    assert loss.item() == pytest.approx(0.38)


def test_policy_loss_uses_agg_mode():
    cfg = PolicyLossConfig(off_policy_correction="none", loss_agg_mode="seq-mean-token-sum")
    loss, _ = scalar_loss(make_inputs(), cfg)
    assert loss.item() == pytest.approx(1.6)


def test_none_correction_clips_against_behaviour():
    behaviour = OLD - WEIGHT.log()
    loss, metrics = scalar_loss(make_inputs(behaviour), PolicyLossConfig(off_policy_correction="none"))
    # ratio vs behaviour = r * w = [2, .75, .5, 20]
    #   t0: max(-2, -1.2) = -1.2; t1: max(-.75, -.8) = -.75; t2: .8; t3: min(20, 3) = 3
    assert loss.item() == pytest.approx((-1.2 - 0.75 + 0.8 + 3.0) / 4)
    assert metrics["is_weight_mean"] == pytest.approx(1.0)


def test_decoupled_correction_weights_clipped_loss():
    behaviour = OLD - WEIGHT.log()
    inputs = make_inputs(behaviour)
    loss, metrics = scalar_loss(inputs, PolicyLossConfig(off_policy_correction="decoupled"))
    # per-token PPO loss vs old [-1, -1.2, .8, 3] times w = [2, .5, 1, 4]
    assert loss.item() == pytest.approx((-2.0 - 0.6 + 0.8 + 12.0) / 4)
    assert metrics["is_weight_mean"] == pytest.approx(7.5 / 4)
    assert metrics["is_weight_max"] == pytest.approx(4.0)
    (grad,) = torch.autograd.grad(loss, inputs.logprobs)
    torch.testing.assert_close(grad, T([[-0.5, 0.0, 0.0, 0.0, 0.0]]))  # w0 * (-.25)


def test_tis_correction_truncates_weight():
    behaviour = OLD - WEIGHT.log()
    loss, metrics = scalar_loss(make_inputs(behaviour), PolicyLossConfig(off_policy_correction="tis", tis_cap=2.0))
    # weights [2, .5, 1, min(4, 2) = 2]
    assert loss.item() == pytest.approx((-2.0 - 0.6 + 0.8 + 6.0) / 4)
    assert metrics["is_weight_truncfrac"] == pytest.approx(0.25)
    assert metrics["is_weight_max"] == pytest.approx(2.0)


def test_decoupled_masks_tokens_above_behav_imp_weight_cap():
    """AReaL's cap: w = 4 > 3 is masked (weight 0, still counted in the token mean)."""
    behaviour = OLD - WEIGHT.log()
    inputs = make_inputs(behaviour)
    loss, metrics = scalar_loss(inputs, PolicyLossConfig(off_policy_correction="decoupled", behav_imp_weight_cap=3.0))
    assert loss.item() == pytest.approx((-2.0 - 0.6 + 0.8 + 0.0) / 4)
    assert metrics["is_masked_frac"] == pytest.approx(0.25)
    assert metrics["is_weight_max"] == pytest.approx(2.0)
    (grad,) = torch.autograd.grad(loss, inputs.logprobs)
    torch.testing.assert_close(grad, T([[-0.5, 0.0, 0.0, 0.0, 0.0]]))
    uncapped, metrics = scalar_loss(make_inputs(behaviour), PolicyLossConfig(behav_imp_weight_cap=None))
    assert uncapped.item() == pytest.approx((-2.0 - 0.6 + 0.8 + 12.0) / 4) and metrics["is_masked_frac"] == 0.0


# Two rows from two policy versions: row 0 sampled by a stale policy (pi_old / pi_behav =
# [2, .5, 1, 4], product 4, geometric mean sqrt 2), row 1 by the current one (weights 1).
# Both have the PPO per-token loss [-1, -1.2, .8, 3] (sum 1.6) against the proximal policy.
OLD2 = OLD[:, :4].repeat(2, 1)
NEW2 = (OLD + RATIO.log())[:, :4].repeat(2, 1)
BEHAV2 = torch.cat([OLD[:, :4] - WEIGHT[:, :4].log(), OLD[:, :4]])
ADV2 = ADV[:, :4].repeat(2, 1)
MASK2 = torch.ones(2, 4)


@pytest.mark.parametrize(
    "correction, params, loss, masked, truncated",
    [
        # per token: row 0 (-2 - .6 + .8 + 12) = 10.2, row 1 1.6, over 8 tokens
        ("decoupled", {}, (10.2 + 1.6) / 8, 0.0, 0.0),
        ("tis", {"tis_cap": 2.0}, (-2 - 0.6 + 0.8 + 6 + 1.6) / 8, 0.0, 1 / 8),
        # row 0's sequence weight 4 truncated to 2 on every token
        ("seq_tis", {"tis_cap": 2.0}, (2 * 1.6 + 1.6) / 8, 0.0, 0.5),
        ("seq_tis", {"tis_cap": 5.0}, (4 * 1.6 + 1.6) / 8, 0.0, 0.0),
        # row 0's sequence weight 4 > 2: masked; row 1 kept with weight 1
        ("seq_mis", {"seq_mis_cap": 2.0}, 1.6 / 8, 0.5, 0.0),
        ("seq_mis", {"seq_mis_cap": 5.0}, (4 * 1.6 + 1.6) / 8, 0.0, 0.0),
        # geometric mean sqrt 2 outside [1/1.05, 1.05]: row 0 masked; inside [1/1.5, 1.5]: token weights
        ("geo_mis", {"geo_mis_bound": 1.05}, 1.6 / 8, 0.5, 0.0),
        ("geo_mis", {"geo_mis_bound": 1.5}, (10.2 + 1.6) / 8, 0.0, 0.0),
        # token weight 4 outside [1/2, 2] masked (2 and .5 are on the boundary, kept)
        ("icepop", {"icepop_beta": 2.0}, (-2 - 0.6 + 0.8 + 1.6) / 8, 1 / 8, 0.0),
    ],
)
def test_corrections_on_two_policy_versions(correction, params, loss, masked, truncated):
    logprobs = NEW2.clone().requires_grad_()
    cfg = PolicyLossConfig(off_policy_correction=correction, **params)
    value, metrics = scalar_loss(PolicyLossInputs(logprobs, OLD2, BEHAV2, ADV2, MASK2), cfg)
    assert value.item() == pytest.approx(loss)
    assert metrics["is_masked_frac"] == pytest.approx(masked)
    assert metrics["is_weight_truncfrac"] == pytest.approx(truncated)
    (grad,) = torch.autograd.grad(value, logprobs)
    assert grad[1, 0].item() == pytest.approx(-1 / 8)  # row 1, token 0 (unclipped, weight 1) always trains
    if masked == 0.5:
        assert grad[0].abs().sum() == 0  # a masked sequence gets no gradient


def test_gspo_clips_the_sequence_ratio():
    # s = exp(mean log r) = (1 * 1.5 * .5 * 5) ** (1/4) = 3.75 ** .25 ~ 1.392, clipped to 1.2 where A > 0:
    #   t0, t1 (A = 1): max(-s, -1.2) = -1.2 (clipped, no grad); t2, t3 (A = -1): max(s, 1.2) = s
    s = 3.75**0.25
    inputs = make_inputs()
    cfg = PolicyLossConfig(loss_mode="gspo", off_policy_correction="none")
    loss, metrics = scalar_loss(inputs, cfg)
    assert loss.item() == pytest.approx((-2.4 + 2 * s) / 4)
    assert metrics["pg_clipfrac"] == pytest.approx(0.5)
    (grad,) = torch.autograd.grad(loss, inputs.logprobs)
    # d s / d logprob_t through the straight-through form is s (not s / 4): verl's GSPO
    torch.testing.assert_close(grad, T([[0.0, 0.0, s / 4, s / 4, 0.0]]))


def test_gspo_on_one_token_sequences_is_ppo_without_dual_clip():
    old = T([[-1.0], [-1.0], [-1.0]])
    new = (old + T([[1.5], [0.5], [1.1]]).log()).requires_grad_()
    adv, mask = T([[1.0], [-1.0], [-1.0]]), torch.ones(3, 1)
    gspo, _ = scalar_loss(PolicyLossInputs(new, old, old, adv, mask), PolicyLossConfig(loss_mode="gspo"))
    ppo, _ = scalar_loss(PolicyLossInputs(new, old, old, adv, mask), PolicyLossConfig(loss_mode="vanilla"))
    assert gspo.item() == pytest.approx(ppo.item())  # (-1.2 + .8 + 1.1) / 3


def test_cispo_weights_reinforce_by_the_clipped_detached_ratio():
    # clip(r, .8, 1.2) = [1, 1.2, .8, 1.2]; loss_t = -A_t c_t logprob_t; grad = -A c / 4
    inputs = make_inputs()
    loss, metrics = scalar_loss(inputs, PolicyLossConfig(loss_mode="cispo", off_policy_correction="none"))
    logp = (OLD + RATIO.log())[0, :4]
    c, a = T([1.0, 1.2, 0.8, 1.2]), ADV[0, :4]
    assert loss.item() == pytest.approx(float((-a * c * logp).sum() / 4))
    assert metrics["pg_clipfrac"] == pytest.approx(0.75)
    (grad,) = torch.autograd.grad(loss, inputs.logprobs)
    torch.testing.assert_close(grad, T([[-0.25, -0.3, 0.2, 0.3, 0.0]]))


# Covariances of the one-row case: A = [1, 1, -1, -1], log pi = -1 + log r = [-1, -.595, -1.693, .609]
# (mean -.670): cov = A (log pi - mean) = [-.330, .075, 1.024, -1.279].


def test_kl_cov_adds_the_kl_term_on_the_largest_covariance_token():
    # one token of four (ratio .0002 -> at least 1): token 2; loss -A r = [-1, -1.5, .5, 5], token 2
    # adds |log .5|; its gradient gets coef * sign(log r) = -1
    inputs = make_inputs()
    loss, metrics = scalar_loss(inputs, PolicyLossConfig(loss_mode="kl_cov", off_policy_correction="none"))
    assert loss.item() == pytest.approx((-1 - 1.5 + 0.5 + LN2 + 5) / 4)
    assert metrics["pg_clipfrac"] == pytest.approx(0.25)
    (grad,) = torch.autograd.grad(loss, inputs.logprobs)
    torch.testing.assert_close(grad, T([[-0.25, -0.375, -0.125, 1.25, 0.0]]))


def test_clip_cov_cuts_an_unclipped_token_inside_the_covariance_band():
    # the ratio clip already covers tokens 1, 2; of the others only token 0 (cov -.330) is in (-.5, 5)
    inputs = make_inputs()
    cfg = PolicyLossConfig(loss_mode="clip_cov", off_policy_correction="none", clip_cov_lb=-0.5, clip_cov_ub=5.0)
    loss, metrics = scalar_loss(inputs, cfg)
    assert loss.item() == pytest.approx((0.0 - 1.2 + 0.8 + 5.0) / 4)  # no dual clip on token 3
    assert metrics["pg_clipfrac"] == pytest.approx(0.75)
    (grad,) = torch.autograd.grad(loss, inputs.logprobs)
    torch.testing.assert_close(grad, T([[0.0, 0.0, 0.0, 1.25, 0.0]]))
    # nothing in the band: plain PPO without dual clip
    loss, _ = scalar_loss(make_inputs(), PolicyLossConfig(loss_mode="clip_cov", clip_cov_lb=10.0, clip_cov_ub=20.0,
                                                           off_policy_correction="none"))
    assert loss.item() == pytest.approx((-1.0 - 1.2 + 0.8 + 5.0) / 4)


def test_log_ratio_is_clamped_before_exp():
    ratio_logs = T([[0.0, 0.0, 0.0, 100.0, 0.0]])
    inputs = PolicyLossInputs((OLD + ratio_logs).requires_grad_(), OLD, OLD, T([[0.0, 0.0, 0.0, 1.0, 0.0]]), PMASK)
    loss, _ = scalar_loss(inputs, PolicyLossConfig(off_policy_correction="none", log_ratio_clamp=20.0))
    # t3: A = 1, ratio exp(20) is clipped to 1.2 -> loss -1.2 / 4, finite
    assert loss.item() == pytest.approx(-1.2 / 4)


def test_policy_loss_config_validation():
    with pytest.raises(ValueError, match="clip_ratio_c"):
        PolicyLossConfig(clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="valid"):
        PolicyLossConfig(off_policy_correction="vtrace")
    with pytest.raises(ValueError, match="valid modes"):
        PolicyLossConfig(loss_agg_mode="mean")
    with pytest.raises(ValueError, match="tis_cap"):
        PolicyLossConfig(tis_cap=0.5)
    with pytest.raises(ValueError, match="behav_imp_weight_cap"):
        PolicyLossConfig(behav_imp_weight_cap=1.0)
    with pytest.raises(ValueError, match="loss_mode"):
        PolicyLossConfig(loss_mode="ppo2")


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    st.data(),
    st.integers(1, 3),
    st.integers(1, 5),
    st.sampled_from(sorted(LOSS_AGG_MODES)),
    st.sampled_from(sorted(POLICY_LOSSES)),
)
def test_corrections_equal_plain_ppo_when_behaviour_is_old(data, batch, length, mode, loss_mode):
    n = batch * length
    floats = st.lists(st.floats(-5, 0, width=32), min_size=n, max_size=n)
    old = T(data.draw(floats)).reshape(batch, length)
    new = T(data.draw(floats)).reshape(batch, length)
    adv = T(data.draw(st.lists(st.floats(-3, 3, width=32), min_size=n, max_size=n))).reshape(batch, length)
    mask = T(data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))).reshape(batch, length)
    results = {}
    for name in OFF_POLICY_CORRECTIONS:
        logprobs = new.clone().requires_grad_()
        loss, _ = scalar_loss(
            PolicyLossInputs(logprobs, old, old.clone(), adv, mask),
            PolicyLossConfig(off_policy_correction=name, loss_agg_mode=mode, loss_mode=loss_mode),
        )
        (grad,) = torch.autograd.grad(loss, logprobs)
        results[name] = (loss.detach(), grad)
    for name in OFF_POLICY_CORRECTIONS:
        torch.testing.assert_close(results[name][0], results["none"][0])
        torch.testing.assert_close(results[name][1], results["none"][1])


# --------------------------------------------------------------------------
# value loss


def test_value_loss_clipped_hand_values():
    values = T([[1.0, 2.0, 0.0]], requires_grad=True)
    old = T([[0.5, 2.0, 0.0]])
    returns = T([[2.0, 1.0, 5.0]])
    per_token, metrics = value_loss(values, old, returns, T([[1, 1, 0]]), cliprange_value=0.2)
    loss = agg_loss(per_token, T([[1, 1, 0]]), "token-mean")
    # t0: v_clip = .7; max((1 - 2)^2, (.7 - 2)^2) = 1.69; t1: max(1, 1) = 1; t2 padded
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert metrics["vf_clipfrac"] == pytest.approx(0.5)
    assert metrics["vpred_mean"] == pytest.approx(1.5)
    (grad,) = torch.autograd.grad(loss, values)
    # t0 clipped (no grad to values); t1: .5 * 2 (v - R) / 2 = .5
    torch.testing.assert_close(grad, T([[0.0, 0.5, 0.0]]))


def test_nan_outside_mask_reaches_neither_loss_nor_grad():
    nan_pad = T([[0.0, 0.0, 0.0, 0.0, float("nan")]])
    for name in OFF_POLICY_CORRECTIONS:
        logprobs = (OLD + RATIO.log()).requires_grad_()
        inputs = PolicyLossInputs(logprobs, OLD + nan_pad, OLD + nan_pad, ADV + nan_pad, PMASK)
        loss, metrics = scalar_loss(inputs, PolicyLossConfig(off_policy_correction=name))
        assert loss.item() == pytest.approx(0.4), name
        (grad,) = torch.autograd.grad(loss, logprobs)
        torch.testing.assert_close(grad, T([[-0.25, 0.0, 0.0, 0.0, 0.0]]))
        assert all(math.isfinite(v) for v in metrics.values()), name


def test_value_loss_ignores_nan_outside_mask():
    values = T([[1.0, 2.0, 0.0]], requires_grad=True)
    per_token, _ = value_loss(values, T([[0.5, 2.0, float("nan")]]), T([[2.0, 1.0, float("nan")]]), T([[1, 1, 0]]), 0.2)
    loss = agg_loss(per_token, T([[1, 1, 0]]), "token-mean")
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    (grad,) = torch.autograd.grad(loss, values)
    torch.testing.assert_close(grad, T([[0.0, 0.5, 0.0]]))
