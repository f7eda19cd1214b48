"""The frozen reference policy and the two KL terms that use it.

The reference is the initial policy (``actor_rollout_ref.model.path``, no
adapters), loaded once, frozen and FSDP2-sharded like the policy
(``ref.fsdp_config.param_offload`` honoured on GPU). It is only loaded when a
KL term is on (``actor.use_kl_loss`` or ``algorithm.use_kl_in_reward``);
otherwise ``NoReference`` answers with nothing.

KL loss (``KLLoss``), added to the per-token policy loss of every micro-batch
(which the trainer then aggregates with ``loss_agg_mode``):

    kl_loss_coef * k(logprobs, ref_logprobs)

with ``k = kl_penalty(kind)`` for the per-token estimators, or the exact
``full_kl(logits, ref_logits)`` over the vocabulary for ``kl_loss_type=full``
(the reference logits of the micro-batch are recomputed there, so no [N,T,V]
tensor is kept).

KL in reward (``KLInReward``), before advantages, on the whole batch:

    token_rewards -= beta * kl_penalty(proximal_logprobs, ref_logprobs, algorithm.kl_penalty)

with beta from the fixed or adaptive controller (``algorithm.kl_ctrl``),
updated after each batch with the batch's mean KL.

All three objects are chosen once at setup (``build_kl_terms``); the
disabled ones are do-nothing objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from configs.schema import RelayConfig
from learner import algos
from learner.batch import TrainBatch
from learner.model import fsdp_shard
from learner.packing import prefix_layout, shares_prefix
from learner.sharding import MicroBatching, map_chunks, micro_batching


@dataclass
class ResponseLogits:
    """One micro-batch's next-token logits at its sampled positions only (``loss_mask`` 1).

    Prompts are most of a row's tokens, so the LM head and the log-softmax run on
    ``K`` gathered positions, not on all ``n * (L-1)``; every per-token result is
    spread back to the batch's [n, L-1] layout with 0 at the other positions
    (which every loss, KL term and metric masks out)."""

    logits: torch.Tensor
    """[K, V] float32 logits divided by the sampling temperature."""
    targets: torch.Tensor
    """[K] the next token at each gathered position."""
    where: torch.Tensor
    """[n, L-1] bool: the gathered positions (row-major order of ``logits``)."""

    def spread(self, values: torch.Tensor) -> torch.Tensor:
        """[K] per-position values -> [n, L-1], 0 elsewhere (differentiable)."""
        return values.new_zeros(self.where.shape).masked_scatter(self.where, values)

    def logprobs(self) -> torch.Tensor:
        """[n, L-1] log-probs of the next tokens (0 off the sampled positions)."""
        return self.spread(algos.logprobs_from_logits(self.logits, self.targets))

    def entropy(self) -> torch.Tensor:
        """[n, L-1] entropies of the next-token distributions (0 off the sampled positions)."""
        return self.spread(algos.entropy_from_logits(self.logits))


def next_token_logits(
    model, mb: TrainBatch, temperature: float, where: torch.Tensor | None = None, packed: bool = False,
    share_prefix: bool = False,
) -> ResponseLogits:
    """Logits predicting the next token at ``where`` ([n, L-1] bool; default the sampled
    positions, ``mb.loss_mask > 0``).

    The decoder runs on every position; its final hidden states are gathered at
    ``where`` (a forward hook on the decoder, so the LM head still runs inside the
    model's own forward, as FSDP expects) and only those [K, H] go through the LM head.

    ``packed``: the rows' real tokens are concatenated into one row without padding,
    positions restarting at 0 for each sequence and no attention mask, from which
    transformers builds the per-sequence (block-diagonal causal) mask: a 4-D mask for
    SDPA on CPU, varlen flash-attention on GPU. Tested equal to the padded forward on
    one rank; the trainer and the reference pack when ``model.use_remove_padding``.

    ``share_prefix``: the rows of a group run their shared prefix (the prompt) once
    (``learner.packing``), where the model's attention takes the layout's mask and the layout is
    smaller than the padded batch (``prefix_layout``); it then takes the place of ``packed``.
    Tested equal to the padded forward, values and gradients."""
    where = mb.loss_mask > 0 if where is None else where
    at = torch.nn.functional.pad(where, (0, 1))  # [n, L]: the last column predicts nothing
    pos = (mb.attention_mask.cumsum(-1) - 1).clamp(min=0)
    layout = (
        prefix_layout(mb.input_ids, mb.host_lengths.tolist(), mb.host_groups.tolist(), mb.shared_prefix.tolist())
        if share_prefix and shares_prefix(model) else None
    )
    if layout is not None:
        inputs = dict(input_ids=layout.input_ids, position_ids=layout.position_ids, attention_mask=layout.attention_mask,
                      use_cache=False)
        pick = layout.source[at]  # [K]: each gathered position's token in the flattened layout (a prefix one repeats)
    elif packed:
        real = mb.attention_mask > 0
        # use_cache=False: with a KV cache transformers skips the per-sequence mask (one causal mask
        # over the packed row, sequences attending to each other; tested)
        inputs = dict(input_ids=mb.input_ids[real].unsqueeze(0), position_ids=pos[real].unsqueeze(0), attention_mask=None,
                      use_cache=False)
        pick = at[real]  # [S]: the gathered positions in the packed row (same row-major order)
    else:
        inputs = dict(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=pos, use_cache=False)
        pick = at.flatten()

    def gather(module, args, output):
        hidden = output.last_hidden_state
        output.last_hidden_state = hidden.reshape(-1, hidden.shape[-1])[pick].unsqueeze(0)  # [1, K, H]
        return output

    hook = model.get_decoder().register_forward_hook(gather)
    try:
        out = model(**inputs)
    finally:
        hook.remove()
    logits = out.logits[0].float() / (temperature if temperature > 0 else 1.0)
    return ResponseLogits(logits, mb.input_ids[:, 1:][where], where)


class NoReference:
    def logprobs(self, shard: TrainBatch, n: int) -> None:
        return None


class Reference:
    def __init__(self, model, temperature: float, micro: int | MicroBatching, world: int, precompute: bool = True,
                 packed: bool = False, share_prefix: bool = False):
        self.model = model
        self.packed = packed
        """``model.use_remove_padding``: forward passes on packed rows (``next_token_logits``)."""
        self.share_prefix = share_prefix
        """``model.share_prefix``: a group's shared prefix runs once (``next_token_logits``)."""
        self.precompute = precompute
        """Whether a KL term needs the whole shard's reference log-probs (not ``full`` KL loss alone)."""
        self.temperature = temperature
        self.micro = micro
        self.world = world

    @torch.no_grad()
    def logits(self, mb: TrainBatch, where: torch.Tensor | None = None) -> ResponseLogits:
        """Reference logits at ``where`` (default the sampled positions)."""
        return next_token_logits(self.model, mb, self.temperature, where, packed=self.packed, share_prefix=self.share_prefix)

    @torch.no_grad()
    def logprobs(self, shard: TrainBatch, n: int) -> torch.Tensor | None:
        """[n_r, L-1] reference log-probs of this rank's shard, in passes of
        ``ref.log_prob_micro_batch_size_per_gpu`` rows or of a token budget (``micro``); ``n``
        rows in the whole batch. None when no KL term reads them."""
        if not self.precompute:
            return None
        return map_chunks(
            lambda mb: self.logits(mb).logprobs(), shard, n, self.world, self.micro
        )


# ----------------------------------------------------------------- KL in the loss


KLTokens = Callable[[TrainBatch, ResponseLogits, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""(micro-batch, its response logits, logprobs [n,T], ref_logprobs [n,T] or None) -> per-token KL [n,T]."""


class NoKLLoss:
    def __call__(self, mb, logits, logprobs, ref_logprobs, metrics: dict) -> float:
        return 0.0  # added to the per-token loss


class KLLoss:
    def __init__(self, per_token: KLTokens, coef: float, agg_mode: str, horizon: int | None = None):
        self.per_token = per_token
        self.coef = coef
        self.agg_mode = agg_mode
        self.horizon = horizon

    def __call__(self, mb: TrainBatch, logits, logprobs, ref_logprobs, metrics: dict) -> torch.Tensor:
        """``coef * kl`` per token [n,T] for one micro-batch; logs ``actor/kl_loss`` (kl aggregated
        over the micro-batch with ``agg_mode``) and ``actor/kl_coef`` into ``metrics``."""
        kl = self.per_token(mb, logits, logprobs, ref_logprobs)
        metrics["actor/kl_loss"] = algos.agg_loss(kl.detach(), mb.loss_mask, self.agg_mode, self.horizon)  # 0-d
        metrics["actor/kl_coef"] = self.coef
        return self.coef * kl


def kl_tokens(kind: str, reference: Reference) -> KLTokens:
    """The per-token KL of ``kind``: an estimator on log-probs, or ``full`` on logits."""
    if kind == "full":
        return lambda mb, logits, logprobs, ref_logprobs: logits.spread(
            algos.full_kl(logits.logits, reference.logits(mb, logits.where).logits)
        )
    estimator = algos.get_kl_penalty(kind)
    return lambda mb, logits, logprobs, ref_logprobs: estimator(logprobs, ref_logprobs)


# ----------------------------------------------------------------- KL in the reward


class NoKLInReward:
    def __call__(self, token_rewards, logprobs, ref_logprobs, mask) -> tuple[torch.Tensor, dict[str, list[float]]]:
        return token_rewards, {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class KLInReward:
    def __init__(self, controller, kind: str):
        self.controller = controller
        self.kind = kind

    def __call__(self, token_rewards, logprobs, ref_logprobs, mask) -> tuple[torch.Tensor, dict[str, list[float]]]:
        """Penalised rewards [N,T] for the whole batch; the controller then sees the batch's mean KL."""
        beta = self.controller.value
        rewards, mean_kl = algos.apply_kl_in_reward(token_rewards, logprobs, ref_logprobs, mask, beta, self.kind)
        self.controller.update(mean_kl, n_steps=token_rewards.shape[0])
        return rewards, {"actor/reward_kl_penalty": [mean_kl], "actor/reward_kl_penalty_coeff": [beta]}

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "controller" in state:  # a checkpoint written without KL in the reward has none
            self.controller.load_state_dict(state["controller"])


# ----------------------------------------------------------------- setup


def build_kl_terms(cfg: RelayConfig, device: torch.device, world: int):
    """(reference, kl_loss, kl_in_reward) for this config, each a do-nothing object when off."""
    arc, alg = cfg.actor_rollout_ref, cfg.algorithm
    if not (arc.actor.use_kl_loss or alg.use_kl_in_reward):
        return NoReference(), NoKLLoss(), NoKLInReward()
    if alg.use_kl_in_reward and alg.kl_penalty == "full":
        raise ValueError("algorithm.kl_penalty=full is not supported in the reward (it needs logits of the "
                         "whole batch); use it as actor_rollout_ref.actor.kl_loss_type or pick k1/k2/k3")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(arc.model.path, dtype=torch.float32)
    model.requires_grad_(False)
    model = fsdp_shard(model, device, param_offload=arc.ref.fsdp_config.param_offload)
    model.eval()
    precompute = alg.use_kl_in_reward or (arc.actor.use_kl_loss and arc.actor.kl_loss_type != "full")
    micro = micro_batching(arc.ref.log_prob_micro_batch_size_per_gpu, arc.ref.log_prob_use_dynamic_bsz,
                           arc.ref.log_prob_max_token_len_per_gpu)
    reference = Reference(model, arc.rollout.temperature, micro, world, precompute, packed=arc.model.use_remove_padding,
                          share_prefix=arc.model.share_prefix)
    kl_loss = (
        KLLoss(kl_tokens(arc.actor.kl_loss_type, reference), arc.actor.kl_loss_coef, arc.actor.loss_agg_mode,
               arc.actor.loss_agg_horizon)
        if arc.actor.use_kl_loss
        else NoKLLoss()
    )
    k = alg.kl_ctrl
    kl_in_reward = (
        KLInReward(algos.make_kl_controller(k.type, k.kl_coef, k.target_kl, k.horizon), alg.kl_penalty)
        if alg.use_kl_in_reward
        else NoKLInReward()
    )
    return reference, kl_loss, kl_in_reward
