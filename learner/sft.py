"""Supervised warm start: next-token loss on the sampled (mask-1) tokens of demonstrations.

Single process (the tiny demo model trains in minutes on 2 cores). Inputs are
token-exact demonstrations: ``(ids, loss_mask)`` pairs where ``loss_mask`` is 1
on assistant tokens, exactly as an RL trajectory would mark them.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [B, L], attention [B, L], target mask [B, L-1] (1 where ids[:, t+1] is a trained token)."""
    L = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), L), dtype=torch.long)
    tmask = torch.zeros((len(examples), L - 1))
    for i, (x, msk) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        attn[i, : len(x)] = 1
        tmask[i, : len(x) - 1] = torch.tensor(msk[1:], dtype=torch.float)
    return ids, attn, tmask


def sft_train(
    model_path: str,
    out_dir: str,
    examples: list[tuple[list[int], list[int]]],
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    log_every: int = 50,
) -> dict:
    """Train on ``examples`` for ``steps`` AdamW steps; save an HF directory at ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.1, 1 - s / steps))
    pad_id = model.config.pad_token_id or 0
    t0 = time.perf_counter()
    loss_v = float("nan")
    for step in range(steps):
        ids, attn, tmask = pad_batch(rng.sample(examples, min(batch_size, len(examples))), pad_id)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        loss = (nll * tmask.reshape(-1)).sum() / tmask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_v = loss.item()
        if (step + 1) % log_every == 0 or step == 0:
            log.info("sft step %d/%d loss %.4f (%.0fs)", step + 1, steps, loss_v, time.perf_counter() - t0)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
    return {"final_loss": loss_v, "seconds": time.perf_counter() - t0, "steps": steps}
