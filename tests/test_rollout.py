"""Token-exact trajectories: the learner trains on exactly the sampled ids plus the observation ids.

Each agent type plays a scripted multi-turn episode with two tool calls through
the real rollout loop, tools and reward; the trajectory then crosses the wire
(encode/decode) and is collated by the learner. The ids the learner trains on
must equal, token for token, what the engine returned interleaved with the
observation ids, and the loss mask must be 1 exactly on the sampled ids.
"""

import asyncio
import json

import numpy as np
import pytest

from actors.actor import Scorer, to_trajectory
from actors.engines.scripted import ScriptedEngine
from actors.rollout import EpisodeLimits, ToolBox, run_episode
from envs import make_agent
from envs.rewards import get_reward
from envs.tools import get_tool
from learner.batch import check_alignment, collate
from protocol import messages as m
from actors.engines.base import SamplingSettings


class RecordingEngine(ScriptedEngine):
    """A scripted engine that remembers every id list it returned."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.returned: list[list[int]] = []

    async def generate(self, prompt_ids, settings):
        g = await super().generate(prompt_ids, settings)
        self.returned.append(list(g.token_ids))
        return g


def calc(expr):
    return "<tool_call>\n" + json.dumps({"name": "calculator", "arguments": {"expression": expr}}) + "\n</tool_call>"


SCRIPTS = {
    "hf": (["calculator"], [calc("12*3"), calc("36+4"), "The answer is 40."]),
    "react": (["calculator"], [
        'Thought: multiply\nAction: calculator\nAction Input: {"expression": "12*3"}',
        'Thought: add\nAction: calculator\nAction Input: {"expression": "36+4"}',
        "Thought: done\nFinal Answer: 40",
    ]),
    "code": (["code_interpreter"], ["```python\nprint(12*3)\n```", "```python\nprint(36+4)\n```", "The answer is 40."]),
}


@pytest.mark.parametrize("agent_type", sorted(SCRIPTS))
def test_learner_trains_on_exactly_the_sampled_and_observation_ids(tiny_model_dir, agent_type):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tool_names, turns = SCRIPTS[agent_type]
    tools = [get_tool(n) for n in tool_names]
    agent = make_agent(agent_type, tok, tools)
    engine = RecordingEngine(tok, turns, tok.eos_token_id)
    row = {"question": "What is 12*3+4?", "answer": "40"}
    limits = EpisodeLimits(max_turns=4, max_tokens_per_turn=64, max_response_tokens=400, max_context=4096)
    settings = SamplingSettings(max_tokens=64, stop_token_ids=(tok.eos_token_id,))
    ep = asyncio.run(run_episode(engine, agent, tok, ToolBox(tools, 30, 256, None), row, limits, settings))

    assert ep.finish_reason == "answer" and ep.tool_calls == [tool_names[0]] * 2 and ep.num_turns == 3
    # the observation segments, recovered from the mask, are the tools' real outputs
    mask = np.array(ep.loss_mask)
    ids = np.array(ep.response_ids)
    segments, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            segments.append((int(mask[start]), ids[start:i].tolist()))
            start = i
    sampled = [s for k, s in segments if k == 1]
    observations = [s for k, s in segments if k == 0]
    assert sampled == engine.returned  # mask 1 exactly on what the engine returned, in order
    assert len(observations) == 2
    assert "36" in tok.decode(observations[0]) and "40" in tok.decode(observations[1])

    scores = Scorer(get_reward("math_reward_string_equal"), tok)(ep, row)
    assert scores["reward"] == 1.0
    item = m.WorkItem(sample_id="0:0", row=row, group_size=1)
    wire = m.decode(m.encode(to_trajectory("actor-0", item, 0, ep, scores)))
    check_alignment(wire)
    batch = collate([wire], {"0:0": 0}, pad_id=tok.pad_token_id)
    expected = ep.prompt_ids + [t for _, seg in segments for t in seg]
    assert batch.input_ids[0, : len(expected)].tolist() == expected
    # the learner's mask marks exactly the sampled targets
    P = len(ep.prompt_ids)
    trained_targets = batch.input_ids[0, 1:][batch.loss_mask[0] == 1].tolist()
    assert trained_targets == [t for seg in engine.returned for t in seg]
    assert batch.behaviour_logprobs[0, P - 1 : P - 1 + len(ids)][batch.loss_mask[0, P - 1 : P - 1 + len(ids)] == 0].abs().sum() == 0
    assert batch.token_rewards.sum() == 1.0 and batch.token_rewards[0, P - 2 + len(ids)] == 1.0


def test_turn_cut_by_token_budget_is_flagged_truncated(tiny_model_dir):
    from transformers import AutoTokenizer

    from actors.engines.hf_engine import HFEngine

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tools = [get_tool("calculator")]
    agent = make_agent("hf", tok, tools)
    engine = HFEngine(tiny_model_dir, seed=0)
    limits = EpisodeLimits(max_turns=4, max_tokens_per_turn=5, max_response_tokens=100, max_context=512)
    # the random-init model never samples the stop token here (its id is masked out by top_k=1 on another token)
    settings = SamplingSettings(max_tokens=5, temperature=0.0, stop_token_ids=(tok.eos_token_id,))
    ep = asyncio.run(run_episode(engine, agent, tok, ToolBox(tools, 5, 64, None), {"question": "q", "answer": "1"}, limits, settings))
    if ep.response_ids[-1] == tok.eos_token_id:
        pytest.skip("the random model happened to stop")
    assert ep.truncated and ep.finish_reason == "length" and len(ep.response_ids) == 5
    assert ep.versions == [0] * 5 and all(lp <= 0 for lp in ep.logprobs)


def test_prompt_that_does_not_fit_the_context_is_a_typed_error(tiny_model_dir):
    from transformers import AutoTokenizer

    from actors.rollout import PromptTooLong

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tools = [get_tool("calculator")]
    engine = ScriptedEngine(tok, ["The answer is 1."], tok.eos_token_id)
    limits = EpisodeLimits(max_turns=2, max_tokens_per_turn=8, max_response_tokens=64, max_context=16)
    settings = SamplingSettings(max_tokens=8, stop_token_ids=(tok.eos_token_id,))
    with pytest.raises(PromptTooLong, match="leaves no room in a context of 16"):
        asyncio.run(run_episode(engine, make_agent("hf", tok, tools), tok, ToolBox(tools, 5, 64, None), {"question": "q"}, limits, settings))


TEXTS = [
    "",
    "408",
    "What is 343 * 85?",
    "<|im_start|>system\nYou are a helpful assistant.\nTools: calculator<|im_end|>\n<|im_start|>user\nWhat is 343 * 85?<|im_end|>\n<|im_start|>assistant\n",
    "\n<|im_start|>user\n<tool_response>\n29155\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
    "  leading and trailing spaces  \n\n\ttabs",
    "caf\u00e9 \u00fcber na\u0308ive \u65e5\u672c\u8a9e \U0001f600 <tool_call>{\"a\": 1}</tool_call><|endoftext|>",
]


def test_encode_through_the_backend_equals_the_tokenizers_own_call(tiny_model_dir):
    from transformers import AutoTokenizer

    from actors.rollout import encode, plain_backend

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert plain_backend(tok) is tok._tokenizer  # the tiny model's Qwen2Tokenizer takes the direct path
    for text in TEXTS:
        assert encode(tok, text) == tok(text, add_special_tokens=False)["input_ids"], text
    assert encode(tok, "<|im_end|>") == [tok.convert_tokens_to_ids("<|im_end|>")]  # special tokens stay whole


def test_encode_by_pieces_between_added_tokens_equals_the_backend(tiny_model_dir):
    import random

    from transformers import AutoTokenizer

    from actors.rollout import SpecialSplit, encode

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    backend = tok._tokenizer
    assert SpecialSplit.of(tok, backend) is not None  # NFC, the Qwen2 split regex, ByteLevel: cut at added tokens
    rng = random.Random(0)
    alphabet = list("ab Z1\n\t.<|>/_'") + ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>",
                                           "</tool_response>", "<|im_end", "im_end|>", "  ", "\u00e9", "e", "\u0301", "'s", "\U0001f600"]
    for _ in range(1500):  # pieces shared across texts come from the cache: each text still encodes as a whole would
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert encode(tok, text) == backend.encode(text, add_special_tokens=False).ids, repr(text)
    from actors.rollout import _ENCODED

    encode(tok, "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nhi")
    assert _ENCODED[tok].get(("system\nYou are terse.", False)) is not None  # the piece is kept for the next prompt
    tok.add_tokens(["<new>"])  # a token added later is cut out as well
    assert encode(tok, "a<new>b<|im_end|>") == tok("a<new>b<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<new>") in encode(tok, "a<new>b")


def test_encode_by_pieces_is_refused_where_the_pipeline_looks_past_a_piece(tiny_model_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from actors.rollout import SpecialSplit

    spec = json.loads(AutoTokenizer.from_pretrained(tiny_model_dir)._tokenizer.to_str())

    def split_of(change):
        s = json.loads(json.dumps(spec))
        change(s)
        return SpecialSplit.of(type("Key", (), {})(), Tokenizer.from_str(json.dumps(s)))

    assert split_of(lambda s: None) is not None
    assert split_of(lambda s: s["added_tokens"][2].update(lstrip=True)) is None  # <|im_end|> would eat the space before it
    assert split_of(lambda s: s["added_tokens"][1].update(single_word=True)) is None
    assert split_of(lambda s: s["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True)) is None
    assert split_of(lambda s: s.update(pre_tokenizer={"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": True})) is None
    assert split_of(lambda s: s["model"].update(dropout=0.1)) is None
    assert split_of(lambda s: s.update(normalizer={"type": "Prepend", "prepend": "\u2581"})) is None


def test_decode_remembers_what_it_decoded(tiny_model_dir):
    from transformers import AutoTokenizer

    from actors.rollout import decode, encode

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = encode(tok, TEXTS[1])
    first = decode(tok, ids)
    assert decode(tok, list(ids)) is first == tok.decode(ids, skip_special_tokens=False)


def test_decode_through_the_backend_equals_the_tokenizers_own_decode(tiny_model_dir):
    import random

    from transformers import AutoTokenizer

    from actors.rollout import decode, encode

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rng = random.Random(0)
    samples = [encode(tok, t) for t in TEXTS] + [[rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))] for _ in range(50)]
    for cleanup in (False, True):  # with the clean-up on, transformers' own decode is called
        tok.clean_up_tokenization_spaces = cleanup
        for ids in samples:  # random ids cut UTF-8 characters and put special tokens anywhere
            assert decode(tok, ids) == tok.decode(ids, skip_special_tokens=False), ids


def test_encode_takes_the_full_call_when_the_backend_would_not_match(tiny_model_dir):
    from transformers import AutoTokenizer

    from actors.rollout import encode, plain_backend

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = TEXTS[3]
    full = tok(text, add_special_tokens=False)["input_ids"]
    tok._tokenizer.enable_truncation(max_length=3)  # left on by an earlier call with truncation=True
    assert plain_backend(tok) is None
    assert encode(tok, text) == full  # transformers' call turns truncation off again first
    assert plain_backend(tok) is tok._tokenizer
    tok.split_special_tokens = True  # special tokens as text: the backend is switched before encoding
    assert plain_backend(tok) is None
    assert encode(tok, "<|im_end|>") == tok("<|im_end|>", add_special_tokens=False)["input_ids"] != [tok.convert_tokens_to_ids("<|im_end|>")]

    class Custom(type(tok)):
        def _encode_plus(self, *a, **kw):
            return super()._encode_plus(*a, **kw)

    tok.__class__ = Custom  # a subclass with its own encoding steps is always called as it is
    assert plain_backend(tok) is None
