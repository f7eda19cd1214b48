"""The transformers engine: exact log-probs, dynamic batching, staged weight updates."""

import asyncio

import pytest
import torch

from actors.engines.base import SamplingSettings
from actors.engines.hf_engine import DRIVERS, HFEngine


def full_forward_logprobs(model, prompt, gen, temperature=1.0):
    ids = torch.tensor([prompt + gen])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(gen)[:, None])[:, 0]


@pytest.mark.parametrize("driver", DRIVERS)
def test_concurrent_requests_are_batched_and_logprobs_match_a_full_forward(tiny_model_dir, driver):
    engine = HFEngine(tiny_model_dir, seed=0, driver=driver)
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


# -- continuous batching ----------------------------------------------------------------------


async def steps_reach(engine, n, what, timeout_s=120.0):
    """Wait until the engine has run ``n`` decode steps."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while engine.steps < n:
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"waited {timeout_s} s for decode step {n} ({what}); the engine ran {engine.steps}")
        await asyncio.sleep(0.001)


OTHERS = [[1, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], [1, 40], [1, 50, 51, 52, 53, 54, 55]]


def run_alone_and_among_others(tiny_model_dir, prompt, settings):
    """The request alone on a fresh engine; then on another fresh engine, admitted while three others decode
    (they ask for 1000 tokens and are cancelled once it is done)."""
    alone = asyncio.run(HFEngine(tiny_model_dir, seed=0).generate(prompt, settings))
    engine = HFEngine(tiny_model_dir, seed=7)

    async def among():
        others = [asyncio.create_task(engine.generate(p, SamplingSettings(max_tokens=1000, temperature=1.0))) for p in OTHERS]
        await steps_reach(engine, 3, "the others decoding")
        g = await engine.generate(prompt, settings)
        running = [not t.done() for t in others]
        for t in others:
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        return g, running

    batched, running = asyncio.run(among())
    assert all(running) and batched.extra["first_step"] > 3  # it joined a batch already decoding, and left it first
    return engine, alone, batched


def test_greedy_request_alone_equals_the_same_request_admitted_mid_batch(tiny_model_dir):
    prompt, s = [1, 5, 6, 7, 8, 9], SamplingSettings(max_tokens=16, temperature=0.0)
    engine, alone, batched = run_alone_and_among_others(tiny_model_dir, prompt, s)
    assert engine.batches == 2  # the others' admission, then this one's at a step boundary
    assert batched.token_ids == alone.token_ids and batched.finish_reason == alone.finish_reason
    assert torch.allclose(torch.tensor(batched.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)
    ref = full_forward_logprobs(engine.model, prompt, batched.token_ids)
    assert torch.allclose(torch.tensor(batched.logprobs), ref, atol=1e-5, rtol=0)


def test_seeded_sampled_request_alone_equals_the_same_request_admitted_mid_batch(tiny_model_dir):
    prompt = [1, 5, 6, 7, 8, 9]
    s = SamplingSettings(max_tokens=24, temperature=1.0, seed=1234)
    engine, alone, batched = run_alone_and_among_others(tiny_model_dir, prompt, s)
    assert batched.token_ids == alone.token_ids
    assert torch.allclose(torch.tensor(batched.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)
    ref = full_forward_logprobs(engine.model, prompt, batched.token_ids)
    assert torch.allclose(torch.tensor(batched.logprobs), ref, atol=1e-5, rtol=0)
    other_seed = asyncio.run(HFEngine(tiny_model_dir, seed=0).generate(prompt, SamplingSettings(max_tokens=24, temperature=1.0, seed=99)))
    assert other_seed.token_ids != alone.token_ids  # the seed, not the engine, chose the tokens


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_request_arriving_while_others_decode_is_served_before_they_end(tiny_model_dir, driver):
    engine = HFEngine(tiny_model_dir, seed=0, driver=driver)

    async def go():  # the long ones ask for 1000 tokens; they are cancelled once the short one is served
        long = [asyncio.create_task(engine.generate(p, SamplingSettings(max_tokens=1000, temperature=1.0))) for p in OTHERS]
        await steps_reach(engine, 2, "the long requests decoding")
        short = await engine.generate([1, 9, 9], SamplingSettings(max_tokens=4, temperature=1.0))
        unfinished = sum(not t.done() for t in long)
        for t in long:
            t.cancel()
        await asyncio.gather(*long, return_exceptions=True)
        return short, unfinished

    short, unfinished = asyncio.run(go())
    assert len(short.token_ids) == 4 and unfinished == 3  # served while all three still decode
    assert engine.batches == 2  # the long ones' admission, then the short one's at a step boundary
    # it joined after the batch had started and took 4 consecutive steps: one token per step, no waiting
    assert short.extra["first_step"] > 2 and short.extra["last_step"] == short.extra["first_step"] + 3


@pytest.mark.parametrize("driver", DRIVERS)
def test_rows_decode_one_token_per_step_while_others_come_and_go(tiny_model_dir, driver):
    engine = HFEngine(tiny_model_dir, seed=0, driver=driver)

    async def go():
        long = asyncio.create_task(engine.generate([1, 5, 6], SamplingSettings(max_tokens=60, temperature=1.0)))
        await steps_reach(engine, 2, "the long request decoding")
        shorts = [await engine.generate([1, 9, 9 + i], SamplingSettings(max_tokens=3, temperature=1.0)) for i in range(3)]
        return await long, shorts

    long, shorts = asyncio.run(go())
    assert long.extra["last_step"] - long.extra["first_step"] == 59  # never paused for the admissions around it
    assert all(g.extra["last_step"] - g.extra["first_step"] == 2 for g in shorts)


def test_the_next_turn_takes_over_the_previous_turns_cached_prefix(tiny_model_dir):
    s = SamplingSettings(max_tokens=10, temperature=0.0)
    engine = HFEngine(tiny_model_dir, seed=0)
    first = asyncio.run(engine.generate([1, 5, 6, 7], s))
    turn2 = [1, 5, 6, 7] + first.token_ids + [30, 31, 32]  # prompt + sampled turn + observation
    second = asyncio.run(engine.generate(turn2, s))
    assert engine.prefix_hits == 1
    fresh = asyncio.run(HFEngine(tiny_model_dir, seed=0).generate(turn2, s))
    assert second.token_ids == fresh.token_ids
    assert torch.allclose(torch.tensor(second.logprobs), torch.tensor(fresh.logprobs), atol=1e-5, rtol=0)
    ref = full_forward_logprobs(engine.model, turn2, second.token_ids)
    assert torch.allclose(torch.tensor(second.logprobs), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("driver", DRIVERS)
def test_many_rows_finishing_at_different_steps_keep_exact_logprobs(tiny_model_dir, driver):
    """Rows retire (and move slots) at every step while others keep decoding and new ones join."""
    engine = HFEngine(tiny_model_dir, seed=3, max_batch=5, parked_rows=2, driver=driver)
    prompts = [[1] + [10 + (i * 7 + j) % 400 for j in range(1 + i % 9)] for i in range(14)]
    settings = [SamplingSettings(max_tokens=2 + (i * 5) % 13, temperature=[1.0, 0.0, 0.7][i % 3], top_k=[-1, 5][i % 2]) for i in range(14)]

    async def go():
        return await asyncio.gather(*(engine.generate(p, s) for p, s in zip(prompts, settings)))

    gens = asyncio.run(go())
    assert engine.batches > 1  # max_batch 5: the rest were admitted as slots freed up
    for p, s, g in zip(prompts, settings, gens):
        assert len(g.token_ids) == s.max_tokens
        ref = full_forward_logprobs(engine.model, p, g.token_ids, s.temperature if s.temperature > 0 else 1.0)
        assert torch.allclose(torch.tensor(g.logprobs), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_weight_swap_waits_for_running_requests_and_drops_stale_prefixes(tiny_model_dir, driver):
    import threading

    from transformers import AutoModelForCausalLM

    v0 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    engine = HFEngine(tiny_model_dir, seed=0, driver=driver)
    gen = torch.Generator().manual_seed(0)  # the same v1 every run (unseeded noise made the 1e-5 checks a lottery)
    new = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in engine.model.state_dict().items() if k != "lm_head.weight"}
    s = SamplingSettings(max_tokens=50, temperature=1.0)
    swapped = threading.Event()

    async def go():
        running = [asyncio.create_task(engine.generate(p, s)) for p in OTHERS]
        await steps_reach(engine, 2, "requests running before the swap")
        swap = asyncio.create_task(asyncio.to_thread(lambda: (engine.load_weights(new.items(), version=1), swapped.set())))
        while engine._lock.swap_waiting == 0 and not swapped.is_set():  # the swap now waits for the running rows
            await asyncio.sleep(0.001)
        late = asyncio.create_task(engine.generate([1, 5, 6], SamplingSettings(max_tokens=5, temperature=0.0)))
        before = await asyncio.gather(*running)
        await asyncio.wait_for(swap, 60)
        return before, await late

    before, late = asyncio.run(go())
    for p, g in zip(OTHERS, before):  # every token of these was sampled by v0
        assert g.version == 0 and len(g.token_ids) == 50
        assert torch.allclose(torch.tensor(g.logprobs), full_forward_logprobs(v0, p, g.token_ids), atol=1e-5, rtol=0)
    assert late.version == 1  # held back by the pending swap, then served by v1
    assert torch.allclose(torch.tensor(late.logprobs), full_forward_logprobs(engine.model, [1, 5, 6], late.token_ids), atol=1e-5, rtol=0)
    cont = OTHERS[0] + before[0].token_ids + [3]  # continues a v0 row: its cached prefix must not be reused
    hits = engine.prefix_hits
    g = asyncio.run(engine.generate(cont, SamplingSettings(max_tokens=4, temperature=0.0)))
    assert engine.prefix_hits == hits and g.version == 1
    assert torch.allclose(torch.tensor(g.logprobs), full_forward_logprobs(engine.model, cont, g.token_ids), atol=1e-5, rtol=0)


def test_bad_requests_are_refused_with_a_clear_error(tiny_model_dir):
    import pytest

    engine = HFEngine(tiny_model_dir, seed=0)
    with pytest.raises(ValueError, match="holds no token ids"):
        asyncio.run(engine.generate([], SamplingSettings(max_tokens=3)))
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        asyncio.run(engine.generate([1, 2], SamplingSettings(max_tokens=0)))
    with pytest.raises(ValueError, match=r"prompt ids must lie in \[0, 512\)"):
        asyncio.run(engine.generate([1, 512], SamplingSettings(max_tokens=3)))
    assert len(asyncio.run(engine.generate([1, 2], SamplingSettings(max_tokens=3))).token_ids) == 3


def test_requests_with_one_prompt_share_its_prefill_and_sample_apart(tiny_model_dir):
    engine = HFEngine(tiny_model_dir, seed=0)
    prompt = [1, 5, 6, 7, 8]
    settings = [SamplingSettings(max_tokens=12, temperature=1.0, seed=i) for i in range(4)] + [SamplingSettings(max_tokens=6, temperature=0.0)]

    async def go():  # a GRPO group: its chains ask with the same prompt in one tick
        return await asyncio.gather(*(engine.generate(prompt, s) for s in settings))

    gens = asyncio.run(go())
    assert engine.batches == 1 and len({tuple(g.token_ids) for g in gens[:4]}) > 1
    for s, g in zip(settings, gens):
        alone = asyncio.run(HFEngine(tiny_model_dir, seed=0).generate(prompt, s))
        assert g.token_ids == alone.token_ids
        ref = full_forward_logprobs(engine.model, prompt, g.token_ids, s.temperature if s.temperature > 0 else 1.0)
        assert torch.allclose(torch.tensor(g.logprobs), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("driver", DRIVERS)
def test_close_fails_running_requests_and_a_later_request_restarts_the_worker(tiny_model_dir, driver):
    import pytest

    engine = HFEngine(tiny_model_dir, seed=0, driver=driver)

    async def go():
        running = asyncio.create_task(engine.generate([1, 5, 6], SamplingSettings(max_tokens=500, temperature=1.0)))
        await steps_reach(engine, 2, "a request running before close")
        await engine.close()
        with pytest.raises(RuntimeError, match="HF engine closed"):
            await running

    asyncio.run(go())
    g = asyncio.run(engine.generate([1, 5, 6], SamplingSettings(max_tokens=4, temperature=0.0)))
    assert len(g.token_ids) == 4 and all(o is None or not hasattr(o, "req") for o in engine._owner)


@pytest.mark.parametrize("driver", DRIVERS)
def test_each_turn_continues_in_its_parked_slot_while_others_decode_with_exact_logprobs(tiny_model_dir, driver):
    """Episodes of three turns, started together, two per prompt (a GRPO group's chains), continuing at
    different steps as an actor's do: each later turn takes over its previous turn's slot where it is
    while the other rows decode, sit parked or leave, and every log-prob is a full forward's."""
    engine = HFEngine(tiny_model_dir, seed=5, driver=driver)

    async def episode(i):
        tokens = [1] + [10 + (i // 2 * 11 + j) % 300 for j in range(3 + i // 2 % 7)]
        turns = []
        for t in range(3):
            s = SamplingSettings(max_tokens=2 + (i * 3 + t * 5) % 11, temperature=[1.0, 0.0, 0.7][i % 3], seed=100 * i + t)
            g = await engine.generate(tokens, s)
            turns.append((tokens, g, s))
            tokens = tokens + g.token_ids + [20 + i, 21 + t]  # the turn, then its observation
        return turns

    async def go():
        return await asyncio.gather(*(episode(i) for i in range(16)))

    episodes = asyncio.run(go())
    assert engine.prefix_hits == 32  # every later turn continued its previous turn's KV
    for turns in episodes:
        for prompt, g, s in turns:
            assert len(g.token_ids) == s.max_tokens
            ref = full_forward_logprobs(engine.model, prompt, g.token_ids, s.temperature if s.temperature > 0 else 1.0)
            assert torch.allclose(torch.tensor(g.logprobs), ref, atol=1e-5, rtol=0)


def test_an_idle_worker_thread_exits_and_an_engine_dropped_without_close_is_freed(tiny_model_dir, monkeypatch):
    """Many tests and scripts drop engines without closing them: the idle worker thread (which holds
    the engine) exits, so the engine and its KV cache are freed, and a later request starts a new one."""
    import gc
    import time
    import weakref

    import actors.engines.hf_engine as hf

    monkeypatch.setattr(hf, "IDLE_EXIT_S", 0.2)
    engine = HFEngine(tiny_model_dir, seed=0, driver="thread")
    s = SamplingSettings(max_tokens=4, temperature=0.0)
    first = asyncio.run(engine.generate([1, 5, 6], s))
    worker = engine._thread
    worker.join(30)
    assert not worker.is_alive() and engine._thread is None
    again = asyncio.run(engine.generate([1, 5, 6], s))  # a new worker, the same (greedy) answer
    assert again.token_ids == first.token_ids and engine._thread is not worker

    ref = weakref.ref(engine)
    worker = engine._thread
    del engine
    worker.join(30)
    deadline = time.monotonic() + 30
    while ref() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert ref() is None


def test_the_default_driver_is_the_event_loop_on_a_cpu_for_a_small_model_and_a_typo_is_refused(tiny_model_dir, monkeypatch):
    import actors.engines.hf_engine as hf

    assert HFEngine(tiny_model_dir, seed=0).driver == "loop"
    monkeypatch.setattr(hf, "LOOP_MAX_PARAMS", 1000)  # the tiny model has ~0.5M: now "larger"
    assert HFEngine(tiny_model_dir, seed=0).driver == "thread"
    with pytest.raises(ValueError, match=r"driver must be one of \('loop', 'thread'\), got 'threads'"):
        HFEngine(tiny_model_dir, seed=0, driver="threads")


def test_on_the_loop_driver_a_next_turn_asked_on_its_wakeup_joins_the_very_next_step(tiny_model_dir):
    """The loop driver resolves a finished row in place: the episode's next turn (asked at once, here;
    an actor first runs its tool) is queued before the next step runs, so it starts there."""
    engine = HFEngine(tiny_model_dir, seed=0, driver="loop")
    s = SamplingSettings(max_tokens=3, temperature=0.0)

    async def episode():
        prompt, turns = [1, 5, 6], []
        for _ in range(4):
            g = await engine.generate(prompt, s)
            turns.append(g)
            prompt = prompt + g.token_ids + [30]
        return turns

    async def go():
        long = asyncio.create_task(engine.generate([1, 40, 41], SamplingSettings(max_tokens=40, temperature=1.0)))
        turns = await episode()
        return turns, await long

    turns, long = asyncio.run(go())
    assert long.extra["last_step"] - long.extra["first_step"] == 39  # the steps ran back to back throughout
    for a, b in zip(turns, turns[1:]):
        assert b.extra["first_step"] == a.extra["last_step"] + 1
    assert engine.prefix_hits == 3


def test_on_the_loop_driver_a_second_running_event_loop_is_refused_and_queues_nothing(tiny_model_dir):
    import threading

    engine = HFEngine(tiny_model_dir, seed=0, driver="loop")
    started, stop = threading.Event(), threading.Event()
    result = {}

    def first_loop():  # serves a long request until told to stop
        async def go():
            task = asyncio.create_task(engine.generate([1, 5, 6], SamplingSettings(max_tokens=100_000, temperature=1.0)))
            await steps_reach(engine, 2, "the first loop's request decoding")
            started.set()
            while not stop.is_set():
                await asyncio.sleep(0.01)
            task.cancel()
            result["first"] = await asyncio.gather(task, return_exceptions=True)

        asyncio.run(go())

    t = threading.Thread(target=first_loop)
    t.start()
    try:
        assert started.wait(120)
        with pytest.raises(RuntimeError, match=r"another event loop is running requests; one loop at a time, or driver='thread'"):
            asyncio.run(engine.generate([1, 7, 8], SamplingSettings(max_tokens=4)))
        assert all(r.prompt == [1, 5, 6] for r in engine._queue)  # the refused request was never queued
    finally:
        stop.set()
        t.join(60)
    assert isinstance(result["first"][0], asyncio.CancelledError)
    assert len(asyncio.run(engine.generate([1, 7, 8], SamplingSettings(max_tokens=4))).token_ids) == 4  # that loop is gone: served


def test_on_the_loop_driver_a_failure_outside_a_step_fails_the_requests_and_the_next_ones_are_served(tiny_model_dir, monkeypatch):
    engine = HFEngine(tiny_model_dir, seed=0, driver="loop")
    s = SamplingSettings(max_tokens=4, temperature=0.0)
    monkeypatch.setattr(engine, "_drop_stale_prefixes", lambda: 1 / 0)  # raises where no step runs

    async def go():
        return await asyncio.gather(*(engine.generate([1, 5, 6 + i], s) for i in range(3)), return_exceptions=True)

    assert all(isinstance(r, ZeroDivisionError) for r in asyncio.run(go()))
    assert not engine._rows and not engine._held and engine._driver_loop is None
    monkeypatch.undo()
    assert len(asyncio.run(engine.generate([1, 5, 6], s)).token_ids) == 4


def test_on_the_loop_driver_a_new_event_loop_takes_over_from_one_that_stopped_mid_request(tiny_model_dir):
    """An event loop closed with a request still running (not cancelled: ``asyncio.run`` would cancel it,
    and its rounds retire it) leaves the row behind, holding the batch lock: a weight swap from outside
    any loop does not wait for it, and the next loop's request is served (the row dropped)."""
    import gc
    import weakref

    engine = HFEngine(tiny_model_dir, seed=0, driver="loop")
    s = SamplingSettings(max_tokens=4, temperature=0.0)
    first = asyncio.run(engine.generate([1, 5, 6], s))

    def abandon():
        loop = asyncio.new_event_loop()

        async def start():
            task = asyncio.create_task(engine.generate([1, 7, 8], SamplingSettings(max_tokens=1000, temperature=1.0)))
            await steps_reach(engine, engine.steps + 2, "the abandoned request decoding")
            return task

        task = loop.run_until_complete(start())
        loop.close()  # the request is neither done nor cancelled
        assert not task.done() and engine._rows and engine._held

    abandon()
    engine.load_weights(engine.model.state_dict().items(), version=1)  # returns: the row no longer holds the gate
    assert engine.version == 1 and not engine._rows and not engine._held
    abandon()
    again = asyncio.run(engine.generate([1, 5, 6], s))
    assert again.token_ids == first.token_ids and again.version == 1 and not engine._rows and not engine._held

    ref = weakref.ref(engine)
    del engine
    gc.collect()
    assert ref() is None  # no thread holds a loop-driven engine


def test_the_kv_reservation_is_not_charged_to_commit_accounting(tmp_path):
    """A reservation larger than the machine's memory maps (MAP_NORESERVE) and the process can still
    fork: charged reservations once made a pytest process's fork fail with ENOMEM."""
    import os

    import pytest

    from actors.engines.hf_engine import _MAP_NORESERVE, _memory, _zeros

    mode = open("/proc/sys/vm/overcommit_memory").read().strip()
    if mode == "2" or not _MAP_NORESERVE:
        pytest.skip(f"strict overcommit (mode {mode}) or unknown MAP_NORESERVE: reservations are always charged")
    big = _zeros((_memory() // 4 * 5,), torch.uint8, torch.device("cpu"))  # 1.25x physical memory, untouched
    big[:: 1 << 20] = 1  # a few pages committed
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert int(big[:: 1 << 20].sum()) == len(range(0, big.numel(), 1 << 20))
