"""The learner's RL math: pure functions over [B,T] tensors (no model, no I/O).

What is here, and the simplifications made:

- Advantages (`advantages.py`): gae, grpo (Dr. GRPO when the std division is
  off), rloo, reinforce_plus_plus, reinforce_plus_plus_baseline, remax. Picked
  once by name from `ADVANTAGE_ESTIMATORS`. A batch row is one trajectory's
  response; tool-observation tokens inside it have mask 0 and are *skipped*
  (not time steps): GAE and REINFORCE++ discount once per sampled token and
  bootstrap from the next sampled token's value. Outcome estimators use the
  per-trajectory reward sum, so per-turn rewards only shape gae and
  reinforce_plus_plus. Groups of one get mean 0 / std 1 (verl's choice).
  Whitening (gae, reinforce_plus_plus*) is over the whole batch given.
- Policy loss (`losses.py`): per-token `vanilla` clipped PPO (asymmetric and
  dual clip), `gspo` (sequence-level ratio) or `cispo` (clipped IS weight on
  the REINFORCE term), times a detached off-policy weight from a correction
  (`none`, `decoupled` with AReaL's cap, `tis`, `seq_tis`, `seq_mis`,
  `geo_mis`, `icepop`; masked tokens get weight 0). It returns the per-token
  loss: the training step adds the entropy bonus and the KL-in-loss term per
  token and reduces the sum once with `agg_loss`.
- Value loss: clipped, 0.5 * max of squared errors, per token.
- KL (`kl.py`): k1/abs/k2/k3 per-token estimators, exact `full_kl` from
  logits, fixed/adaptive coefficient controllers, KL-in-reward, and the k3
  learner-vs-actor mismatch logged every step.

Aggregation (`agg_loss`): every mode is a weighted token sum over a
normaliser that does not depend on the loss, so a micro-batch's share of the
mini-batch loss is its weighted sum times one `loss_scale` (computed from the
whole mini-batch of every rank by `learner.sharding.plan_minibatches`).
Without a scale, `agg_loss` is the aggregation over the rows given.
"""

from learner.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageConfig,
    AdvantageInputs,
    compute_gae,
    discounted_returns,
    gae,
    get_advantage_estimator,
    grpo,
    masked_mean,
    masked_var,
    masked_whiten,
    needs_critic,
    needs_greedy_baseline,
    reinforce_plus_plus,
    reinforce_plus_plus_baseline,
    remax,
    rloo,
)
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
from learner.algos.losses import (
    LOSS_AGG_MODES,
    OFF_POLICY_CORRECTIONS,
    POLICY_LOSSES,
    AggMode,
    Correction,
    PolicyLossConfig,
    PolicyLossInputs,
    agg_loss,
    agg_units,
    loss_scale,
    entropy_from_logits,
    logprobs_from_logits,
    policy_loss,
    value_loss,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_PENALTIES",
    "LOSS_AGG_MODES",
    "OFF_POLICY_CORRECTIONS",
    "POLICY_LOSSES",
    "AggMode",
    "Correction",
    "AdaptiveKLController",
    "AdvantageConfig",
    "AdvantageInputs",
    "FixedKLController",
    "PolicyLossConfig",
    "PolicyLossInputs",
    "agg_loss",
    "agg_units",
    "loss_scale",
    "apply_kl_in_reward",
    "compute_gae",
    "discounted_returns",
    "entropy_from_logits",
    "full_kl",
    "gae",
    "get_advantage_estimator",
    "get_kl_penalty",
    "grpo",
    "kl_penalty",
    "logprob_mismatch_kl",
    "logprobs_from_logits",
    "make_kl_controller",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "needs_critic",
    "needs_greedy_baseline",
    "policy_loss",
    "reinforce_plus_plus",
    "reinforce_plus_plus_baseline",
    "remax",
    "rloo",
    "value_loss",
]
