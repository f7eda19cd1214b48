"""The transformers engine: exact log-probs, dynamic batching, staged weight updates."""

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
    with pytest.raises(ValueError, match="'model.not_a_param' is not a parameter of the served model"):
        engine.load_weights([("model.not_a_param", torch.zeros(3))], version=1)
    new = {k: v + 1.0 for k, v in engine.model.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"weights v2 are incomplete: missing \['model.norm.weight'\]"):
        engine.load_weights(((k, v) for k, v in new.items() if k != "model.norm.weight"), version=2)
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \[3\]"):
        engine.load_weights([("model.norm.weight", torch.zeros(3))], version=3)
    assert engine.version == 0


def test_a_stream_that_fails_midway_leaves_the_served_weights_and_version(tiny_model_dir):
    import pytest

    from protocol.weights import WeightsRejected

    engine = HFEngine(tiny_model_dir, seed=0)
    s = SamplingSettings(max_tokens=8, temperature=0.0)
    v1 = {k: v + 0.5 * torch.randn_like(v) for k, v in engine.model.state_dict().items() if k != "lm_head.weight"}
    engine.load_weights(v1.items(), version=1)
    served = asyncio.run(engine.generate([1, 5, 6], s))

    def corrupt_stream():  # what a receiver does when bucket 2 fails its checksum
        for i, (k, v) in enumerate(v1.items()):
            if i == len(v1) // 2:
                raise WeightsRejected("weights v2 chunk 1/2: xxh3_64 checksum mismatch; refusing it")
            yield k, v * 0 + 7.0

    with pytest.raises(WeightsRejected, match="checksum mismatch"):
        engine.load_weights(corrupt_stream(), version=2)
    assert engine.version == 1
    state = engine.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in v1.items())  # not one tensor of v2 is served
    again = asyncio.run(engine.generate([1, 5, 6], s))
    assert again.version == 1 and again.token_ids == served.token_ids and again.logprobs == served.logprobs


def test_updates_are_staged_then_swapped_and_tied_weights_stay_tied(tiny_model_dir):
    engine = HFEngine(tiny_model_dir, seed=0)
    model = engine.model
    assert model.config.tie_word_embeddings
    s = SamplingSettings(max_tokens=8, temperature=0.0)
    for version in (1, 2, 3):  # the standby copy is allocated once and swapped each time
        new = {k: v + 0.1 * version for k, v in model.state_dict().items() if k != "lm_head.weight"}
        engine.load_weights(iter(new.items()), version=version)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
        assert torch.equal(model.lm_head.weight, new["model.embed_tokens.weight"])
        got = asyncio.run(engine.generate([1, 5, 6], s))
        ref = full_forward_logprobs(model, [1, 5, 6], got.token_ids)
        assert got.version == version and torch.allclose(torch.tensor(got.logprobs), ref, atol=1e-4)
    assert [len(s) for s in engine._standby.values()] == [len(engine._params())]  # one standby copy, reused


def test_bf16_weights_load_into_a_bf16_or_fp32_engine(tiny_model_dir):
    fp32 = HFEngine(tiny_model_dir, seed=0)
    bf16 = HFEngine(tiny_model_dir, seed=0, dtype=torch.bfloat16)
    assert bf16.model.model.norm.weight.dtype == torch.bfloat16
    new = {k: (v + 0.25).to(torch.bfloat16) for k, v in fp32.model.state_dict().items() if k != "lm_head.weight"}
    for engine in (fp32, bf16):
        engine.load_weights(new.items(), version=1)
        assert torch.equal(engine.model.model.embed_tokens.weight.to(torch.bfloat16), new["model.embed_tokens.weight"])
    s = SamplingSettings(max_tokens=6, temperature=0.0)
    g = asyncio.run(bf16.generate([1, 5, 6], s))
    assert g.version == 1 and len(g.token_ids) == 6
