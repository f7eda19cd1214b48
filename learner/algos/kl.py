"""KL estimators, KL controllers and the KL-in-reward penalty.

Per-token estimators of KL(pi || ref) from the log-probs of the sampled
tokens (Schulman, "Approximating KL divergence", 2020), with d = logprob - ref_logprob:

    kl  (k1)          d                              unbiased, can be negative per token
    abs               |d|                            >= 0
    mse (k2)          0.5 * d^2                      >= 0
    low_var_kl (k3)   exp(-d) + d - 1, clamped to [-10, 10]  (as verl)   >= 0
    k1+, k3+          the value of k1 / k3 with the gradient of k2 (straight-through, verl)

`full` is the exact KL over the vocabulary and needs logits, not log-probs:
use `full_kl(logits, ref_logits)`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from learner.algos import registry

from learner.algos.advantages import masked_mean


def _k1(logprob: Tensor, ref_logprob: Tensor) -> Tensor:
    return logprob - ref_logprob


def _abs(logprob: Tensor, ref_logprob: Tensor) -> Tensor:
    return (logprob - ref_logprob).abs()


def _k2(logprob: Tensor, ref_logprob: Tensor) -> Tensor:
    return 0.5 * (logprob - ref_logprob).square()


def _k3(logprob: Tensor, ref_logprob: Tensor) -> Tensor:
    log_ratio = (ref_logprob - logprob).clamp(-20.0, 20.0)
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-10.0, 10.0)


def _straight_through(estimator: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """The value of ``estimator`` with the gradient of k2 (d, an unbiased KL gradient on
    on-policy samples): verl's ``+`` estimators."""

    def fn(logprob: Tensor, ref_logprob: Tensor) -> Tensor:
        k2 = _k2(logprob, ref_logprob)
        return k2 - k2.detach() + estimator(logprob, ref_logprob).detach()

    return fn


for _names, _fn in [
    (("kl", "k1"), _k1), (("abs",), _abs), (("mse", "k2"), _k2), (("low_var_kl", "k3"), _k3),
    (("k1+",), _straight_through(_k1)), (("k3+",), _straight_through(_k3)),
]:
    registry.KL_ESTIMATORS.bind(_fn, *_names)
registry.KL_ESTIMATORS.bind(None, "full")  # needs logits: `full_kl`

KL_PENALTIES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    name: fn for name, fn in registry.KL_ESTIMATORS.implementations().items() if fn is not None
}
"""KL kind -> fn(logprob[B,T], ref_logprob[B,T]) -> [B,T]. 'full' is `full_kl`."""


def get_kl_penalty(kind: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The per-token estimator for `kind` (ValueError listing the valid kinds otherwise)."""
    if kind == "full":
        raise ValueError("kl kind 'full' needs logits: call full_kl(logits, ref_logits)")
    if kind not in KL_PENALTIES:
        raise ValueError(f"unknown kl kind {kind!r}; valid: {sorted(KL_PENALTIES)} (and 'full' via full_kl)")
    return KL_PENALTIES[kind]


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kind: str) -> Tensor:
    """Per-token KL estimate between the policy and the reference.

    Args:
        logprob: [B,T] policy log-probs of the sampled tokens.
        ref_logprob: [B,T] reference log-probs of the same tokens.
        kind: a key of KL_PENALTIES (see module docstring).

    Returns:
        [B,T] estimate (not masked).
    """
    return get_kl_penalty(kind)(logprob, ref_logprob)


def full_kl(logits: Tensor, ref_logits: Tensor, chunk_size: int = 1024) -> Tensor:
    """Exact KL(pi || ref) = sum_v pi(v) (log pi(v) - log ref(v)) per position.

    Computed in float32, `chunk_size` rows of B*T at a time. Clamped at 0 to
    remove rounding below zero (the exact value is >= 0). Differentiable:
    d KL / d logit_j = p_j (log p_j - log q_j - KL); an entry with logit -inf
    (probability 0) contributes 0 to the value and gets gradient 0.

    Args:
        logits: [B,T,V] policy logits (-inf allowed: those tokens contribute 0).
        ref_logits: [B,T,V] reference logits.

    Returns:
        [B,T] float32.
    """
    vocab = logits.shape[-1]
    flat, flat_ref = logits.reshape(-1, vocab), ref_logits.reshape(-1, vocab)
    out = []
    for start in range(0, flat.shape[0], chunk_size):
        logp = torch.log_softmax(flat[start : start + chunk_size].float(), dim=-1)
        logq = torch.log_softmax(flat_ref[start : start + chunk_size].float(), dim=-1)
        probs = logp.exp()
        # 0 * log 0 = 0, with finite operands so the gradient is 0 there too (not 0 * inf = NaN)
        live = probs > 0
        terms = probs * (torch.where(live, logp, 0.0) - torch.where(live, logq, 0.0))
        out.append(terms.sum(-1).clamp(min=0.0))
    if not out:
        return torch.zeros(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    return torch.cat(out).reshape(logits.shape[:-1])


# --------------------------------------------------------------------------
# controllers


class FixedKLController:
    """Constant KL coefficient; `update` does nothing."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (kept so the loop calls every controller the same way)."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, as in verl).

    After each batch: e = clip(current_kl / target_kl - 1, -0.2, 0.2),
    value *= 1 + e * n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int) -> None:
        if target_kl <= 0:
            raise ValueError(f"target_kl must be > 0, got {target_kl}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = init_kl_coef
        self.target = target_kl
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient toward keeping `current_kl` at the target.

        Args:
            current_kl: the KL measured on the last batch.
            n_steps: number of samples (trajectories) in that batch, as verl passes.
        """
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        """The moving coefficient (checkpointed, so a resumed run continues from it)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(
    type: str, kl_coef: float, target_kl: float | None = None, horizon: int | None = None
) -> KLController:
    """Build a controller: type 'fixed' (uses kl_coef) or 'adaptive'
    (kl_coef is the initial value; target_kl and horizon are required)."""
    if type == "fixed":
        return FixedKLController(kl_coef)
    if type == "adaptive":
        if target_kl is None or horizon is None:
            raise ValueError("adaptive KL controller needs target_kl and horizon")
        return AdaptiveKLController(kl_coef, target_kl, horizon)
    raise ValueError(f"unknown kl controller type {type!r}; valid: ['adaptive', 'fixed']")


# --------------------------------------------------------------------------
# KL in the reward, and the learner/actor mismatch


@torch.no_grad()
def apply_kl_in_reward(
    token_rewards: Tensor,
    logprob: Tensor,
    ref_logprob: Tensor,
    mask: Tensor,
    kl_coef: float,
    kind: str,
) -> tuple[Tensor, float]:
    """Subtract a per-token KL penalty from the rewards (as verl's apply_kl_penalty).

        kld = kl_penalty(logprob, ref_logprob, kind) * mask
        new_token_rewards = token_rewards - kl_coef * kld

    Args:
        token_rewards: [B,T] rewards on sampled tokens.
        logprob: [B,T] log-probs of the policy that sampled (old/proximal).
        ref_logprob: [B,T] reference-model log-probs.
        mask: [B,T] 0/1 response mask.
        kl_coef: the controller's current value.
        kind: KL estimator (see KL_PENALTIES).

    Returns:
        (new_token_rewards[B,T], mean_kl): mean_kl is the per-sequence masked
        mean of kld averaged over the batch; pass it to the controller's
        `update(mean_kl, n_steps=B)`.
    """
    mask_f = mask.to(token_rewards.dtype)
    kld = torch.where(mask > 0, kl_penalty(logprob, ref_logprob, kind).to(token_rewards.dtype), 0.0)
    new_rewards = token_rewards - kl_coef * kld
    mean_kl = masked_mean(kld, mask_f, dim=-1).mean().item()
    return new_rewards, mean_kl


@torch.no_grad()
def logprob_mismatch_kl(learner_logprobs: Tensor, actor_logprobs: Tensor, mask: Tensor) -> float:
    """k3 estimate of KL(actor || learner) on the sampled tokens, token-mean.

    The tokens were sampled by the actor, so with r = pi_learner / pi_actor,
    k3 = r - 1 - log r is an unbiased, non-negative per-token estimate. Uses
    `low_var_kl` (per-token value clamped to 10). Log it every step: it
    measures engine/trainer numerical mismatch plus staleness.

    Args:
        learner_logprobs: [B,T] learner log-probs of the sampled tokens.
        actor_logprobs: [B,T] log-probs the actor's engine reported.
        mask: [B,T] 0/1.

    Returns:
        0-d float32 tensor (0 for an empty mask; not read on the host here).
    """
    k3 = _k3(actor_logprobs.float(), learner_logprobs.float())
    return masked_mean(k3, mask.float())
