"""The transformers engine: exact log-probs, dynamic batching, in-place weight updates."""

import asyncio

import torch

from actors.engines.base import SamplingSettings
from actors.engines.hf_engine import HFEngine


def full_forward_logprobs(model, prompt, gen, temperature=1.0):
    ids = torch.tensor([prompt + gen])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(gen)[:, None])[:, 0]


def test_concurrent_requests_are_batched_and_logprobs_match_a_full_forward(tiny_model_dir):
    engine = HFEngine(tiny_model_dir, seed=0)
    prompts = [[1, 5, 6, 7, 8], [1, 9], [1, 11, 12, 13, 14, 15, 16]]
    settings = [SamplingSettings(max_tokens=n, temperature=t) for n, t in [(12, 1.0), (7, 0.7), (9, 1.0)]]

    async def go():
        return await asyncio.gather(*(engine.generate(p, s) for p, s in zip(prompts, settings)))

    gens = asyncio.run(go())
    assert engine.batches == 1  # three concurrent requests, one batch
    for p, s, g in zip(prompts, settings, gens):
        assert len(g.token_ids) == s.max_tokens == len(g.logprobs) and g.finish_reason == "length"
        ref = full_forward_logprobs(engine.model, p, g.token_ids, s.temperature)
        assert torch.allclose(torch.tensor(g.logprobs), ref, atol=1e-4)


def test_greedy_is_deterministic_and_stops_on_stop_ids(tiny_model_dir):
    engine = HFEngine(tiny_model_dir, seed=0)
    s = SamplingSettings(max_tokens=10, temperature=0.0)
    a = asyncio.run(engine.generate([1, 5, 6], s))
    b = asyncio.run(engine.generate([1, 5, 6], s))
    assert a.token_ids == b.token_ids
    stop = a.token_ids[3]
    c = asyncio.run(engine.generate([1, 5, 6], SamplingSettings(max_tokens=10, temperature=0.0, stop_token_ids=(stop,))))
    first = a.token_ids.index(stop)
    assert c.token_ids == a.token_ids[: first + 1] and c.finish_reason == "stop"


def test_load_weights_changes_outputs_and_version(tiny_model_dir):
    engine = HFEngine(tiny_model_dir, seed=0)
    s = SamplingSettings(max_tokens=8, temperature=0.0)
    before = asyncio.run(engine.generate([1, 5, 6], s))
    new = {k: v + 0.5 * torch.randn_like(v) for k, v in engine.model.state_dict().items() if k != "lm_head.weight"}
    engine.load_weights(new.items(), version=3)
    after = asyncio.run(engine.generate([1, 5, 6], s))
    assert after.version == 3 and before.version == 0
    assert torch.equal(engine.model.state_dict()["model.norm.weight"], new["model.norm.weight"])
    ref = full_forward_logprobs(engine.model, [1, 5, 6], after.token_ids)
    assert torch.allclose(torch.tensor(after.logprobs), ref, atol=1e-4)


def test_weights_that_do_not_fit_are_refused(tiny_model_dir):
    import pytest

    engine = HFEngine(tiny_model_dir, seed=0)
    with pytest.raises(ValueError, match="do not fit"):
        engine.load_weights([("model.not_a_param", torch.zeros(3))], version=1)
    assert engine.version == 0


def test_adopted_weights_are_served_without_a_copy_and_stay_tied(tiny_model_dir):
    engine = HFEngine(tiny_model_dir, seed=0)
    s = SamplingSettings(max_tokens=8, temperature=0.0)
    new = {k: v + 0.5 * torch.randn_like(v) for k, v in engine.model.state_dict().items() if k != "lm_head.weight"}
    copied = HFEngine(tiny_model_dir, seed=0)
    copied.load_weights(new.items(), version=2)
    engine.load_weights(new.items(), version=2, adopt=True)
    model = engine.model
    assert model.model.embed_tokens.weight.data_ptr() == new["model.embed_tokens.weight"].data_ptr()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    # the same weights served either way: the same greedy tokens and log-probs
    a, b = (asyncio.run(e.generate([1, 5, 6], s)) for e in (engine, copied))
    assert a.token_ids == b.token_ids and a.version == b.version == 2
    assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-6)


def test_adopt_falls_back_to_a_copy_when_a_dtype_differs(tiny_model_dir):
    engine = HFEngine(tiny_model_dir, seed=0)
    new = {k: v.double() for k, v in engine.model.state_dict().items() if k != "lm_head.weight"}
    engine.load_weights(new.items(), version=1, adopt=True)
    weight = engine.model.model.embed_tokens.weight
    assert weight.dtype == torch.float32 and weight.data_ptr() != new["model.embed_tokens.weight"].data_ptr()
    assert torch.equal(weight, new["model.embed_tokens.weight"].float())
