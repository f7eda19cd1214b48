"""AdamW and its learning-rate schedule, shared by the policy and the critic."""

from __future__ import annotations

import math

import torch


def lr_lambda(total_steps: int, warmup_ratio: float, style: str, min_ratio: float):
    """Multiplier of the peak lr at learner step ``step`` (0-based).

    Linear warm-up over ``int(total_steps * warmup_ratio)`` steps
    (``(step + 1) / (warmup + 1)``), then ``constant`` (1) or ``cosine`` decay
    from 1 to ``min_ratio`` at ``total_steps``.
    """
    warmup = int(total_steps * warmup_ratio)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if style == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f


def build_optimizer(params, o, total_steps: int):
    """AdamW over the parameters that require grad, and its LambdaLR schedule.

    Args:
        params: model parameters (frozen ones, e.g. a LoRA base, are skipped).
        o: an ``OptimConfig`` section.
        total_steps: learner steps of the run (for warm-up and cosine).
    """
    trainable = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(total_steps, o.lr_warmup_steps_ratio, o.warmup_style, o.min_lr_ratio)
    )
    return opt, sched


class NoOptimizerOffload:
    """Optimizer state stays where the parameters are."""

    def load(self) -> None: ...

    def offload(self) -> None: ...


class OptimizerOffload:
    """``fsdp_config.optimizer_offload``: AdamW state lives in host memory between
    learner steps and comes back to the GPU for the optimizer steps (as verl's
    ``offload_fsdp_optimizer``/``load_fsdp_optimizer``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.optimizer = optimizer
        self.device = device

    def _move(self, device) -> None:
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.device != device:
                    state[key] = value.to(device, non_blocking=True)

    def load(self) -> None:
        self._move(self.device)

    def offload(self) -> None:
        self._move(torch.device("cpu"))


def optimizer_offload(optimizer, device: torch.device, enabled: bool, param_offload: bool):
    """The offload policy for ``optimizer``: nothing on CPU, nothing when the parameters
    themselves are offloaded (their state already lives on CPU), else ``OptimizerOffload``."""
    if not enabled or param_offload or device.type != "cuda":
        return NoOptimizerOffload()
    return OptimizerOffload(optimizer, device)
