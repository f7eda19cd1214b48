"""Policy and value losses, log-prob/entropy helpers and loss aggregation.

Three log-prob tensors meet in the policy loss of an asynchronous trainer:

    behaviour_logprobs  what the actor's inference engine sampled with
                        (possibly several weight versions old, and computed
                        by a different kernel stack);
    old_logprobs        the proximal policy: the learner's own recomputed
                        log-probs with the current weights, before this update;
    logprobs            the policy being optimised (requires grad).

An off-policy correction (a registry: `none`, `decoupled`, `tis`) picks the
log-probs the PPO ratio is clipped against (the anchor) and a detached
per-token importance weight that multiplies the clipped PPO loss:

    none       anchor = behaviour, weight = 1           (plain PPO on actor log-probs)
    decoupled  anchor = old, weight = pi_old / pi_behav (decoupled PPO, Hilton et al.
               2021; AReaL), not truncated
    tis        anchor = old, weight = min(pi_old / pi_behav, tis_cap)
               (truncated importance sampling)

With behaviour == old all three give the same loss. Log-ratios are clamped
to +-log_ratio_clamp before exp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

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


def _masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    kept = torch.where(mask > 0, values, 0.0)
    return kept.sum() if dim is None else kept.sum(dim)


def _token_mean(loss_mat: Tensor, mask: Tensor, norm_horizon: int | None) -> Tensor:
    return masked_mean(loss_mat, mask)


def _seq_mean_token_sum(loss_mat: Tensor, mask: Tensor, norm_horizon: int | None) -> Tensor:
    has_tokens = (mask.sum(-1) > 0).to(loss_mat.dtype)
    return masked_mean(_masked_sum(loss_mat, mask, -1), has_tokens)


def _seq_mean_token_mean(loss_mat: Tensor, mask: Tensor, norm_horizon: int | None) -> Tensor:
    count = mask.sum(-1)
    seq = _masked_sum(loss_mat, mask, -1) / count.clamp(min=1)
    return masked_mean(seq, (count > 0).to(loss_mat.dtype))


def _seq_mean_token_sum_norm(loss_mat: Tensor, mask: Tensor, norm_horizon: int | None) -> Tensor:
    horizon = loss_mat.shape[-1] if norm_horizon is None else norm_horizon
    return _masked_sum(loss_mat, mask) / horizon


LOSS_AGG_MODES: dict[str, Callable[[Tensor, Tensor, int | None], Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}
"""Aggregation mode -> fn(loss_mat, mask, norm_horizon) -> scalar."""


def agg_loss(loss_mat: Tensor, mask: Tensor, mode: str, norm_horizon: int | None = None) -> Tensor:
    """Reduce a per-token loss to a scalar, as verl's `agg_loss`.

    Modes (n_b = tokens of row b under the mask, B' = rows with n_b > 0):
        token-mean               sum_bt m*L / sum_bt m          (DAPO; global token mean)
        seq-mean-token-sum       mean over B' of sum_t m*L      (rows with no token excluded)
        seq-mean-token-mean      mean over B' of sum_t m*L / n_b (original GRPO)
        seq-mean-token-sum-norm  sum_bt m*L / norm_horizon       (Dr. GRPO; norm_horizon
                                 defaults to T but should be a constant such as the
                                 max response length, so the scale does not depend on padding)

    The reduction is over the tensor given: with gradient accumulation over
    micro-batches, a micro-batch mean is not the global mean (the caller
    must rescale).

    Args:
        loss_mat: [B,T] per-token loss.
        mask: [B,T] 0/1.
        mode: one of LOSS_AGG_MODES.
        norm_horizon: divisor for seq-mean-token-sum-norm; ignored otherwise.

    Returns:
        Scalar tensor; an empty mask gives 0.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; valid modes: {sorted(LOSS_AGG_MODES)}")
    return LOSS_AGG_MODES[mode](loss_mat, mask.to(loss_mat.dtype), norm_horizon)


# --------------------------------------------------------------------------
# policy loss


@dataclass
class PolicyLossConfig:
    """Clipped-PPO policy loss with an off-policy correction."""

    clip_ratio_low: float = 0.2
    """Ratio is clipped below at 1 - clip_ratio_low."""
    clip_ratio_high: float = 0.2
    """Ratio is clipped above at 1 + clip_ratio_high (raise it for DAPO clip-higher)."""
    clip_ratio_c: float = 3.0
    """Dual clip: for negative advantages the per-token loss is capped at
    clip_ratio_c * |A| (Ye et al. 2020). Must be > 1."""
    loss_agg_mode: str = "token-mean"
    """How the per-token loss is reduced; see `agg_loss`."""
    norm_horizon: int | None = None
    """Constant divisor for loss_agg_mode 'seq-mean-token-sum-norm' (e.g. the
    max response length); None uses the batch's T."""
    off_policy_correction: str = "decoupled"
    """'none' | 'decoupled' | 'tis'; see the module docstring."""
    tis_cap: float = 2.0
    """Upper bound on the importance weight pi_old / pi_behaviour for 'tis'. Must be >= 1."""
    log_ratio_clamp: float = 20.0
    """Log-ratios are clamped to +-this before exp."""

    def __post_init__(self) -> None:
        if self.clip_ratio_low < 0 or self.clip_ratio_high < 0:
            raise ValueError("clip_ratio_low and clip_ratio_high must be >= 0")
        if self.clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1, got {self.clip_ratio_c}")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"unknown loss_agg_mode {self.loss_agg_mode!r}; valid modes: {sorted(LOSS_AGG_MODES)}")
        if self.off_policy_correction not in OFF_POLICY_CORRECTIONS:
            raise ValueError(
                f"unknown off_policy_correction {self.off_policy_correction!r}; "
                f"valid: {sorted(OFF_POLICY_CORRECTIONS)}"
            )
        if self.tis_cap < 1.0:
            raise ValueError(f"tis_cap must be >= 1, got {self.tis_cap}")
        if self.log_ratio_clamp <= 0:
            raise ValueError(f"log_ratio_clamp must be > 0, got {self.log_ratio_clamp}")


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


def _correction_none(inputs: PolicyLossInputs, cfg: PolicyLossConfig) -> tuple[Tensor, Tensor]:
    return inputs.behaviour_logprobs.detach(), torch.ones_like(inputs.old_logprobs)


def _correction_decoupled(inputs: PolicyLossInputs, cfg: PolicyLossConfig) -> tuple[Tensor, Tensor]:
    weight = _log_ratio_exp(inputs.old_logprobs - inputs.behaviour_logprobs, cfg.log_ratio_clamp)
    return inputs.old_logprobs.detach(), weight.detach()


def _correction_tis(inputs: PolicyLossInputs, cfg: PolicyLossConfig) -> tuple[Tensor, Tensor]:
    weight = _log_ratio_exp(inputs.old_logprobs - inputs.behaviour_logprobs, cfg.log_ratio_clamp)
    return inputs.old_logprobs.detach(), weight.clamp(max=cfg.tis_cap).detach()


OFF_POLICY_CORRECTIONS: dict[str, Callable[[PolicyLossInputs, PolicyLossConfig], tuple[Tensor, Tensor]]] = {
    "none": _correction_none,
    "decoupled": _correction_decoupled,
    "tis": _correction_tis,
}
"""Correction name -> fn(inputs, cfg) -> (anchor_logprobs[B,T], is_weight[B,T], detached)."""


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
    """Clipped PPO surrogate with asymmetric and dual clipping, times an
    off-policy importance weight.

    Per token, with r = exp(clamp(logprobs - anchor)), A the advantage and w
    the detached weight from the correction:

        L1 = -A * r
        L2 = -A * clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high)
        L  = max(L1, L2)                          if A >= 0
        L  = min(max(L1, L2), -A * clip_ratio_c)  if A <  0   (dual clip)
        loss = agg_loss(w * L, mask, cfg.loss_agg_mode)

    Returns:
        (loss scalar, metrics) with metrics
            pg_loss             the loss value
            pg_clipfrac         masked fraction with L2 > L1 (the clip is active)
            pg_clipfrac_lower   masked fraction where the dual clip is active
            ppo_kl              masked mean of old_logprobs - logprobs (approx KL to the proximal policy)
            is_weight_mean      masked mean of w
            is_weight_max       max of w over masked tokens (0 if none)
            is_weight_truncfrac masked fraction of tokens whose weight was truncated (tis)
    """
    mask = inputs.mask.to(inputs.logprobs.dtype)
    inputs = _zero_outside_mask(inputs)
    anchor, weight = OFF_POLICY_CORRECTIONS[cfg.off_policy_correction](inputs, cfg)
    adv = inputs.advantages.to(inputs.logprobs.dtype)

    ratio = _log_ratio_exp(inputs.logprobs - anchor, cfg.log_ratio_clamp)
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    clipped = torch.maximum(loss1, loss2)
    loss3 = -adv * cfg.clip_ratio_c
    per_token = torch.where(adv < 0, torch.minimum(clipped, loss3), clipped)
    loss = agg_loss(weight * per_token, mask, cfg.loss_agg_mode, cfg.norm_horizon)

    with torch.no_grad():
        raw_weight = _log_ratio_exp(inputs.old_logprobs - inputs.behaviour_logprobs, cfg.log_ratio_clamp)
        masked_weight = torch.where(mask > 0, weight, torch.zeros_like(weight))
        metrics = {
            "pg_loss": loss.item(),
            "pg_clipfrac": masked_mean((loss2 > loss1).to(mask.dtype), mask).item(),
            "pg_clipfrac_lower": masked_mean(((clipped > loss3) & (adv < 0)).to(mask.dtype), mask).item(),
            "ppo_kl": masked_mean(inputs.old_logprobs - inputs.logprobs, mask).item(),
            "is_weight_mean": masked_mean(weight, mask).item(),
            "is_weight_max": masked_weight.max().item() if masked_weight.numel() else 0.0,
            "is_weight_truncfrac": masked_mean((raw_weight > cfg.tis_cap).to(mask.dtype), mask).item()
            if cfg.off_policy_correction == "tis"
            else 0.0,
        }
    return loss, metrics


# --------------------------------------------------------------------------
# value loss


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
    norm_horizon: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss (as verl / TRL).

        v_clip = old_values + clip(values - old_values, -cliprange_value, cliprange_value)
        loss   = 0.5 * agg_loss(max((values - R)^2, (v_clip - R)^2), mask, loss_agg_mode)

    Args:
        values: [B,T] current critic predictions (requires grad).
        old_values: [B,T] critic predictions at rollout time (no grad).
        returns: [B,T] regression targets.
        mask: [B,T] 0/1.
        cliprange_value: half-width of the clip around old_values.
        loss_agg_mode: see `agg_loss`.
        norm_horizon: see `agg_loss`.

    Returns:
        (loss scalar, metrics) with vf_loss, vf_clipfrac (masked fraction where
        the clipped error is the larger), vpred_mean.
    """
    mask_f = mask.to(values.dtype)
    valid = mask > 0
    values = torch.where(valid, values, 0.0)
    old_values = torch.where(valid, old_values, 0.0)
    returns = torch.where(valid, returns, 0.0)
    v_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    err1 = (values - returns) ** 2
    err2 = (v_clipped - returns) ** 2
    loss = 0.5 * agg_loss(torch.maximum(err1, err2), mask_f, loss_agg_mode, norm_horizon)
    with torch.no_grad():
        metrics = {
            "vf_loss": loss.item(),
            "vf_clipfrac": masked_mean((err2 > err1).to(mask_f.dtype), mask_f).item(),
            "vpred_mean": masked_mean(values, mask_f).item(),
        }
    return loss, metrics
