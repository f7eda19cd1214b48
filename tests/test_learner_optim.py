"""Learning-rate warm-up and schedules, by hand."""

import math

import pytest
import torch

from learner.optim import build_optimizer, lr_lambda


def test_linear_warmup_then_constant():
    f = lr_lambda(total_steps=10, warmup_ratio=0.2, style="constant", min_ratio=0.0)
    assert [f(s) for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert f(9) == 1.0


def test_cosine_after_warmup_decays_to_the_floor():
    f = lr_lambda(total_steps=10, warmup_ratio=0.2, style="cosine", min_ratio=0.1)
    assert f(1) == pytest.approx(2 / 3)
    assert f(2) == pytest.approx(1.0)  # progress 0
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # progress 1/2 -> 0.55
    assert f(10) == pytest.approx(0.1)
    assert f(50) == pytest.approx(0.1)


def test_build_optimizer_skips_frozen_parameters_and_applies_the_schedule():
    from configs.schema import OptimConfig

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)
    opt, sched = build_optimizer(model.parameters(), OptimConfig(lr=0.1, lr_warmup_steps_ratio=0.5, warmup_style="cosine"), 4)
    assert sum(len(g["params"]) for g in opt.param_groups) == 2
    lrs = []
    for _ in range(4):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.05])


def test_optimizer_offload_is_off_on_cpu_and_moves_state_back_and_forth():
    from learner.optim import NoOptimizerOffload, OptimizerOffload, optimizer_offload

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters())
    cpu = torch.device("cpu")
    assert isinstance(optimizer_offload(opt, cpu, enabled=True, param_offload=False), NoOptimizerOffload)
    assert isinstance(optimizer_offload(opt, torch.device("cuda"), enabled=True, param_offload=True), NoOptimizerOffload)
    assert isinstance(optimizer_offload(opt, torch.device("cuda"), enabled=True, param_offload=False), OptimizerOffload)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    OptimizerOffload(opt, cpu).offload()
    assert all(v.device.type == "cpu" for s in opt.state.values() for v in s.values())
    OptimizerOffload(opt, torch.device("meta")).load()  # a second device without a GPU (one-way: meta holds no data)
    assert all(v.device.type == "meta" for s in opt.state.values() for v in s.values())
