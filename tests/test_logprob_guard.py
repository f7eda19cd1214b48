"""The log-prob guard: on tokens an actor sampled with exactly the learner's version, the learner's
log-probs and the engine's must agree; an engine serving a wrong weight stops the run, named."""

import asyncio

import pytest
import torch

from actors.engines.base import SamplingSettings
from actors.engines.hf_engine import HFEngine
from learner.metrics import EngineMismatch
from protocol import messages as m
from tests.learner_support import learner_config, trainer_world_1


def sampled_group(engine: HFEngine, actor_id: str, sample_id: str, prompt: list[int], temperature: float) -> list[m.Trajectory]:
    """Four chains of ``prompt`` sampled by ``engine`` (version 0), as its actor would send them."""
    settings = [SamplingSettings(max_tokens=12, temperature=temperature, seed=c) for c in range(4)]

    async def go():
        return await asyncio.gather(*(engine.generate(prompt, s) for s in settings))

    out = []
    for chain, g in enumerate(asyncio.run(go())):
        n = len(g.token_ids)
        out.append(m.Trajectory(
            actor_id=actor_id, sample_id=sample_id, chain=chain,
            prompt_ids=m.pack(prompt, "int32"), response_ids=m.pack(g.token_ids, "int32"),
            loss_mask=m.pack([1] * n, "uint8"), logprobs=m.pack(g.logprobs, "float32"),
            versions=m.pack([g.version] * n, "int32"), reward=float(chain % 2), reward_components={"reward": float(chain % 2)},
            stats=m.EpisodeStats(num_turns=1, tool_calls={}), greedy=False,
        ))
    return out


def test_an_engine_serving_a_wrong_weight_stops_the_run_naming_actor_and_version(tmp_path, tiny_model_dir):
    # the tiny random-init model's next-token distribution is nearly flat, so a wrong weight moves
    # its log-probs by ~0.3 nats here (a trained model's by far more): a threshold of 0.1 separates it
    # from the exact engine (< 1e-3)
    cfg = learner_config(tiny_model_dir, tmp_path, "actor_rollout_ref.rollout.max_logprob_diff=0.1")
    temperature = cfg.actor_rollout_ref.rollout.temperature
    good, bad = HFEngine(tiny_model_dir, seed=1), HFEngine(tiny_model_dir, seed=2)
    with torch.no_grad():  # a silently wrong weight: what a partial or misrouted update leaves behind
        bad.model.model.layers[0].mlp.down_proj.weight.mul_(-4.0)
    prompt = [1, 30, 31, 32, 33, 34]
    with trainer_world_1(cfg) as trainer:
        assert trainer.version == 0
        ok = trainer.step_batch(sampled_group(good, "actor-good", "0:0", prompt, temperature)
                                + sampled_group(good, "actor-good", "0:1", prompt[:4], temperature))
        trainer.train_step(ok.batch)
        stats = trainer.check_engines(ok)
        assert stats["actor/logprob_abs_diff_same_version_max"] < 1e-3  # same weights: numerics only

        mixed = trainer.step_batch(sampled_group(good, "actor-good", "0:0", prompt, temperature)
                                   + sampled_group(bad, "actor-bad", "0:1", prompt, temperature))
        trainer.train_step(mixed.batch)
        with pytest.raises(EngineMismatch, match=r"actor-bad does not serve the weights of v0: on the \d+ tokens it sampled with v0"):
            trainer.check_engines(mixed)


def test_the_guard_reports_only_when_no_threshold_is_set(tmp_path, tiny_model_dir):
    from learner.metrics import check_same_version_logprobs

    rows = torch.tensor([[0.5, 10.0], [30.0, 10.0], [0.0, 0.0]])
    assert check_same_version_logprobs(["a", "b", "c"], rows, 4, None) == {"actor/logprob_abs_diff_same_version_max": 3.0}
    with pytest.raises(EngineMismatch, match=r"b does not serve the weights of v4: on the 10 tokens .* by 3 on average"):
        check_same_version_logprobs(["a", "b", "c"], rows, 4, 1.0)
    assert check_same_version_logprobs(["a"], torch.tensor([[0.0, 0.0]]), 4, 1.0) == {}  # no same-version tokens
    assert check_same_version_logprobs(["a"], None, 4, 1.0) == {}  # critic warm-up: no policy update
