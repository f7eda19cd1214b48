"""``envs.lru.SizedLRU`` and the caches built on it: bounded in bytes, and never a different answer."""

import pytest

from envs.lru import SizedLRU


def test_the_least_recently_used_entries_leave_first_when_the_budget_is_passed():
    lru = SizedLRU(10)
    lru.put("a", 1, 4)
    lru.put("b", 2, 4)
    assert lru.get("a") == 1  # now "b" is the least recently used
    lru.put("c", 3, 4)  # 12 > 10: "b" leaves
    assert lru.get("b") is None and lru.get("a") == 1 and lru.get("c") == 3 and lru.nbytes == 8
    lru.put("a", 9, 6)  # replaced: its old size no longer counts (6 + 4 = 10 fits)
    assert lru.get("a") == 9 and lru.get("c") == 3 and lru.nbytes == 10 and len(lru) == 2
    lru.put("huge", 0, 11)  # larger than the whole budget: not kept, nothing dropped for it
    assert lru.get("huge") is None and len(lru) == 2
    lru.clear()
    assert len(lru) == 0 and lru.nbytes == 0
    with pytest.raises(ValueError, match="max_bytes must be > 0"):
        SizedLRU(0)


def test_threads_sharing_one_lru_never_raise_and_keep_its_byte_count_true():
    # a tool's long output is counted in a worker thread while the event loop encodes through the
    # same cache: unguarded, a get raised KeyError (a put dropped the key between its two steps) and
    # concurrent puts lost each other's byte counts
    import random
    import sys
    import threading

    lru, errors = SizedLRU(50), []

    def hammer(seed):
        rng = random.Random(seed)
        try:
            for _ in range(50_000):
                k = rng.randrange(30)
                if lru.get(k) is None:
                    lru.put(k, k, rng.randrange(1, 10))
        except Exception as e:  # noqa: BLE001  collected for the assert
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=hammer, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert lru.nbytes == sum(n for _, n in lru._items.values()) <= 50


def test_encode_keeps_recent_texts_within_its_budget_and_answers_as_the_tokenizer(tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    import actors.rollout as rollout

    monkeypatch.setattr(rollout, "ENCODE_CACHE_BYTES", 2000)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [f"<|im_start|>user\nWhat is {i} * {i + 7}?<|im_end|>\n" * (1 + i % 5) for i in range(60)]
    for _ in range(2):  # the second pass reads what is still kept
        for t in texts:
            got = rollout.encode(tok, t)
            assert got == tok(t, add_special_tokens=False)["input_ids"]
            got.append(-1)  # the caller's list is its own: the kept ids are not changed
    cache = rollout._ENCODED[tok]
    assert 0 < len(cache) < len(texts) and cache.nbytes <= 2000
    rollout.decode(tok, [5, 6, 7])
    rollout.forget_texts()  # bench_actor_loop's fresh start: nothing kept, answers unchanged
    assert len(cache) == 0 and cache.nbytes == 0 and len(rollout._DECODED[tok]) == 0
    assert rollout.encode(tok, texts[0]) == tok(texts[0], add_special_tokens=False)["input_ids"]


def test_the_calculator_answers_alike_from_its_kept_answers_and_keeps_no_error():
    from envs.tools.builtin import _ANSWERS, calculator

    fn = calculator.fn
    assert fn("343*85") == fn("343*85") == "29155" and _ANSWERS.get("343*85") == "29155"
    for _ in range(2):
        with pytest.raises(ZeroDivisionError):
            fn("1/0")
    assert _ANSWERS.get("1/0") is None


def test_the_agents_renders_are_kept_within_their_budget_and_equal_fresh_ones(tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    import envs.agents.chat as chat
    from envs.agents import agent_for_config
    from configs.loader import load_config

    monkeypatch.setattr(chat, "RENDER_CACHE_BYTES", 3000)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    agent = agent_for_config(load_config(["demo"], [f"actor_rollout_ref.model.path={tiny_model_dir}"]), tok)
    rows = [{"question": f"What is {i} * {i + 3}? " * (1 + i % 4), "answer": "0"} for i in range(40)]
    for _ in range(2):  # the second pass reads what is still kept
        for row in rows:
            conv = agent.start(row)
            assert agent.prompt_text(conv) == agent._render(conv.messages, True)
    assert 0 < len(agent._renders) < len(rows) and agent._renders.nbytes <= 3000
    agent.forget_renders()
    assert len(agent._renders) == 0 and agent._renders.nbytes == 0
