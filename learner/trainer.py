"""The learner process: FSDP2 policy training on trajectories streamed by actors.

Recipe interface (setup / train / cleanup). Every rank holds an FSDP2 shard of
the policy; rank 0 also owns the sockets (``LearnerServer`` + ``Coordinator``).
Per step:

1. rank 0 waits for ``train_batch_size`` complete, fresh prompt groups and
   broadcasts them to every rank as msgpack bytes (``dist.broadcast`` of a
   uint8 tensor; no pickle);
2. every rank computes advantages on the whole batch (they are cheap and
   group statistics need every group), then trains on its shard: PPO epochs
   over mini-batches, gradient accumulation over micro-batches. The policy,
   entropy and KL terms form one per-token loss; each micro-batch reduces it
   to its weighted token sum times the mini-batch's ``loss_scale``
   (``learner.sharding``), so the gradient is that of the chosen aggregation
   over the whole mini-batch of every rank;
3. the full weights are gathered to rank 0, published as version ``v + 1``,
   and actors pull them before their next episodes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import msgspec
import torch
import torch.distributed as dist

from configs.schema import RelayConfig
from learner import algos
from learner.batch import TrainBatch, TrajectoryMismatch, check_alignment, collate, over_chains
from learner.checkpoint import Checkpointer, trainable_parts
from learner.coordinator import Coordinator, DataStream
from learner.critic import build_critic
from learner.lora import LoraSettings, publish_view
from learner.metrics import MetricsLogger, check_same_version_logprobs, reward_metrics
from learner.model import PIECES_PER_BUCKET, drain, export_hf, load_policy, stream_full_tensors
from learner.optim import build_optimizer, lr_lambda, optimizer_offload  # noqa: F401  (lr_lambda re-exported)
from learner.reference import ResponseLogits, build_kl_terms, next_token_logits
from learner.replay import BatchDump, NoBatchDump
from learner.sharding import gather_rows, map_chunks, micro_batching, plan_minibatches, shard_rows
from learner.validation import Validator
from protocol import messages as m
from protocol.transport import LearnerServer, message_size_limit
from protocol.weights import make_publisher, serve_dtype

log = logging.getLogger(__name__)


@dataclass
class StepBatch:
    trajectories: list[m.Trajectory]
    sample_ids: list[str]
    batch: TrainBatch


@dataclass
class StepTensors:
    """Per-row tensors of one rank's shard, fixed before the policy update ([n_r, L-1])."""

    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None
    """Proximal log-probs recomputed before the update; None = a single update, where they
    equal the current log-probs (detached)."""
    ref_logprobs: torch.Tensor | None
    """Reference log-probs, when a KL term reads them."""
    policy_mask: torch.Tensor
    """The loss mask without the episodes the loss filters dropped (``algorithm.loss_filters``)."""

    def select(self, idx: torch.Tensor) -> "StepTensors":
        return StepTensors(*(None if t is None else t[idx] for t in (
            self.advantages, self.old_logprobs, self.ref_logprobs, self.policy_mask)))


class Trainer:
    def __init__(self, cfg: RelayConfig, rows: list[dict]):
        self.cfg = cfg
        self.rows = rows
        self.run_dir = Path(cfg.trainer.default_local_dir)

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        backend = "nccl" if torch.cuda.is_available() and cfg.trainer.device != "cpu" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.transport.recv_timeout_s + 300))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        torch.manual_seed(cfg.trainer.seed + self.rank)
        arc = cfg.actor_rollout_ref
        lora = LoraSettings(arc.model.lora_rank, arc.model.lora_alpha, arc.model.target_modules)
        self.model = load_policy(
            arc.model.path,
            self.device,
            gradient_checkpointing=arc.model.enable_gradient_checkpointing,
            param_offload=arc.actor.fsdp_config.param_offload,
            lora=lora,
            mixed_precision=arc.actor.fsdp_config.mixed_precision,
        )
        # actors get the stream in their serve dtype; checkpoints and the final export in fp32
        # (the HF engine applies LoRA adapters itself: it gets only them)
        self.weights_for_actors = publish_view(
            lora, serve_dtype(arc.rollout.dtype, cuda=self.device.type == "cuda"), adapters_only=arc.rollout.name == "hf"
        )
        if self.rank == 0:
            log.info("actors receive %s", self.weights_for_actors.what)
        self.weights_for_export = publish_view(lora, torch.float32)
        self.pad_id = self.model.config.pad_token_id or 0
        self.total_steps = self._total_steps()
        self.optimizer, self.scheduler = build_optimizer(self.model.parameters(), arc.actor.optim, self.total_steps)
        fsdp = arc.actor.fsdp_config
        self.optimizer_offload = optimizer_offload(self.optimizer, self.device, fsdp.optimizer_offload, fsdp.param_offload)
        self.critic = build_critic(cfg, self.device, self.rank, self.world, self.total_steps)
        self.reference, self.kl_loss, self.kl_in_reward = build_kl_terms(cfg, self.device, self.world)
        alg = cfg.algorithm
        self.reward_shaping = (
            algos.OverlongShaping(arc.rollout.response_length, alg.overlong_buffer_len, alg.overlong_penalty_factor)
            if alg.overlong_buffer_len
            else algos.NoShaping()
        )
        self.adv_fn = algos.get_advantage_estimator(cfg.algorithm.adv_estimator)
        self.adv_cfg = algos.AdvantageConfig(
            gamma=cfg.algorithm.gamma, lam=cfg.algorithm.lam, norm_adv_by_std_in_grpo=cfg.algorithm.norm_adv_by_std_in_grpo
        )
        self.loss_cfg = algos.PolicyLossConfig(
            loss_mode=arc.actor.loss_mode,
            clip_ratio_low=arc.actor.clip_ratio_low,
            clip_ratio_high=arc.actor.clip_ratio_high,
            clip_ratio_c=arc.actor.clip_ratio_c,
            clip_cov_ratio=arc.actor.clip_cov_ratio,
            clip_cov_lb=arc.actor.clip_cov_lb,
            clip_cov_ub=arc.actor.clip_cov_ub,
            kl_cov_ratio=arc.actor.kl_cov_ratio,
            kl_cov_coef=arc.actor.kl_cov_coef,
            loss_agg_mode=arc.actor.loss_agg_mode,
            norm_horizon=arc.actor.loss_agg_horizon,
            off_policy_correction=cfg.algorithm.off_policy_correction,
            tis_cap=cfg.algorithm.tis_cap,
            behav_imp_weight_cap=cfg.algorithm.behav_imp_weight_cap,
            seq_mis_cap=cfg.algorithm.seq_mis_cap,
            geo_mis_bound=cfg.algorithm.geo_mis_bound,
            icepop_beta=cfg.algorithm.icepop_beta,
            log_ratio_clamp=cfg.algorithm.log_ratio_clamp,
        )
        self.checkpoints = Checkpointer(cfg, self.run_dir, self.rank, self.world)
        self.version = self.checkpoints.restore(trainable_parts(self.model, self.optimizer, self.scheduler, self.critic))
        self.kl_in_reward.load_state_dict(self.checkpoints.extra.get("kl_in_reward", {}))
        self.metrics = MetricsLogger(self.run_dir, cfg, enabled=self.rank == 0)
        if self.rank == 0:
            self.coordinator = Coordinator(
                DataStream(self.rows, cfg.data.shuffle, cfg.data.seed),
                batch_groups=cfg.data.train_batch_size,
                group_size=cfg.agent.num_chains,
                max_staleness=cfg.algorithm.max_staleness,
                peer_timeout_s=cfg.transport.peer_timeout_s,
                greedy_baseline=algos.needs_greedy_baseline(cfg.algorithm.adv_estimator),
                min_actors=cfg.transport.min_actors,
                vocab_size=self.model.get_input_embeddings().num_embeddings,
                status_path=self.run_dir / "status.json",
                filter_groups=cfg.algorithm.filter_groups,
            )
            self.checkpoints.restore_coordinator(self.coordinator)  # before any actor can be granted work
            self.server = LearnerServer(
                self.coordinator, cfg.transport.bind_host, cfg.transport.port, cfg.transport.trajectory_hwm, ready=False,
                max_message_bytes=message_size_limit(getattr(self.model.config, "max_position_embeddings", 32768)),
            )
            self.weights = make_publisher(
                cfg.transport.weights, server=self.server, bucket_bytes=cfg.transport.weights_bucket_mb << 20,
                weights_dir=cfg.transport.weights_dir, host=cfg.transport.host,
                n_actors=cfg.actor_rollout_ref.rollout.num_actors, backend=backend, timeout_s=cfg.transport.recv_timeout_s,
                window=cfg.transport.weights_window, subscribe_s=cfg.transport.weights_subscribe_s,
                stall_s=cfg.transport.peer_timeout_s,
            )
            self.server.write_endpoint(self.run_dir / "learner.json", cfg.transport.host)  # where local actors find us
            self.coordinator.notify = self.server.wake  # actors long-polling for work hear of a new version at once
            self.server.mark_ready()  # registrations before this would miss the weights group in their Welcome
            self.ledger = open(self.run_dir / "ledger.jsonl", "a")
            self.validator = Validator(cfg, self.coordinator, alive=self.server.check)
        self.batch_dump = BatchDump(self.run_dir / "batches") if cfg.trainer.dump_batches and self.rank == 0 else NoBatchDump()
        self.publish(hold=True)

    def _total_steps(self) -> int:
        t = self.cfg.trainer
        per_epoch = max(1, len(self.rows) // self.cfg.data.train_batch_size)
        by_epochs = per_epoch * t.total_epochs
        return min(t.total_training_steps, by_epochs) if t.total_training_steps else by_epochs

    # ------------------------------------------------------------------ loop

    def train(self) -> None:
        if self.rank == 0 and (val := self.validator.before_train(self.version)):
            self.metrics.log(self.version, self.version, val, total=self.total_steps)
        for step in range(self.version, self.total_steps):
            t0 = time.perf_counter()
            sb, wait_info = self.next_batch()
            t1 = time.perf_counter()
            stats = self.train_step(sb.batch)
            stats |= self.check_engines(sb)  # every rank: all stop together
            t2 = time.perf_counter()
            self.version += 1
            self.publish()
            t3 = time.perf_counter()
            if self.rank == 0:
                self.ledger.write(json.dumps({"step": step, "version": self.version, "samples": sb.sample_ids}) + "\n")
                self.ledger.flush()
                stats.update(wait_info)
                stats.update(self.server.counters())
                episodes = [t for t in sb.trajectories if t.segment == t.num_segments - 1]  # a split chain counts once
                stats.update(reward_metrics(episodes, sb.batch))
                stats["episode/split_rate"] = sum(t.num_segments > 1 for t in episodes) / len(episodes)  # rewritten histories
                stats.update(
                    {
                        "time/wait_s": t1 - t0,
                        "time/train_s": t2 - t1,
                        "time/publish_s": t3 - t2,
                        "time/step_s": t3 - t0,
                        "perf/train_tokens_per_s": float(sb.batch.attention_mask.sum()) / max(t2 - t1, 1e-9),
                        "actor/lr": self.scheduler.get_last_lr()[0],
                    }
                )
                stats.update(self.validator.after_step(self.version, self.total_steps))
                self.metrics.log(step + 1, self.version, stats, total=self.total_steps)
            if self.checkpoints.due(self.version, self.total_steps):
                self.save_checkpoint()

    def save_checkpoint(self) -> None:
        """Checkpoint ``global_step_<version>`` (a collective: every rank calls it)."""
        parts = trainable_parts(self.model, self.optimizer, self.scheduler, self.critic)
        self.checkpoints.save(
            self.version, parts, self.export_policy, self.coordinator if self.rank == 0 else None,
            extra={"kl_in_reward": self.kl_in_reward.state_dict()},
        )

    def next_batch(self) -> tuple[StepBatch, dict]:
        """Rank 0 collects a batch from the actors and broadcasts it to every rank."""
        while True:
            payload, info = self._collect_batch() if self.rank == 0 else (b"", {})
            payload = broadcast_bytes(payload, self.device)
            if payload != REPUBLISH:
                break
            # an actor missed the streamed version (it asked after its first bucket was released)
            # and the learner is idle: send the version again, every rank gathering
            log.info("re-publishing v%d for actors that asked after its stream had passed", self.version)
            self.publish()
        self.batch_dump.write(self.version + 1, payload)
        sb = self.step_batch([m.decode(b) for b in msgspec.msgpack.decode(payload)])
        info["staleness"] = [self.version - t.min_version for t in sb.trajectories]
        return sb, info

    def _collect_batch(self) -> tuple[bytes, dict]:
        """Rank 0: wait for the next batch and return it encoded with its wait metrics, or
        ``REPUBLISH`` if an actor needs the current version sent again first."""
        trajs: list[m.Trajectory] = []
        refused = {"groups_refused": 0, "trajectories_refused": 0}
        info: dict = {}
        while not trajs:  # a batch whose every group was refused: take the next one
            got = self.coordinator.take_batch(
                self.cfg.transport.recv_timeout_s, alive=self.server.check, interrupt=self.server.weights_wanted
            )
            if got is None:
                return REPUBLISH, {}
            groups, info = got
            trajs, n_groups, n_trajs = whole_groups(groups)
            refused["groups_refused"] += n_groups
            refused["trajectories_refused"] += n_trajs
        return msgspec.msgpack.encode([m.encode(t) for t in trajs]), info | refused

    def step_batch(self, trajs: list[m.Trajectory]) -> StepBatch:
        """The trainable batch of the broadcast trajectories. Greedy rollouts (ReMax) are not
        trained on: their score (outcome plus per-turn rewards, what the estimator scores the
        sampled rows by) becomes the baseline of their prompt's rows."""
        baselines: dict[str, float] = {}
        for t in trajs:  # a greedy chain split into segments: the outcome once, each segment's turn rewards
            if t.greedy:
                baselines[t.sample_id] = baselines.get(t.sample_id, t.reward) + sum(t.turn_rewards)
        trajs = [t for t in trajs if not t.greedy]
        sample_ids = sorted({t.sample_id for t in trajs})
        group_of = {sid: i for i, sid in enumerate(sample_ids)}
        return StepBatch(trajs, sample_ids, collate(trajs, group_of, self.pad_id, baselines))

    # ------------------------------------------------------------------ the algorithm

    def train_step(self, batch: TrainBatch) -> dict:
        """One learner step on ``batch`` (every rank passes the same batch).

        1. Before any update, on this rank's rows (no grad): proximal log-probs
           (when several updates follow or KL is in the reward), reference
           log-probs (KL terms) and critic values (gae).
        2. On the whole batch: the loss filters' keep mask, shaped (overlong) and KL-penalised
           rewards, then advantages and returns (over every episode: a filtered one still counts
           for its group's statistics, it only leaves the policy loss).
        3. On this rank's rows: the critic update, then (after ``critic_warmup``
           steps) the policy update.
        """
        actor = self.cfg.actor_rollout_ref.actor
        n = len(batch)
        mine = shard_rows(n, self.rank, self.world)
        self._same_version_rows = None
        full, shard = batch.to(self.device), batch.select(mine).to(self.device)
        keep, stats = algos.loss_keep(
            algos.EpisodeFacts(full.overlong, full.rewards, full.group_index), self.cfg.algorithm.loss_filters
        )
        policy_mask = full.loss_mask * keep.unsqueeze(-1).to(full.loss_mask.dtype)
        # a chain split into several sequences has several rows: mini-batches count episodes, not rows
        plan = self.policy_plan(policy_mask, batch.attention_mask.sum(-1), episodes=len(torch.unique(batch.chain_index)))
        single_update = actor.ppo_epochs == 1 and len(plan) == 1 and not self.cfg.algorithm.use_kl_in_reward

        old_logprobs = None if single_update else self.logprobs(shard, n)
        ref_logprobs = self.reference.logprobs(shard, n)
        values = self.critic.values(shard, n)

        token_rewards, shaping_stats = self.reward_shaping(full.token_rewards, full.loss_mask, full.response_lengths)
        token_rewards, kl_stats = self.kl_in_reward(
            token_rewards, gather_rows(old_logprobs, n), gather_rows(ref_logprobs, n), full.loss_mask
        )
        stats |= shaping_stats | kl_stats
        adv, returns = over_chains(  # a chain split into several sequences is one episode here
            self.adv_fn,
            algos.AdvantageInputs(
                token_rewards, full.loss_mask, full.group_index,
                values=gather_rows(values, n), baseline_rewards=full.baseline_rewards,
            ),
            self.adv_cfg, full.chain_index, full.segment_index,
        )

        stats |= self.critic.update(full.loss_mask, shard, values, returns[mine])
        if self.version >= self.cfg.trainer.critic_warmup:
            stats |= self.update_policy(plan, shard, StepTensors(adv[mine], old_logprobs, ref_logprobs, policy_mask[mine]))
        out = all_reduce_means(stats, self.device)
        weight = out.pop("actor/token_frac_weight", 0.0)
        for k in TOKEN_FRACTIONS:  # exact fractions of the step's sampled tokens, every rank's
            weighted = out.pop(f"actor/{k}_weighted", None)
            if weighted is not None and weight > 0:
                out[f"actor/{k}"] = weighted / weight
        self.same_version_rows = gather_rows(self._same_version_rows, n)  # [n, 2] for the log-prob guard
        if out.get("actor/same_version_tokens", 0) > 0:
            out["actor/logprob_abs_diff_same_version"] = out["actor/same_version_abs_diff_sum"] / out["actor/same_version_tokens"]
        return out

    def update_policy(self, plan, shard: TrainBatch, t: StepTensors) -> dict[str, list[float]]:
        """PPO epochs over mini-batches (one optimizer step each) of weighted micro-batches."""
        actor = self.cfg.actor_rollout_ref.actor
        stats: dict[str, list[float]] = {}
        self._same_version_rows = torch.zeros(len(shard), 2, device=self.device)
        self.optimizer_offload.load()
        for _ in range(actor.ppo_epochs):
            for mini in plan:
                self.optimizer.zero_grad(set_to_none=True)
                for micro in mini:
                    mb, mt = micro.take(shard), micro.take(t)  # its rows, cut to the longest of them
                    logits = self.forward(mb)  # at the sampled positions only
                    logprobs = logits.logprobs()
                    old = logprobs.detach() if mt.old_logprobs is None else mt.old_logprobs
                    mask = mt.policy_mask
                    per_token, metrics = algos.policy_loss(
                        algos.PolicyLossInputs(logprobs, old, mb.behaviour_logprobs, mt.advantages, mask), self.loss_cfg
                    )
                    if actor.entropy_coeff:
                        entropy = logits.entropy()
                        per_token = per_token - actor.entropy_coeff * entropy
                        metrics["actor/entropy"] = self.local_agg(entropy.detach(), mask)
                    per_token = per_token + self.kl_loss(mb, logits, logprobs, mt.ref_logprobs, metrics)
                    algos.agg_loss(per_token, mask, actor.loss_agg_mode, scale=micro.loss_scale).backward()
                    # metrics stay 0-d tensors here (no host sync per micro-batch): read once per step below
                    # pg + entropy + KL terms over this micro-batch ("pg_loss" is the policy term alone)
                    metrics["actor/loss"] = self.local_agg(per_token.detach(), mask)
                    metrics["actor/logprob_mismatch_kl"] = algos.logprob_mismatch_kl(old, mb.behaviour_logprobs, mb.loss_mask)
                    # tokens sampled by exactly the weights the learner holds: |learner - engine| is numerics alone
                    same = mb.loss_mask * (mb.versions == self.version)
                    diff = ((old - mb.behaviour_logprobs).abs() * same).detach()
                    metrics["actor/same_version_abs_diff_sum"] = diff.sum()
                    metrics["actor/same_version_tokens"] = same.sum()
                    self._same_version_rows[micro.idx] = torch.stack([diff.sum(1), same.sum(1)], 1).to(self._same_version_rows.dtype)
                    for k, v in metrics.items():
                        stats.setdefault(k if "/" in k else f"actor/{k}", []).append(v)
                    # token fractions are re-weighted by the micro-batch's tokens (a padding pass has none)
                    tokens = mask.sum() if micro.loss_scale > 0 else mask.new_zeros(())
                    stats.setdefault("actor/token_frac_weight", []).append(tokens)
                    for k in TOKEN_FRACTIONS:
                        stats.setdefault(f"actor/{k}_weighted", []).append(metrics[k] * tokens)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), actor.grad_clip)
                self.optimizer.step()
                stats.setdefault("actor/grad_norm", []).append(grad_norm)
        stats = on_host(stats)  # the step's one host sync for the policy's metrics
        if not all(math.isfinite(g) for g in stats.get("actor/grad_norm", [])):
            # checked once per step: the process stops before these weights are published or saved
            raise FloatingPointError(f"non-finite gradient norm at v{self.version}: {stats['actor/grad_norm']}")
        self.optimizer_offload.offload()
        self.scheduler.step()  # the policy's schedule counts policy updates (as verl: not critic warm-up steps)
        return stats

    def check_engines(self, sb: StepBatch) -> dict:
        """The log-prob guard (``learner.metrics.check_same_version_logprobs``) on the last step."""
        return check_same_version_logprobs(
            [t.actor_id for t in sb.trajectories], self.same_version_rows, self.version,
            self.cfg.actor_rollout_ref.rollout.max_logprob_diff,
        )

    # ------------------------------------------------------------------ plumbing

    def policy_plan(self, batch_mask: torch.Tensor, lengths: torch.Tensor, episodes: int | None = None):
        """This rank's policy mini/micro-batches and their loss scales (``learner.sharding.plan_minibatches``);
        ``lengths``: [N] real tokens of each row of the batch (host); ``episodes``: the batch's chains
        when fewer than its N rows (some episodes came split), so a mini-batch holds
        ``ppo_mini_batch_size`` groups' worth of rows either way."""
        actor = self.cfg.actor_rollout_ref.actor
        rows = actor.ppo_mini_batch_size * self.cfg.agent.num_chains
        if episodes:  # the same share of the batch's rows as of its episodes (rounded up)
            rows = -(-rows * batch_mask.shape[0] // episodes)
        rows_per_mini = max(1, rows // self.world)
        micro = micro_batching(actor.ppo_micro_batch_size_per_gpu, actor.use_dynamic_bsz, actor.ppo_max_token_len_per_gpu)
        return plan_minibatches(
            batch_mask, self.rank, self.world, rows_per_mini, micro, actor.loss_agg_mode, actor.loss_agg_horizon, lengths,
        )

    def local_agg(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A per-token value aggregated over one micro-batch's rows (for metrics; a 0-d tensor)."""
        actor = self.cfg.actor_rollout_ref.actor
        return algos.agg_loss(per_token, mask, actor.loss_agg_mode, actor.loss_agg_horizon)

    def forward(self, mb: TrainBatch) -> ResponseLogits:
        """Logits predicting the next token at the micro-batch's sampled positions."""
        arc = self.cfg.actor_rollout_ref
        return next_token_logits(
            self.model, mb, arc.rollout.temperature, packed=arc.model.use_remove_padding, share_prefix=arc.model.share_prefix
        )

    @torch.no_grad()
    def logprobs(self, shard: TrainBatch, n: int) -> torch.Tensor:
        """Proximal-policy log-probs [n_r, L-1] of the shard before this step's updates."""
        rollout = self.cfg.actor_rollout_ref.rollout
        size = micro_batching(
            rollout.log_prob_micro_batch_size_per_gpu, rollout.log_prob_use_dynamic_bsz, rollout.log_prob_max_token_len_per_gpu
        )
        return map_chunks(
            lambda mb: self.forward(mb).logprobs(), shard, n, self.world, size
        )

    def publish(self, hold: bool = False) -> None:
        """Stream the policy to the actors as ``self.version`` (a collective; version 0 is on disk).
        ``hold``: keep the whole version for actors that are not there yet (a resumed run's first
        publish, before any actor registered, and before validation may wait for them)."""
        view = self.weights_for_actors
        # a large entry (the embedding) is gathered in row pieces: rank 0 never holds it whole
        piece = (self.cfg.transport.weights_bucket_mb << 20) // PIECES_PER_BUCKET
        named = view(stream_full_tensors(self.model, view.gather_dtype, view.keep, piece)) if self.version > 0 else iter(())
        if self.rank == 0:
            # announced when actors may ask: zmq as the stream opens (each bucket is sent while the
            # next is gathered), the other transports once the version is complete
            self.weights.publish(self.version, named, announce=lambda: self.coordinator.advance(self.version), hold=hold)
        else:
            drain(named)

    def export_policy(self, out_dir) -> None:
        """Write the policy as a plain HF directory, fp32 (a collective; rank 0 writes)."""
        view = self.weights_for_export
        named = view(stream_full_tensors(self.model, view.gather_dtype))
        if self.rank == 0:
            export_hf(named, self.cfg.actor_rollout_ref.model.path, str(out_dir))
        else:
            drain(named)

    def cleanup(self) -> None:
        self.export_policy(self.run_dir / "final")
        if self.rank == 0:
            self.coordinator.finish()
            (self.run_dir / "actors.json").write_text(json.dumps(self.coordinator.actors_summary(), indent=2))
            log.info("final policy v%d exported to %s", self.version, self.run_dir / "final")
            # let actors hear 'stop' on their next request before the sockets close
            deadline = time.monotonic() + 3 * self.cfg.transport.heartbeat_interval_s + 5
            while time.monotonic() < deadline and not self.coordinator.all_stopped():
                time.sleep(0.1)
            self.weights.close()
            self.server.close()
            self.ledger.close()
            self.metrics.close()
        dist.barrier()
        dist.destroy_process_group()


TOKEN_FRACTIONS = ("pg_clipfrac", "pg_clipfrac_lower", "is_weight_truncfrac", "is_masked_frac")
"""Policy-loss metrics that are fractions of a micro-batch's tokens: the step reports them over
all its tokens, not as a mean of per-micro-batch fractions."""


def whole_groups(groups) -> tuple[list[m.Trajectory], int, int]:
    """The trajectories of the groups whose every chain (greedy ReMax rollout included) passes
    ``check_alignment``: a group is trained whole or not at all, so a refused chain never leaves a
    shrunken group (a group of one would train on its raw score) or a row without its baseline.

    Returns (trajectories, groups refused, trajectories refused). The coordinator has already
    counted a refused group as consumed; it is not requeued (that needs the coordinator)."""
    kept: list[m.Trajectory] = []
    n_groups = n_trajs = 0
    for sample_id, group in groups:
        bad = []
        for t in group:
            try:
                check_alignment(t)
            except TrajectoryMismatch as e:
                bad.append(e)
        if bad:
            for e in bad:
                log.error("refused: %s", e)
            log.error("group %s dropped whole: %d of its %d trajectories refused", sample_id, len(bad), len(group))
            n_groups, n_trajs = n_groups + 1, n_trajs + len(bad)
            continue
        kept += group
    return kept, n_groups, n_trajs


def on_host(stats: dict[str, list]) -> dict[str, list[float]]:
    """``stats`` with every tensor value read as a Python float, in one device-to-host copy."""
    from torch.distributed.tensor import DTensor

    tensors = [v.full_tensor() if isinstance(v, DTensor) else v for vs in stats.values() for v in vs if isinstance(v, torch.Tensor)]
    values = iter(torch.stack([t.detach().reshape(()).double() for t in tensors]).tolist() if tensors else [])
    return {k: [next(values) if isinstance(v, torch.Tensor) else float(v) for v in vs] for k, vs in stats.items()}


REPUBLISH = b"relay:republish"
"""What rank 0 broadcasts instead of a batch when every rank must publish the current version again
(never a msgpack-encoded batch, which starts with an array header)."""


def broadcast_bytes(payload: bytes, device: torch.device) -> bytes:
    """Broadcast rank 0's ``payload`` to every rank (length first, then bytes)."""
    n = torch.tensor([len(payload)], dtype=torch.long, device=device)
    dist.broadcast(n, 0)
    buf = torch.empty(int(n.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buf, 0)
    return payload if dist.get_rank() == 0 else buf.cpu().numpy().tobytes()


def all_reduce_means(stats: dict[str, list[float]], device: torch.device) -> dict[str, float]:
    """Mean of each metric over its values on every rank (same keys on all ranks)."""
    keys = sorted(stats)
    local = torch.tensor([[sum(stats[k]), len(stats[k])] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(local)
    return {k: float(s / max(c, 1)) for k, (s, c) in zip(keys, local.tolist())}
