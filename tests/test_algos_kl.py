"""KL estimators, controllers and KL-in-reward against hand-computed values."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.algos.kl import (
    KL_PENALTIES,
    AdaptiveKLController,
    FixedKLController,
    apply_kl_in_reward,
    full_kl,
    get_kl_penalty,
    kl_penalty,
    logprob_mismatch_kl,
    make_kl_controller,
)

T = torch.tensor
LN2 = math.log(2.0)

LOGPROB = T([[-1.0, -2.0, -0.5]])
REF = T([[-1.5, -1.0, -0.5]])  # d = logprob - ref = [.5, -1, 0]


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("kl", [0.5, -1.0, 0.0]),
        ("k1", [0.5, -1.0, 0.0]),
        ("abs", [0.5, 1.0, 0.0]),
        ("mse", [0.125, 0.5, 0.0]),
        ("k2", [0.125, 0.5, 0.0]),
        # exp(-d) + d - 1
        ("low_var_kl", [math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]),
        ("k3", [math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]),
    ],
)
def test_kl_penalty_kinds(kind, expected):
    torch.testing.assert_close(kl_penalty(LOGPROB, REF, kind), T([expected]))


def test_low_var_kl_is_clamped_to_ten():
    # d = -30: exp(20) - 20 - 1 -> 10;  d = +30: exp(-20) + 20 - 1 ~ 19 -> 10
    out = kl_penalty(T([-40.0, -10.0]), T([-10.0, -40.0]), "low_var_kl")
    torch.testing.assert_close(out, T([10.0, 10.0]))


def test_full_kl_hand_value():
    # p = [.5, .5], q = [.25, .75]: .5 ln 2 + .5 ln(2/3) = .5 ln(4/3)
    # a -inf logit in both (a masked vocabulary entry) contributes 0
    logits = T([[[0.0, 0.0, -math.inf], [1.0, 2.0, 0.0]]])
    ref = T([[[0.0, math.log(3.0), -math.inf], [1.0, 2.0, 0.0]]])
    torch.testing.assert_close(full_kl(logits, ref, chunk_size=1), T([[0.5 * math.log(4 / 3), 0.0]]))


def test_unknown_and_full_kinds_raise():
    with pytest.raises(ValueError, match="full_kl"):
        get_kl_penalty("full")
    with pytest.raises(ValueError, match="valid.*low_var_kl"):
        kl_penalty(LOGPROB, REF, "k4")


def test_fixed_controller_never_moves():
    ctrl = FixedKLController(0.05)
    ctrl.update(current_kl=100.0, n_steps=256)
    assert ctrl.value == 0.05


def test_adaptive_controller_steps():
    ctrl = AdaptiveKLController(init_kl_coef=0.1, target_kl=6.0, horizon=10000)
    ctrl.update(current_kl=9.0, n_steps=256)  # error .5 clipped to .2: * (1 + .2 * 256 / 10000)
    assert ctrl.value == pytest.approx(0.1 * 1.00512)
    ctrl.update(current_kl=3.0, n_steps=256)  # error -.5 clipped to -.2
    assert ctrl.value == pytest.approx(0.1 * 1.00512 * 0.99488)
    ctrl.update(current_kl=6.6, n_steps=100)  # error .1 inside the band
    assert ctrl.value == pytest.approx(0.1 * 1.00512 * 0.99488 * 1.001)


def test_make_kl_controller():
    assert isinstance(make_kl_controller("fixed", 0.1), FixedKLController)
    ctrl = make_kl_controller("adaptive", 0.2, target_kl=1.0, horizon=100)
    assert isinstance(ctrl, AdaptiveKLController) and ctrl.value == 0.2
    with pytest.raises(ValueError, match="target_kl and horizon"):
        make_kl_controller("adaptive", 0.2)
    with pytest.raises(ValueError, match="valid"):
        make_kl_controller("pid", 0.2)
    with pytest.raises(ValueError, match="horizon"):
        make_kl_controller("adaptive", 0.2, target_kl=1.0, horizon=0)


def test_apply_kl_in_reward_with_observation_and_padding():
    # row 0: action, observation, action, pad; row 1: action, action, pad, pad
    rewards = T([[0.0, 0.0, 1.0, 0.0], [0.0, 0.5, 0.0, 0.0]])
    logprob = T([[-1.0, -3.0, -2.0, -9.0], [-1.0, -1.0, 5.0, 5.0]])
    ref = T([[-1.5, -1.0, -1.0, 0.0], [-1.2, -0.6, 0.0, 0.0]])
    mask = T([[1, 0, 1, 0], [1, 1, 0, 0]])
    new, mean_kl = apply_kl_in_reward(rewards, logprob, ref, mask, kl_coef=0.1, kind="kl")
    # masked d: row 0 [.5, 0, -1, 0], row 1 [.2, -.4, 0, 0]
    torch.testing.assert_close(new, T([[-0.05, 0.0, 1.1, 0.0], [-0.02, 0.54, 0.0, 0.0]]))
    # per-row means -.25 and -.1
    assert mean_kl == pytest.approx(-0.175)


def test_logprob_mismatch_kl_hand_value():
    learner = T([[-1.0, -2.0, 0.0]])
    actor = T([[-1.0, -1.5, 7.0]])
    # log r = learner - actor = [0, -.5]: r - 1 - log r = [0, exp(-.5) - .5]
    value = logprob_mismatch_kl(learner, actor, T([[1, 1, 0]]))
    assert value == pytest.approx((math.exp(-0.5) - 0.5) / 2)
    assert logprob_mismatch_kl(learner, learner, T([[1, 1, 1]])) == 0.0


@settings(max_examples=50, deadline=None, derandomize=True)
@given(
    st.lists(st.tuples(st.floats(-30, 0, width=32), st.floats(-30, 0, width=32)), min_size=1, max_size=20),
    st.sampled_from(["abs", "mse", "k2", "low_var_kl", "k3"]),
)
def test_non_negative_estimators(pairs, kind):
    """>= 0 up to float32 rounding: exp(x) - x - 1 for tiny x rounds to about -6e-8."""
    logprob, ref = T([p for p, _ in pairs]), T([r for _, r in pairs])
    assert (kl_penalty(logprob, ref, kind) >= -1e-6).all()


def test_k3_rounding_below_zero_is_tiny():
    # the case the property test used to trip on: a log-ratio of a few float32 ulps
    out = kl_penalty(T([-1.0000001]), T([-1.0]), "k3")
    assert out.item() > -1e-6


def test_full_kl_gradient_matches_the_analytic_one_and_is_finite_at_minus_inf():
    # p = softmax([0, ln 2, -inf]) = [1/3, 2/3, 0], q = softmax([0, 0, 0]) = [1/3, 1/3, 1/3]
    # KL = 2/3 ln 2; d KL / d z_j = p_j (log p_j - log q_j - KL); the -inf entry gets 0
    logits = T([[[0.0, LN2, -math.inf]]], requires_grad=True)
    ref = torch.zeros(1, 1, 3)
    kl = full_kl(logits, ref)
    assert kl.item() == pytest.approx(2 / 3 * LN2)
    (grad,) = torch.autograd.grad(kl.sum(), logits)
    p = T([1 / 3, 2 / 3])
    expected = p * (p.log() - math.log(1 / 3) - 2 / 3 * LN2)
    torch.testing.assert_close(grad[0, 0, :2], expected)
    assert grad[0, 0, 2].item() == 0.0
    # a -inf logit in both policy and reference (a masked vocabulary entry)
    logits2 = T([[[0.0, 0.0, -math.inf]]], requires_grad=True)
    (grad2,) = torch.autograd.grad(full_kl(logits2, T([[[0.0, math.log(3.0), -math.inf]]])).sum(), logits2)
    assert torch.isfinite(grad2).all()
    # p = [.5, .5], q = [.25, .75]: d KL / d z_0 = .5 (ln 2 - .5 ln(4/3)), d z_1 = -d z_0
    g0 = 0.5 * (math.log(0.5 / 0.25) - 0.5 * math.log(4 / 3))
    torch.testing.assert_close(grad2, T([[[g0, -g0, 0.0]]]))


def test_full_kl_gradient_matches_autograd_of_the_plain_formula():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=gen, requires_grad=True)
    ref = torch.randn(2, 3, 7, generator=gen)
    (grad,) = torch.autograd.grad(full_kl(logits, ref, chunk_size=4).sum(), logits)
    logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(ref, -1)
    (plain,) = torch.autograd.grad((logp.exp() * (logp - logq)).sum(), logits)
    torch.testing.assert_close(grad, plain)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.data(), st.integers(1, 4), st.integers(2, 8))
def test_full_kl_is_non_negative(data, rows, vocab):
    floats = st.lists(st.floats(-20, 20, width=32), min_size=rows * vocab, max_size=rows * vocab)
    logits = T(data.draw(floats)).reshape(1, rows, vocab)
    ref = T(data.draw(floats)).reshape(1, rows, vocab)
    assert (full_kl(logits, ref) >= 0).all()
    torch.testing.assert_close(full_kl(logits, logits), torch.zeros(1, rows))


def test_registry_covers_all_kinds():
    assert set(KL_PENALTIES) == {"kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+"}  # + "full"


@pytest.mark.parametrize("kind, base", [("k1+", "k1"), ("k3+", "k3")])
def test_straight_through_kinds_have_the_value_of_the_base_and_the_gradient_of_k2(kind, base):
    logprob = LOGPROB.clone().requires_grad_()
    value = kl_penalty(logprob, REF, kind)
    torch.testing.assert_close(value, kl_penalty(LOGPROB, REF, base))
    (grad,) = torch.autograd.grad(value.sum(), logprob)
    torch.testing.assert_close(grad, LOGPROB - REF)  # d of d^2 / 2 is d = [.5, -1, 0]


def test_apply_kl_in_reward_ignores_nan_outside_mask():
    rewards = T([[0.0, 1.0, 0.0]])
    new, mean_kl = apply_kl_in_reward(
        rewards, T([[-1.0, -2.0, float("nan")]]), T([[-1.5, -1.0, 0.0]]), T([[1, 1, 0]]), kl_coef=0.1, kind="kl"
    )
    torch.testing.assert_close(new, T([[-0.05, 1.1, 0.0]]))
    assert mean_kl == pytest.approx(-0.25)
