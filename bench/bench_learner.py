"""Learner training throughput: our ``Trainer.train_step`` vs a bare training loop.

    python bench/bench_learner.py [--rows 8] [--len 128] [--steps 6] [--prompt-frac 0.25] [--ragged]

One in-process learner (gloo, world size 1, CPU fp32 here) on a small random
Qwen2 (vocab 4096, hidden 256, 4 layers). Both sides train the *same*
model (a plain module: world size 1 on CPU is not FSDP-wrapped) with the same
AdamW on the same batch, split into the same micro-batches:

- ours: ``train_step`` (GRPO advantages, clipped PPO loss with the decoupled
  correction, micro-batch weighting, metrics, grad clip, optimizer step);
- bare: forward with logits at every position, masked token-mean
  cross-entropy, backward, grad clip, optimizer step (ours computes the LM
  head only at the sampled positions, so it can beat bare: ratio > 1).

Steps alternate (ours, bare, bare, ours, ...) after one warm-up each so load
from other processes hits both alike; the ratio is the median over adjacent
pairs of bare_time / ours_time. Prints median tokens/s of each and the ratio
(target >= 0.9). A second line does the same with 2 mini-batches per step,
where ``train_step`` must also recompute the proximal log-probs (one extra
forward, an algorithmic cost, not overhead).

A third and fourth line are the GRPO case: each group's rows share one prompt (``--group-prompt-frac``
of each row's tokens, 0.72 as in issue 14's job), ``train_step`` with ``model.share_prefix`` (the
prompt runs once per group, ``learner.packing``) and without, each against the bare loop on the
same batch.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protocol import messages as m  # noqa: E402

SMALL = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=True,
)


def build_model(out: Path) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**SMALL, pad_token_id=0, eos_token_id=1)).save_pretrained(out)
    return str(out)


def trajectories(
    rows: int, length: int, chains: int, prompt_frac: float = 0.25, ragged: bool = False, group_prompt: bool = False
) -> list[m.Trajectory]:
    """``rows`` two-turn episodes of ``length`` tokens (``prompt_frac`` of them prompt, an observation
    inside); ``ragged``: the responses of rows 1, 2, 3 (mod 4) are 1/4, 1/2, 3/4 shorter (padding);
    ``group_prompt``: the ``chains`` rows of a group share one prompt (GRPO), else every row has its own."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(rows):
        p = max(1, int(length * prompt_frac))
        if not group_prompt or i % chains == 0:  # a group's first row draws the prompt its other rows share
            prompt = rng.integers(2, SMALL["vocab_size"], p)
        r = length - p
        if ragged:
            r = max(4, r - (i % 4) * r // 4)
        obs = r // 5
        mask = [1] * ((r - obs) // 2) + [0] * obs + [1] * (r - obs - (r - obs) // 2)
        out.append(
            m.Trajectory(
                actor_id="bench", sample_id=f"0:{i // chains}", chain=i % chains,
                prompt_ids=m.pack(prompt, "int32"),
                response_ids=m.pack(rng.integers(2, SMALL["vocab_size"], r), "int32"),
                loss_mask=m.pack(mask, "uint8"),
                logprobs=m.pack([-9.0 if k else 0.0 for k in mask], "float32"),
                versions=m.pack([0 if k else -1 for k in mask], "int32"),
                reward=float(i % 2), reward_components={"reward": float(i % 2)},
                stats=m.EpisodeStats(num_turns=2, tool_calls={}),
            )
        )
    return out


def bare_step(trainer, batch) -> None:
    """forward + masked cross-entropy + backward + clip + AdamW, same micro-batches."""
    shard = batch.to(trainer.device)
    for mini in trainer.policy_plan(shard.loss_mask, batch.host_lengths):
        trainer.optimizer.zero_grad(set_to_none=True)
        for micro in mini:
            mb = shard.select(micro.idx)
            logits = trainer.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), mb.input_ids[:, 1:].reshape(-1), reduction="none"
            )
            ((nll * mb.loss_mask.reshape(-1)).sum() * micro.loss_scale).backward()  # token-mean over the mini-batch
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
        trainer.optimizer.step()


def measure(
    model_dir: str, run_dir: Path, rows: int, length: int, steps: int, minis: int, prompt_frac: float, ragged: bool = False,
    group_prompt: bool = False, share_prefix: bool = True,
) -> tuple[float, float, float]:
    from configs.loader import load_config
    from launcher.local import free_port
    from learner.trainer import Trainer

    chains = 4
    groups = rows // chains
    cfg = load_config(["demo"], [
        f"actor_rollout_ref.model.path={model_dir}", f"trainer.default_local_dir={run_dir}",
        "trainer.n_gpus_per_node=1", "trainer.logger=[jsonl]", "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=-1", "data.val_files=[/dev/null]", "trainer.total_training_steps=100",
        f"data.train_batch_size={groups}", f"agent.num_chains={chains}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={groups // minis}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        f"transport.port={free_port(pairs=2)}", f"actor_rollout_ref.model.share_prefix={str(share_prefix).lower()}",
    ])
    os.environ.setdefault("RELAY_SECRET", secrets.token_hex(32))  # the learner's sockets refuse to start without one
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    trainer = Trainer(cfg, [{"question": "q"}] * 8)
    trainer.setup()
    batch = trainer.step_batch(trajectories(rows, length, chains, prompt_frac, ragged, group_prompt)).batch
    tokens = float(batch.attention_mask.sum())
    ours, bare = [], []
    try:
        trainer.train_step(batch)
        bare_step(trainer, batch)
        for i in range(steps):
            for fn, times in sorted([(trainer.train_step, ours), (lambda b: bare_step(trainer, b), bare)], key=lambda x: (x[1] is bare) == (i % 2 == 0)):
                t0 = time.perf_counter()
                fn(batch)
                times.append(time.perf_counter() - t0)
    finally:
        trainer.server.close()
        torch.distributed.destroy_process_group()
    ratio = statistics.median(b / o for o, b in zip(ours, bare))  # per adjacent pair: robust to drifting load
    return tokens / statistics.median(ours), tokens / statistics.median(bare), ratio


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ragged", action="store_true", help="responses of unequal length (padding in every micro-batch)")
    ap.add_argument("--prompt-frac", type=float, default=0.25, help="prompt share of each row's tokens")
    ap.add_argument("--group-prompt-frac", type=float, default=0.72, help="the same, in the shared-prompt case (issue 14's job: ~0.72)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import logging

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model")
        for minis, label in [(1, "1 mini-batch (no recompute)"), (2, "2 mini-batches (+ proximal log-prob pass)")]:
            ours, bare, ratio = measure(model_dir, Path(tmp) / f"run{minis}", args.rows, args.len, args.steps, minis, args.prompt_frac, args.ragged)
            print(
                f"learner train_step vs bare fwd+bwd+AdamW, {label}: {ours:,.0f} vs {bare:,.0f} tokens/s "
                f"-> ratio {ratio:.2f}" + (" (target >= 0.9)" if minis == 1 else ""),
                flush=True,
            )
            print(f"RESULT learner minibatches={minis} ours_tok_s={ours:.0f} bare_tok_s={bare:.0f} ratio={ratio:.2f}", flush=True)
        for share in (True, False):
            ours, bare, ratio = measure(model_dir, Path(tmp) / f"share{share}", args.rows, args.len, args.steps, 1,
                                        args.group_prompt_frac, args.ragged, group_prompt=True, share_prefix=share)
            print(
                f"learner train_step vs bare, groups sharing a prompt ({args.group_prompt_frac:.0%} of each row), "
                f"model.share_prefix={share}: {ours:,.0f} vs {bare:,.0f} tokens/s -> ratio {ratio:.2f}", flush=True,
            )
            print(f"RESULT learner case=group_prompt share_prefix={str(share).lower()} ours_tok_s={ours:.0f} "
                  f"bare_tok_s={bare:.0f} ratio={ratio:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
