"""Policy and value losses, log-prob/entropy helpers and loss aggregation.

Three log-prob tensors meet in the policy loss of an asynchronous trainer:

    behaviour_logprobs  what the actor's inference engine sampled with
                        (possibly several weight versions old, and computed
                        by a different kernel stack);
    old_logprobs        the proximal policy: the learner's own recomputed
                        log-probs with the current weights, before this update;
    logprobs            the policy being optimised (requires grad).

An off-policy correction (`OFF_POLICY_CORRECTIONS`) picks the log-probs the
policy ratio is taken against (the anchor) and a detached per-token weight on
the policy loss, some of it 0 (masked). With rho_t = pi_old / pi_behav per
token and rho_b = prod_t rho_t per sequence:

    none       anchor = behaviour, w = 1                  (plain PPO on actor log-probs)
    decoupled  anchor = old, w = rho_t, masked where rho_t > behav_imp_weight_cap
               (decoupled PPO, Hilton et al. 2021; AReaL)
    tis        anchor = old, w = min(rho_t, tis_cap)      (truncated IS, Yao et al. 2025)
    seq_tis    anchor = old, w = min(rho_b, tis_cap)      (sequence-level TIS)
    seq_mis    anchor = old, w = rho_b, sequence masked where rho_b > seq_mis_cap
    geo_mis    anchor = old, w = rho_t, sequence masked where the geometric mean
               exp(mean_t log rho_t) is outside [1/geo_mis_bound, geo_mis_bound]
    icepop     anchor = old, w = rho_t, token masked where rho_t is outside
               [1/icepop_beta, icepop_beta]               (IcePop, Ring-1T)

With behaviour == old, every correction gives plain PPO's loss. Log-ratios are
clamped to +-log_ratio_clamp before exp. The policy loss itself
(`POLICY_LOSSES`: vanilla PPO, GSPO, CISPO) is in `policy_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from learner.algos import registry
from learner.algos.advantages import masked_mean

# --------------------------------------------------------------------------
# log-probs and entropy


def logprobs_from_logits(logits: Tensor, labels: Tensor, chunk_size: int = 1024) -> Tensor:
    """log softmax(logits)[label] per position.

    Computed as logits[label] - logsumexp(logits) in float32, `chunk_size`
    rows of B*T at a time, so no [B,T,V] log-softmax copy is materialised
    (only one float32 chunk of [chunk_size, V] at a time). Differentiable.

    Args:
        logits: [B,T,V] any float dtype.
        labels: [B,T] long token ids (the tokens that were sampled).
        chunk_size: rows per chunk.

    Returns:
        [B,T] float32 log-probs.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    out = []
    for start in range(0, flat_logits.shape[0], chunk_size):
        chunk = flat_logits[start : start + chunk_size].float()
        picked = chunk.gather(-1, flat_labels[start : start + chunk_size].unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    if not out:
        return torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    return torch.cat(out).reshape(labels.shape)


def entropy_from_logits(logits: Tensor, chunk_size: int = 1024) -> Tensor:
    """Entropy of softmax(logits) per position: logsumexp(l) - sum(softmax(l) * l).

    Args:
        logits: [B,T,V] any float dtype; -inf entries (masked vocabulary) are allowed.
        chunk_size: rows of B*T per float32 chunk.

    Returns:
        [B,T] float32 entropies (nats).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    out = []
    for start in range(0, flat.shape[0], chunk_size):
        chunk = flat[start : start + chunk_size].float()
        probs = torch.softmax(chunk, dim=-1)
        finite = torch.where(torch.isfinite(chunk), chunk, 0.0)  # -inf logits have prob 0
        out.append(torch.logsumexp(chunk, dim=-1) - (probs * finite).sum(-1))
    if not out:
        return torch.zeros(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    return torch.cat(out).reshape(logits.shape[:-1])


# --------------------------------------------------------------------------
# aggregation
#
# Every mode is a weighted token sum over a normaliser that does not depend on
# the loss:
#
#     loss = sum_bt m_bt * c_b * L_bt / (U * H)
#
# with c_b a per-row coefficient, U a count that adds up over rows (tokens, or
# rows with at least one token) and H the horizon (Dr. GRPO) or 1. So a
# mini-batch split over micro-batches and ranks gets exactly the whole
# mini-batch's loss when every micro-batch multiplies its weighted sum by one
# ``loss_scale = world / (U_mini * H)``, U_mini counted over the mini-batch of
# every rank (``world`` undoes the gradient averaging over ranks). That scale
# is computed by `loss_scale` alone; `learner.sharding.plan_minibatches` calls
# it once per micro-batch.


@dataclass(frozen=True)
class AggMode:
    """One loss aggregation, as the three pieces of the formula above."""

    row_coef: Callable[[Tensor], Tensor]
    """mask [B,T] -> c_b [B]."""
    row_units: Callable[[Tensor], Tensor]
    """mask [B,T] -> each row's share of U [B]."""
    uses_horizon: bool
    """Whether the normaliser has the horizon H."""


def _ones(mask: Tensor) -> Tensor:
    return torch.ones(mask.shape[0], dtype=mask.dtype, device=mask.device)


def _inv_tokens(mask: Tensor) -> Tensor:
    return 1.0 / mask.sum(-1).clamp(min=1)


def _tokens(mask: Tensor) -> Tensor:
    return mask.sum(-1)


def _has_tokens(mask: Tensor) -> Tensor:
    return (mask.sum(-1) > 0).to(mask.dtype)


LOSS_AGG_MODES: dict[str, AggMode] = {
    name: registry.LOSS_AGG_MODES.bind(mode, name)
    for name, mode in [
        # sum_bt m*L / sum_bt m: every token of the mini-batch weighs the same (DAPO)
        ("token-mean", AggMode(_ones, _tokens, uses_horizon=False)),
        # mean over rows with tokens of sum_t m*L
        ("seq-mean-token-sum", AggMode(_ones, _has_tokens, uses_horizon=False)),
        # mean over rows with tokens of sum_t m*L / n_b (original GRPO)
        ("seq-mean-token-mean", AggMode(_inv_tokens, _has_tokens, uses_horizon=False)),
        # mean over rows with tokens of sum_t m*L / H (Dr. GRPO; H a constant: the response budget)
        ("seq-mean-token-sum-norm", AggMode(_ones, _has_tokens, uses_horizon=True)),
    ]
}
"""Aggregation mode -> its `AggMode` (names, formulas, sources: `registry.LOSS_AGG_MODES`)."""
assert list(LOSS_AGG_MODES) == list(registry.LOSS_AGG_MODES.implementations())


def _agg_mode(mode: str) -> AggMode:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; valid modes: {sorted(LOSS_AGG_MODES)}")
    return LOSS_AGG_MODES[mode]


def agg_units(mask: Tensor, mode: str) -> float:
    """U of ``mask`` [B,T] for ``mode``: its tokens (token-mean) or its rows with a token."""
    return float(_agg_mode(mode).row_units(mask.float()).sum())


def loss_scale(mode: str, units: float, world: int = 1, horizon: int | None = None) -> float:
    """The factor on a micro-batch's weighted token sum: ``world / (max(U, 1) * H)``.

    Args:
        mode: aggregation mode.
        units: U of the whole mini-batch, every rank's rows (`agg_units`).
        world: ranks whose gradients are averaged (1 for a local loss).
        horizon: H for modes that use it (required there), ignored otherwise.
    """
    norm = 1.0
    if _agg_mode(mode).uses_horizon:
        if horizon is None or horizon <= 0:
            raise ValueError(f"loss_agg_mode {mode!r} needs a positive horizon (a constant), got {horizon}")
        norm = float(horizon)
    return world / (max(units, 1.0) * norm)


def agg_loss(
    loss_mat: Tensor, mask: Tensor, mode: str, norm_horizon: int | None = None, scale: float | None = None
) -> Tensor:
    """Reduce a per-token loss to a scalar (verl's `agg_loss` modes).

    Modes (n_b = tokens of row b under the mask, B' = rows with n_b > 0, H = horizon):
        token-mean               sum_bt m*L / sum_bt m           (DAPO; global token mean)
        seq-mean-token-sum       mean over B' of sum_t m*L       (rows with no token excluded)
        seq-mean-token-mean      mean over B' of sum_t m*L / n_b  (original GRPO)
        seq-mean-token-sum-norm  mean over B' of sum_t m*L / H    (Dr. GRPO)

    Args:
        loss_mat: [B,T] per-token loss.
        mask: [B,T] 0/1; values under mask 0 are never read.
        mode: one of LOSS_AGG_MODES.
        norm_horizon: H for seq-mean-token-sum-norm when ``scale`` is None;
            None uses this tensor's T (only right for a local value, e.g. a metric).
        scale: the micro-batch's ``loss_scale`` (from the mini-batch of every
            rank). None: this tensor's own, so the result is the aggregation
            over the rows given.

    Returns:
        Scalar tensor: ``sum_bt m*c_b*L * scale``; an empty mask gives 0.
    """
    agg = _agg_mode(mode)
    mask = mask.to(loss_mat.dtype)
    weighted = torch.where(mask > 0, loss_mat, 0.0) * agg.row_coef(mask).unsqueeze(-1)
    if scale is None:  # the units stay a tensor: no host read (a metric per micro-batch goes this way)
        horizon = loss_mat.shape[-1] if norm_horizon is None else norm_horizon
        return weighted.sum() * loss_scale(mode, 1.0, 1, horizon) / agg.row_units(mask).sum().clamp(min=1.0)
    return weighted.sum() * scale


# --------------------------------------------------------------------------
# policy loss


@dataclass
class PolicyLossConfig:
    """A policy loss (`POLICY_LOSSES`) with an off-policy correction (`OFF_POLICY_CORRECTIONS`)."""

    loss_mode: str = "vanilla"
    """'vanilla' (clipped PPO) | 'gspo' | 'cispo'; see `POLICY_LOSSES`."""
    clip_ratio_low: float = 0.2
    """Ratio is clipped below at 1 - clip_ratio_low."""
    clip_ratio_high: float = 0.2
    """Ratio is clipped above at 1 + clip_ratio_high (raise it for DAPO clip-higher)."""
    clip_ratio_c: float = 3.0
    """Dual clip (vanilla): for negative advantages the per-token loss is capped at
    clip_ratio_c * |A| (Ye et al. 2020). Must be > 1."""
    loss_agg_mode: str = "token-mean"
    """How the per-token loss is reduced for the ``pg_loss`` metric; see `agg_loss`."""
    norm_horizon: int | None = None
    """H of loss_agg_mode 'seq-mean-token-sum-norm' (the response budget); None uses the tensor's T."""
    off_policy_correction: str = "decoupled"
    """A key of `OFF_POLICY_CORRECTIONS`; see the module docstring."""
    tis_cap: float = 2.0
    """'tis' / 'seq_tis': upper bound on the (token / sequence) importance weight. Must be >= 1."""
    behav_imp_weight_cap: float | None = 5.0
    """'decoupled': tokens whose pi_old / pi_behav exceeds this are masked (weight 0), as AReaL.
    None: no cap. Must be > 1."""
    seq_mis_cap: float = 2.0
    """'seq_mis': a sequence whose importance weight prod_t pi_old / pi_behav exceeds this is masked."""
    geo_mis_bound: float = 1.05
    """'geo_mis': a sequence whose geometric-mean ratio is outside [1/bound, bound] is masked."""
    icepop_beta: float = 2.0
    """'icepop': a token whose ratio pi_old / pi_behav is outside [1/beta, beta] is masked."""
    clip_cov_ratio: float = 0.0002
    """'clip_cov': fraction of the micro-batch's tokens whose gradient is cut."""
    clip_cov_lb: float = 1.0
    """'clip_cov': only tokens whose covariance is above this are candidates."""
    clip_cov_ub: float = 5.0
    """'clip_cov': only tokens whose covariance is below this are candidates."""
    kl_cov_ratio: float = 0.0002
    """'kl_cov': fraction of the micro-batch's tokens (largest covariance) that get the KL term."""
    kl_cov_coef: float = 1.0
    """'kl_cov': weight of |log pi - log anchor| on those tokens."""
    log_ratio_clamp: float = 20.0
    """Log-ratios are clamped to +-this before exp."""

    def __post_init__(self) -> None:
        if self.clip_ratio_low < 0 or self.clip_ratio_high < 0:
            raise ValueError("clip_ratio_low and clip_ratio_high must be >= 0")
        if self.clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1, got {self.clip_ratio_c}")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"unknown loss_agg_mode {self.loss_agg_mode!r}; valid modes: {sorted(LOSS_AGG_MODES)}")
        if self.loss_mode not in POLICY_LOSSES:
            raise ValueError(f"unknown policy loss_mode {self.loss_mode!r}; valid: {sorted(POLICY_LOSSES)}")
        if self.off_policy_correction not in OFF_POLICY_CORRECTIONS:
            raise ValueError(
                f"unknown off_policy_correction {self.off_policy_correction!r}; "
                f"valid: {sorted(OFF_POLICY_CORRECTIONS)}"
            )
        if self.tis_cap < 1.0:
            raise ValueError(f"tis_cap must be >= 1, got {self.tis_cap}")
        if self.behav_imp_weight_cap is not None and self.behav_imp_weight_cap <= 1.0:
            raise ValueError(f"behav_imp_weight_cap must be > 1 (or None), got {self.behav_imp_weight_cap}")
        for name in ("seq_mis_cap", "geo_mis_bound", "icepop_beta"):
            if getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be > 1, got {getattr(self, name)}")
        if self.log_ratio_clamp <= 0:
            raise ValueError(f"log_ratio_clamp must be > 0, got {self.log_ratio_clamp}")
        for name in ("clip_cov_ratio", "kl_cov_ratio"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb ({self.clip_cov_lb}) must be below clip_cov_ub ({self.clip_cov_ub})")


@dataclass
class PolicyLossInputs:
    """Per-token tensors for the policy loss, all [B,T]."""

    logprobs: Tensor
    """Current policy log-probs of the sampled tokens (requires grad)."""
    old_logprobs: Tensor
    """Proximal policy: the learner's own log-probs before this update (no grad)."""
    behaviour_logprobs: Tensor
    """Log-probs the actor's engine sampled with (no grad; may be stale)."""
    advantages: Tensor
    """Advantages (no grad)."""
    mask: Tensor
    """0/1, 1 on sampled tokens that take part in the loss."""


def _log_ratio_exp(log_ratio: Tensor, clamp: float) -> Tensor:
    return torch.exp(log_ratio.clamp(-clamp, clamp))


def _seq_log_ratio(log_ratio: Tensor, mask: Tensor, mean: bool) -> Tensor:
    """[B] sum (or mean) over each row's masked tokens of ``log_ratio``."""
    total = torch.where(mask > 0, log_ratio, 0.0).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if mean else total


# --------------------------------------------------------------------------
# off-policy corrections: fn(inputs, cfg) -> Correction


@dataclass
class Correction:
    """What an off-policy correction decides, all [B,T] and detached."""

    anchor: Tensor
    """Log-probs the policy ratio is taken against."""
    weight: Tensor
    """Importance weight on each token's loss; 0 on masked tokens."""
    masked: Tensor
    """Bool, True on tokens the correction masked out (they keep their place in the
    normaliser, as AReaL does: masking shrinks the update instead of re-weighting the rest)."""
    truncated: Tensor
    """Bool, True on tokens whose weight was truncated (tis, seq_tis)."""


def _behav_log_ratio(inputs: PolicyLossInputs, cfg: PolicyLossConfig) -> Tensor:
    """[B,T] log pi_old - log pi_behav, clamped."""
    return (inputs.old_logprobs - inputs.behaviour_logprobs).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)


def _no(inputs: PolicyLossInputs) -> Tensor:
    return torch.zeros_like(inputs.mask, dtype=torch.bool)


def _correction_none(inputs: PolicyLossInputs, cfg: PolicyLossConfig) -> Correction:
    one = torch.ones_like(inputs.old_logprobs)
    return Correction(inputs.behaviour_logprobs.detach(), one, _no(inputs), _no(inputs))


def _correction_decoupled(inputs: PolicyLossInputs, cfg: PolicyLossConfig) -> Correction:
    weight = torch.exp(_behav_log_ratio(inputs, cfg))
    masked = _no(inputs) if cfg.behav_imp_weight_cap is None else weight > cfg.behav_imp_weight_cap
    return Correction(inputs.old_logprobs.detach(), torch.where(masked, 0.0, weight).detach(), masked, _no(inputs))


def _correction_tis(inputs: PolicyLossInputs, cfg: PolicyLossConfig) -> Correction:
    weight = torch.exp(_behav_log_ratio(inputs, cfg))
    truncated = weight > cfg.tis_cap
    return Correction(inputs.old_logprobs.detach(), weight.clamp(max=cfg.tis_cap).detach(), _no(inputs), truncated)


def _correction_seq_tis(inputs: PolicyLossInputs, cfg: PolicyLossConfig) -> Correction:
    seq_log = _seq_log_ratio(_behav_log_ratio(inputs, cfg), inputs.mask, mean=False)
    seq_weight = torch.exp(seq_log.clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp))
    truncated = (seq_weight > cfg.tis_cap).unsqueeze(-1).expand_as(inputs.mask)
    weight = seq_weight.clamp(max=cfg.tis_cap).unsqueeze(-1).expand_as(inputs.old_logprobs)
    return Correction(inputs.old_logprobs.detach(), weight.detach(), _no(inputs), truncated)


def _correction_seq_mis(inputs: PolicyLossInputs, cfg: PolicyLossConfig) -> Correction:
    seq_log = _seq_log_ratio(_behav_log_ratio(inputs, cfg), inputs.mask, mean=False)
    seq_weight = torch.exp(seq_log.clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp))
    masked = (seq_weight > cfg.seq_mis_cap).unsqueeze(-1).expand_as(inputs.mask)
    weight = torch.where(masked, 0.0, seq_weight.unsqueeze(-1).expand_as(inputs.old_logprobs))
    return Correction(inputs.old_logprobs.detach(), weight.detach(), masked, _no(inputs))


def _correction_geo_mis(inputs: PolicyLossInputs, cfg: PolicyLossConfig) -> Correction:
    log_ratio = _behav_log_ratio(inputs, cfg)
    geo = torch.exp(_seq_log_ratio(log_ratio, inputs.mask, mean=True))
    outside = (geo > cfg.geo_mis_bound) | (geo < 1.0 / cfg.geo_mis_bound)
    masked = outside.unsqueeze(-1).expand_as(inputs.mask)
    weight = torch.where(masked, 0.0, torch.exp(log_ratio))
    return Correction(inputs.old_logprobs.detach(), weight.detach(), masked, _no(inputs))


def _correction_icepop(inputs: PolicyLossInputs, cfg: PolicyLossConfig) -> Correction:
    weight = torch.exp(_behav_log_ratio(inputs, cfg))
    masked = (weight > cfg.icepop_beta) | (weight < 1.0 / cfg.icepop_beta)
    return Correction(inputs.old_logprobs.detach(), torch.where(masked, 0.0, weight).detach(), masked, _no(inputs))


for _name, _fn in [
    ("none", _correction_none),
    ("decoupled", _correction_decoupled),
    ("tis", _correction_tis),
    ("seq_tis", _correction_seq_tis),
    ("seq_mis", _correction_seq_mis),
    ("geo_mis", _correction_geo_mis),
    ("icepop", _correction_icepop),
]:
    registry.OFF_POLICY_CORRECTIONS.bind(_fn, _name)

OFF_POLICY_CORRECTIONS: dict[str, Callable[[PolicyLossInputs, PolicyLossConfig], Correction]] = (
    registry.OFF_POLICY_CORRECTIONS.implementations()
)
"""Correction name -> fn(inputs, cfg) -> `Correction`; formulas in the module docstring."""


# --------------------------------------------------------------------------
# policy losses: fn(logprobs, anchor, advantages, mask, cfg) -> (per-token loss, clip masks)


def _vanilla(logprobs: Tensor, anchor: Tensor, adv: Tensor, mask: Tensor, cfg: PolicyLossConfig):
    ratio = _log_ratio_exp(logprobs - anchor, cfg.log_ratio_clamp)
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    clipped = torch.maximum(loss1, loss2)
    loss3 = -adv * cfg.clip_ratio_c
    per_token = torch.where(adv < 0, torch.minimum(clipped, loss3), clipped)
    return per_token, loss2 > loss1, (clipped > loss3) & (adv < 0)


def _gspo(logprobs: Tensor, anchor: Tensor, adv: Tensor, mask: Tensor, cfg: PolicyLossConfig):
    # s_b = exp(mean_t (logprobs - anchor)); per token exp(logprobs - sg(logprobs) + sg(log s_b)):
    # the value s_b, the gradient s_b * grad logprobs_t (as verl's straight-through form)
    seq_log = _seq_log_ratio(logprobs.detach() - anchor, mask, mean=True)
    log_ratio = logprobs - logprobs.detach() + seq_log.unsqueeze(-1)
    ratio = torch.exp(log_ratio.clamp(max=cfg.log_ratio_clamp))
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    return torch.maximum(loss1, loss2), loss2 > loss1, torch.zeros_like(mask, dtype=torch.bool)


def _cispo(logprobs: Tensor, anchor: Tensor, adv: Tensor, mask: Tensor, cfg: PolicyLossConfig):
    ratio = _log_ratio_exp(logprobs.detach() - anchor, cfg.log_ratio_clamp)
    clipped_ratio = ratio.clamp(1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    per_token = -adv * clipped_ratio.detach() * logprobs
    return per_token, clipped_ratio != ratio, torch.zeros_like(mask, dtype=torch.bool)


def _token_cov(logprobs: Tensor, adv: Tensor, valid: Tensor) -> Tensor:
    """[B,T] (A - mean A) * (log pi - mean log pi), means over the valid tokens given (detached)."""
    lp = logprobs.detach()
    return (adv - masked_mean(adv, valid)) * (lp - masked_mean(lp, valid))


def _clip_cov(logprobs: Tensor, anchor: Tensor, adv: Tensor, mask: Tensor, cfg: PolicyLossConfig):
    # PPO clip (no dual clip); then a random clip_cov_ratio of the tokens the clip left alone whose
    # covariance lies in (lb, ub) lose their gradient
    ratio = _log_ratio_exp(logprobs - anchor, cfg.log_ratio_clamp)
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    valid = mask > 0
    by_ratio = (loss2 > loss1) & valid
    cov = _token_cov(logprobs, adv, valid)
    eligible = torch.nonzero(valid & ~by_ratio & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub))
    n = max(int(cfg.clip_cov_ratio * int(valid.sum())), 1)
    picked = eligible[torch.randperm(len(eligible), device=eligible.device)[:n]]
    cut = torch.zeros_like(valid)
    cut[picked[:, 0], picked[:, 1]] = True
    per_token = torch.where(cut, 0.0, torch.maximum(loss1, loss2))
    return per_token, by_ratio | cut, torch.zeros_like(valid)


def _kl_cov(logprobs: Tensor, anchor: Tensor, adv: Tensor, mask: Tensor, cfg: PolicyLossConfig):
    # unclipped -A r; the kl_cov_ratio of the tokens with the largest covariance add coef * |log r|
    log_ratio = (logprobs - anchor).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    per_token = -adv * torch.exp(log_ratio)
    valid = mask > 0
    flat_valid = torch.nonzero(valid.reshape(-1)).squeeze(-1)
    chosen = torch.zeros_like(valid)
    if len(flat_valid):
        cov = _token_cov(logprobs, adv, valid).reshape(-1)[flat_valid]
        k = max(int(len(flat_valid) * cfg.kl_cov_ratio), 1)
        chosen.view(-1)[flat_valid[torch.topk(cov, k).indices]] = True
    per_token = torch.where(chosen, per_token + cfg.kl_cov_coef * log_ratio.abs(), per_token)
    return per_token, chosen, torch.zeros_like(valid)


for _name, _fn in [("vanilla", _vanilla), ("gspo", _gspo), ("cispo", _cispo), ("clip_cov", _clip_cov), ("kl_cov", _kl_cov)]:
    registry.POLICY_LOSSES.bind(_fn, _name)

POLICY_LOSSES: dict[str, Callable] = registry.POLICY_LOSSES.implementations()
"""Policy loss name -> fn(logprobs, anchor, adv, mask, cfg) -> (per-token loss [B,T],
clipped [B,T] bool, dual-clipped [B,T] bool); formulas in `policy_loss`."""


def _zero_outside_mask(inputs: PolicyLossInputs) -> PolicyLossInputs:
    """Replace every tensor by 0 where mask is 0, so garbage or NaN there
    (e.g. actor log-probs on observation tokens) reaches neither loss nor grad."""
    valid = inputs.mask > 0
    return PolicyLossInputs(
        logprobs=torch.where(valid, inputs.logprobs, 0.0),
        old_logprobs=torch.where(valid, inputs.old_logprobs, 0.0),
        behaviour_logprobs=torch.where(valid, inputs.behaviour_logprobs, 0.0),
        advantages=torch.where(valid, inputs.advantages, 0.0),
        mask=inputs.mask,
    )


def policy_loss(inputs: PolicyLossInputs, cfg: PolicyLossConfig) -> tuple[Tensor, dict[str, float]]:
    """Per-token policy loss times the off-policy correction's weight.

    Per token, with A the advantage, (anchor, w) from the correction and
    r = exp(clamp(logprobs - anchor)):

        vanilla  L = max(-A r, -A clip(r, 1 - low, 1 + high)), and for A < 0
                 L = min(L, -A clip_ratio_c)                        (dual clip)
        gspo     the same without dual clip, with r replaced by the row's
                 s_b = exp(mean_t (logprobs - anchor)) (Zheng et al. 2025)
        cispo    L = -A sg(clip(r, 1 - low, 1 + high)) logprobs       (MiniMax-M1)
        clip_cov vanilla without dual clip, and a random clip_cov_ratio of the unclipped
                 tokens with covariance (A - mean A)(log pi - mean log pi) in (lb, ub)
                 get L = 0 (Cui et al. 2025; the covariance is the micro-batch's)
        kl_cov   L = -A r, plus kl_cov_coef * |log r| on the kl_cov_ratio of the tokens
                 with the largest covariance (Cui et al. 2025; micro-batch's covariance)
        loss     w * L, 0 where mask is 0

    Reduce it with `agg_loss` (and the micro-batch's ``loss_scale`` in training).

    Returns:
        (per-token loss [B,T], metrics) with metrics (0-d tensors)
            pg_loss             agg_loss of the per-token loss over these rows (cfg.loss_agg_mode)
            pg_clipfrac         masked fraction where the clip is active
            pg_clipfrac_lower   masked fraction where the dual clip is active (vanilla)
            ppo_kl              masked mean of anchor - logprobs (approx KL to the anchor policy)
            is_weight_mean      masked mean of w
            is_weight_max       max of w over masked tokens (0 if none)
            is_weight_truncfrac masked fraction whose weight was truncated (tis, seq_tis)
            is_masked_frac      masked fraction the correction masked out (decoupled cap,
                                seq_mis, geo_mis, icepop)
    """
    mask = inputs.mask.to(inputs.logprobs.dtype)
    inputs = _zero_outside_mask(inputs)
    corr = OFF_POLICY_CORRECTIONS[cfg.off_policy_correction](inputs, cfg)
    adv = inputs.advantages.to(inputs.logprobs.dtype)
    per_token, clipped, dual = POLICY_LOSSES[cfg.loss_mode](inputs.logprobs, corr.anchor, adv, mask, cfg)
    per_token = torch.where(mask > 0, corr.weight * per_token, 0.0)

    with torch.no_grad():
        masked_weight = torch.where(mask > 0, corr.weight, torch.zeros_like(corr.weight))
        frac = lambda b: masked_mean(b.to(mask.dtype), mask)  # noqa: E731
        metrics = {  # 0-d tensors: read on the host once per step, not per micro-batch
            "pg_loss": agg_loss(per_token, mask, cfg.loss_agg_mode, cfg.norm_horizon),
            "pg_clipfrac": frac(clipped),
            "pg_clipfrac_lower": frac(dual),
            "ppo_kl": masked_mean(corr.anchor - inputs.logprobs, mask),
            "is_weight_mean": masked_mean(corr.weight, mask),
            "is_weight_max": masked_weight.max() if masked_weight.numel() else masked_weight.new_zeros(()),
            "is_weight_truncfrac": frac(corr.truncated),
            "is_masked_frac": frac(corr.masked),
        }
    return per_token, metrics


# --------------------------------------------------------------------------
# value loss


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss per token (as verl / TRL).

        v_clip = old_values + clip(values - old_values, -cliprange_value, cliprange_value)
        loss   = 0.5 * max((values - R)^2, (v_clip - R)^2), 0 where mask is 0

    Reduce it with `agg_loss`.

    Args:
        values: [B,T] current critic predictions (requires grad).
        old_values: [B,T] critic predictions at rollout time (no grad).
        returns: [B,T] regression targets.
        mask: [B,T] 0/1.
        cliprange_value: half-width of the clip around old_values.

    Returns:
        (per-token loss [B,T], metrics) with vf_loss (its token mean), vf_clipfrac
        (masked fraction where the clipped error is the larger), vpred_mean.
    """
    mask_f = mask.to(values.dtype)
    valid = mask > 0
    values = torch.where(valid, values, 0.0)
    old_values = torch.where(valid, old_values, 0.0)
    returns = torch.where(valid, returns, 0.0)
    v_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    err1 = (values - returns) ** 2
    err2 = (v_clipped - returns) ** 2
    per_token = torch.where(valid, 0.5 * torch.maximum(err1, err2), 0.0)
    with torch.no_grad():
        metrics = {
            "vf_loss": masked_mean(per_token, mask_f).item(),
            "vf_clipfrac": masked_mean((err2 > err1).to(mask_f.dtype), mask_f).item(),
            "vpred_mean": masked_mean(values, mask_f).item(),
        }
    return per_token, metrics
