"""The value model for ``algorithm.adv_estimator=gae``.

A Hugging Face token-classification head with one label on the policy's
backbone (``AutoModelForTokenClassification(num_labels=1)``, its ``score``
head freshly initialised from ``trainer.seed``, classifier dropout off),
FSDP2-sharded like the policy, with its own AdamW and schedule
(``critic.optim``).

Shapes follow ``learner.batch``: ``values[:, t]`` is V at the state that
predicts ``input_ids[:, t + 1]`` (the head's output at position ``t``), so
values line up with ``loss_mask``, rewards and advantages ([N, L-1]).

Per learner step the trainer calls ``values`` (no grad, before any update:
these feed ``AdvantageInputs.values`` and are the clip anchor), then
``update`` with the GAE returns: ``critic.ppo_epochs`` passes of mini-batches
of ``critic.ppo_mini_batch_size`` prompts, micro-batches of
``critic.ppo_micro_batch_size_per_gpu`` rows, clipped value loss
(``algos.value_loss`` with ``critic.cliprange_value``, token-mean).

Estimators without a critic get ``NoCritic``: no values, no update.
"""

from __future__ import annotations

import torch

from configs.schema import RelayConfig
from learner import algos
from learner.batch import TrainBatch
from learner.model import fsdp_shard
from learner.optim import build_optimizer, optimizer_offload
from learner.sharding import map_chunks, plan_minibatches


class NoCritic:
    """Critic-free estimators: nothing to compute or train."""

    def values(self, shard: TrainBatch, n: int) -> None:
        return None

    def update(self, batch_mask: torch.Tensor, shard: TrainBatch, old_values, returns) -> dict[str, list[float]]:
        return {}


class Critic:
    def __init__(self, model, cfg: RelayConfig, device: torch.device, rank: int, world: int, total_steps: int):
        c = cfg.critic
        self.model = model
        self.optimizer, self.scheduler = build_optimizer(model.parameters(), c.optim, total_steps)
        fsdp = c.model.fsdp_config
        self.optimizer_offload = optimizer_offload(self.optimizer, device, fsdp.optimizer_offload, fsdp.param_offload)
        self.rank, self.world = rank, world
        self.rows_per_mini = max(1, c.ppo_mini_batch_size * cfg.agent.num_chains // world)
        self.micro = c.ppo_micro_batch_size_per_gpu
        self.epochs = c.ppo_epochs
        self.cliprange = c.cliprange_value
        self.grad_clip = cfg.actor_rollout_ref.actor.grad_clip

    def forward(self, mb: TrainBatch) -> torch.Tensor:
        """[n, L-1] float32 values of the states predicting each next token."""
        pos = (mb.attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=pos)
        return out.logits[:, :-1, 0].float()

    @torch.no_grad()
    def values(self, shard: TrainBatch, n: int) -> torch.Tensor:
        """Values of this rank's shard ([n_r, L-1]) before the update; ``n`` rows in the whole batch."""
        return map_chunks(self.forward, shard, n, self.world, self.micro)

    def update(self, batch_mask: torch.Tensor, shard: TrainBatch, old_values: torch.Tensor, returns: torch.Tensor) -> dict[str, list[float]]:
        """Regress values on ``returns`` ([n_r, L-1], this shard); ``batch_mask`` is the whole batch's loss mask."""
        stats: dict[str, list[float]] = {}
        plan = plan_minibatches(batch_mask, self.rank, self.world, self.rows_per_mini, self.micro, "token-mean")
        self.optimizer_offload.load()
        for _ in range(self.epochs):
            for mini in plan:
                self.optimizer.zero_grad(set_to_none=True)
                for micro in mini:
                    mb = shard.select(micro.idx)
                    per_token, metrics = algos.value_loss(
                        self.forward(mb), old_values[micro.idx], returns[micro.idx], mb.loss_mask, self.cliprange
                    )
                    algos.agg_loss(per_token, mb.loss_mask, "token-mean", scale=micro.loss_scale).backward()
                    for k, v in metrics.items():
                        stats.setdefault(f"critic/{k}", []).append(float(v))
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
                if not torch.isfinite(grad_norm):
                    raise FloatingPointError("non-finite critic gradient norm")
                self.optimizer.step()
                stats.setdefault("critic/grad_norm", []).append(float(grad_norm))
        self.optimizer_offload.offload()
        self.scheduler.step()
        stats["critic/lr"] = [self.scheduler.get_last_lr()[0]]
        return stats


def load_value_model(path: str, seed: int):
    """The HF model at ``path`` with a fresh one-output token head (same init on every rank)."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    config = AutoConfig.from_pretrained(path)
    config.num_labels = 1
    config.classifier_dropout = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForTokenClassification.from_pretrained(path, config=config, dtype=torch.float32)


def build_critic(cfg: RelayConfig, device: torch.device, rank: int, world: int, total_steps: int) -> Critic | NoCritic:
    """The critic if the advantage estimator needs one (decided once, here)."""
    if not algos.needs_critic(cfg.algorithm.adv_estimator):
        return NoCritic()
    arc = cfg.actor_rollout_ref
    model = fsdp_shard(
        load_value_model(cfg.critic.model.path, cfg.trainer.seed),
        device,
        gradient_checkpointing=arc.model.enable_gradient_checkpointing,
        param_offload=cfg.critic.model.fsdp_config.param_offload,
    )
    return Critic(model, cfg, device, rank, world, total_steps)
