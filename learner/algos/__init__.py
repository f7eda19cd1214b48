"""The learner's RL math: pure functions over [B,T] tensors (no model, no I/O).

What is here, and the simplifications made:

- Advantages (`advantages.py`): gae, grpo (Dr. GRPO when the std division is
  off), rloo, reinforce_plus_plus, reinforce_plus_plus_baseline, remax, opo,
  grpo_passk, gpg. Picked
  once by name from `ADVANTAGE_ESTIMATORS`. A batch row is one trajectory's
  response; tool-observation tokens inside it have mask 0 and are *skipped*
  (not time steps): GAE and REINFORCE++ discount once per sampled token and
  bootstrap from the next sampled token's value. Outcome estimators use the
  per-trajectory reward sum, so per-turn rewards only shape gae and
  reinforce_plus_plus. Groups of one get mean 0 / std 1 (verl's choice).
  Whitening (gae, reinforce_plus_plus*) is over the whole batch given.
- Policy loss (`losses.py`): per-token `vanilla` clipped PPO (asymmetric and
  dual clip), `gspo` (sequence-level ratio), `cispo` (clipped IS weight on
  the REINFORCE term), `clip_cov` / `kl_cov` (covariance-selected tokens), times a detached off-policy weight from a correction
  (`none`, `decoupled` with AReaL's cap, `tis`, `seq_tis`, `seq_mis`,
  `geo_mis`, `icepop`; masked tokens get weight 0). It returns the per-token
  loss: the training step adds the entropy bonus and the KL-in-loss term per
  token and reduces the sum once with `agg_loss`.
- Value loss: clipped, 0.5 * max of squared errors, per token.
- Episodes (`episodes.py`): DAPO's overlong reward shaping and the loss
  filters (`overlong`, `zero_variance`) that take whole episodes out of the
  policy loss.
- KL (`kl.py`): k1/abs/k2/k3 per-token estimators (and k1+/k3+ with k2's
  gradient), exact `full_kl` from
  logits, fixed/adaptive coefficient controllers, KL-in-reward, and the k3
  learner-vs-actor mismatch logged every step.

Aggregation (`agg_loss`): every mode is a weighted token sum over a
normaliser that does not depend on the loss, so a micro-batch's share of the
mini-batch loss is its weighted sum times one `loss_scale` (computed from the
whole mini-batch of every rank by `learner.sharding.plan_minibatches`).
Without a scale, `agg_loss` is the aggregation over the rows given.

Every choice (estimator, policy loss, correction, KL estimator, aggregation
mode) is registered once in `registry.py` (torch-free: names, rules, formula,
source) and implemented here. This package imports its torch modules lazily,
on first use of a name, so ``configs.schema`` can import the registry without
torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "ADVANTAGE_ESTIMATORS": "advantages",
    "AdvantageConfig": "advantages",
    "AdvantageInputs": "advantages",
    "compute_gae": "advantages",
    "discounted_returns": "advantages",
    "gae": "advantages",
    "get_advantage_estimator": "advantages",
    "grpo": "advantages",
    "masked_mean": "advantages",
    "masked_var": "advantages",
    "masked_whiten": "advantages",
    "needs_critic": "advantages",
    "needs_greedy_baseline": "advantages",
    "reinforce_plus_plus": "advantages",
    "reinforce_plus_plus_baseline": "advantages",
    "remax": "advantages",
    "rloo": "advantages",
    "KL_PENALTIES": "kl",
    "AdaptiveKLController": "kl",
    "FixedKLController": "kl",
    "apply_kl_in_reward": "kl",
    "full_kl": "kl",
    "get_kl_penalty": "kl",
    "kl_penalty": "kl",
    "logprob_mismatch_kl": "kl",
    "make_kl_controller": "kl",
    "LOSS_AGG_MODES": "losses",
    "OFF_POLICY_CORRECTIONS": "losses",
    "POLICY_LOSSES": "losses",
    "AggMode": "losses",
    "Correction": "losses",
    "PolicyLossConfig": "losses",
    "PolicyLossInputs": "losses",
    "agg_loss": "losses",
    "agg_units": "losses",
    "loss_scale": "losses",
    "entropy_from_logits": "losses",
    "logprobs_from_logits": "losses",
    "policy_loss": "losses",
    "value_loss": "losses",
    "SAMPLE_FILTERS": "episodes",
    "EpisodeFacts": "episodes",
    "NoShaping": "episodes",
    "OverlongShaping": "episodes",
    "add_at_last_token": "episodes",
    "loss_keep": "episodes",
    "overlong_penalty": "episodes",
}
"""Public name -> the module of this package that defines it."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """``algos.policy_loss`` etc.: import the defining module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
