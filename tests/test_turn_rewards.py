"""Per-turn rewards end to end: a reward returns ``turn_rewards`` -> ``Scores`` -> the actor's
trajectories (one per segment, each with its own turns) -> ``collate`` places each on its turn's
last sampled token and the outcome on the episode's last one -> token-level estimators see them.

The estimators' arithmetic with per-turn rewards is tested by hand in
``tests/test_algos_advantages.py`` (``test_compute_gae_skips_observation_tokens``,
``test_discounted_returns_skip_observation_tokens``, ``test_reinforce_plus_plus``: row 0 has a
turn reward of 0.5 before an observation token; the outcome estimators' score sums per-turn rewards
in ``G_REWARDS``); here they run on the batch of a real episode.
"""

import asyncio
import inspect
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.actor import Scorer, to_trajectories, turn_rewards_by_run
from actors.engines.base import SamplingSettings
from actors.engines.scripted import ScriptedEngine
from actors.rollout import EpisodeLimits, ToolBox, run_episode
from envs import make_agent
from envs.rewards import RewardError, RewardFn, Scores, TrajectoryInfo, get_reward, reward, run_reward
from envs.rewards import shaping
from envs.rewards.math_rewards import math_reward_string_equal
from envs.rewards.shaping import tool_error_penalty
from envs.tools import get_tool
from learner.algos.advantages import AdvantageConfig, AdvantageInputs, compute_gae, gae, reinforce_plus_plus
from learner.batch import check_alignment, collate
from protocol import messages as m

THREE_TURNS = TrajectoryInfo(messages=[], num_turns=3)


@reward("test_turn_rewards_given")
def _given(final_answer, trajectory, answer):
    return {"reward": math_reward_string_equal(final_answer, trajectory, answer), "bonus": 0.5, "turn_rewards": [0.5, np.float64(0.25)]}


@reward("test_turn_rewards_parts")
def _parts(final_answer, trajectory):
    return {"correct": 1.0, "format": 0.25, "turn_rewards": [1.0, 2.0, 3.0]}


def bad(turn_rewards):
    return RewardFn("test_bad_turns", lambda final_answer, trajectory: {"reward": 1.0, "turn_rewards": turn_rewards})


# ----------------------------------------------------------------------------- RewardFn output


def test_turn_rewards_move_out_of_the_components():
    out = get_reward("test_turn_rewards_given")("40", THREE_TURNS, answer="40")
    assert isinstance(out, Scores)
    assert out == {"reward": 1.0, "bonus": 0.5} and out.turn_rewards == [0.5, 0.25]  # shorter: turn 3 gets 0
    assert type(out.turn_rewards[1]) is float
    # without "reward" the sum is over the components only, never the turn rewards
    parts = get_reward("test_turn_rewards_parts")(None, THREE_TURNS)
    assert parts == {"correct": 1.0, "format": 0.25, "reward": 1.25} and parts.turn_rewards == [1.0, 2.0, 3.0]
    assert get_reward("math_reward_string_equal")("40", THREE_TURNS, answer="40").turn_rewards == []


@pytest.mark.parametrize(
    "turn_rewards, error, message",
    [
        ([0.0, 0.0, 0.0, 1.0], ValueError, "turn_rewards has 4 entries but the episode has 3 assistant turn(s)"),
        ([0.0, float("nan")], ValueError, "turn_rewards[1] is nan, not finite"),
        ([float("inf")], ValueError, "turn_rewards[0] is inf, not finite"),
        ([0.0, "0.5"], TypeError, "turn_rewards[1] is '0.5' (str), not a number"),
        ([True], TypeError, "turn_rewards[0] is True (bool), not a number"),
        ("0.5", TypeError, "turn_rewards must be a list of numbers (one per assistant turn), got str"),
        (0.5, TypeError, "turn_rewards must be a list of numbers (one per assistant turn), got float"),
    ],
)
def test_bad_turn_rewards_are_clear_errors(turn_rewards, error, message):
    fn = bad(turn_rewards)
    with pytest.raises(error) as e:
        fn("x", THREE_TURNS)
    assert str(e.value) == f"reward 'test_bad_turns': {message}"
    # the actor calls rewards through run_reward: the same RewardError as any failing reward
    with pytest.raises(RewardError) as e:
        asyncio.run(run_reward(fn, lambda: fn("x", THREE_TURNS), sample="s3 chain 1", timeout_s=30))
    assert str(e.value) == f"reward 'test_bad_turns' failed on sample s3 chain 1: {error.__name__}: reward 'test_bad_turns': {message}"


# ----------------------------------------------------------------------------- the built-in shaping


def test_math_tool_error_penalty_by_hand():
    info = TrajectoryInfo(messages=[], num_turns=4, turn_tool_errors=[1, 0, 2, 0])
    out = get_reward("math_tool_error_penalty")("36", info, answer="36")
    assert out == {"reward": 1.0, "tool_error_turns": 2.0} and out.turn_rewards == [-0.1, 0.0, -0.1, 0.0]
    # an external agent's episode has no per-turn tool facts: no penalty
    out = get_reward("math_tool_error_penalty")("7", TrajectoryInfo(messages=[], num_turns=2), answer="36")
    assert out == {"reward": 0.0, "tool_error_turns": 0.0} and out.turn_rewards == []


def test_tool_error_penalty_wraps_any_reward():
    shaped = RewardFn("shaped", tool_error_penalty("test_turn_rewards_given", penalty=0.125))
    info = TrajectoryInfo(messages=[], num_turns=3, turn_tool_errors=[1, 0, 1])
    out = shaped("40", info, answer="40")
    # the inner reward's turn rewards [0.5, 0.25, (0)] minus 0.125 on turns 1 and 3
    assert out == {"reward": 1.0, "bonus": 0.5, "tool_error_turns": 2.0} and out.turn_rewards == [0.375, 0.25, -0.125]
    # it takes the inner reward's dataset fields (what the preflight reads)
    assert list(inspect.signature(tool_error_penalty("qa_em")).parameters) == ["final_answer", "trajectory", "answer"]
    with pytest.raises(KeyError, match=r"needs dataset field\(s\) \['answer'\]"):
        RewardFn("qa_shaped", tool_error_penalty("qa_em"))("x", info, question="q")
    with pytest.raises(ValueError, match="penalty must be a finite number, got nan"):
        tool_error_penalty("qa_em", penalty=math.nan)


def test_environments_doc_example_is_the_registered_reward():
    doc = (Path(__file__).parent.parent / "docs" / "environments.md").read_text()
    block = re.search(r"```python\n(@reward\(\"math_tool_error_penalty\"\).*?)```", doc, re.DOTALL)
    assert block is not None, "docs/environments.md lost its per-turn reward example"
    assert block.group(1) in inspect.getsource(shaping)


# ----------------------------------------------------------------------------- turns -> runs of the loss mask


def test_turn_rewards_by_run():
    mask = [1, 1, 0, 1, 1, 1, 0, 0, 1]  # runs end at 1, 5, 8
    assert turn_rewards_by_run(mask, [1, 5, 8], [0.5, 0.0, 2.0]) == [0.5, 0.0, 2.0]
    assert turn_rewards_by_run(mask, [1, 5, 8], [0.5, 0.25, 0.0]) == [0.5, 0.25]  # trailing zeros dropped
    assert turn_rewards_by_run(mask, [1, 5, 8], [0.0, 0.0, 0.0]) == []
    # turns 2 and 3 sampled one run between them (no observation): they share it
    assert turn_rewards_by_run(mask, [1, 3, 5, 8], [1.0, 0.5, 0.25, 2.0]) == [1.0, 0.75, 2.0]
    # a turn that sampled nothing (its end is the observation before it) goes to the next run
    assert turn_rewards_by_run(mask, [1, 2, 5], [1.0, 0.5, 0.25]) == [1.0, 0.75]
    assert turn_rewards_by_run(mask, [1, 5, 8, 8], [0.0, 0.0, 0.0, 4.0]) == [0.0, 0.0, 4.0]


# ----------------------------------------------------------------------------- a real episode


def calc(name, expr):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": {"expression": expr}}) + "\n</tool_call>"


TURNS = [
    "<tool_call>\nnot json\n</tool_call>",  # unparsable: an error observation
    calc("calculator", "12*3"),  # fine
    calc("abacus", "36"),  # an unknown tool: the tool box answers with an error
    "The answer is 36.",
]


def sampled_runs(mask):
    """(first, last) index of each run of 1s, by walking the mask."""
    runs, start = [], None
    for i, v in enumerate(list(mask) + [0]):
        if v == 1 and start is None:
            start = i
        if v != 1 and start is not None:
            runs.append((start, i - 1))
            start = None
    return runs


def play(tok, turns, row):
    tools = [get_tool("calculator")]
    agent = make_agent("hf", tok, tools)
    limits = EpisodeLimits(max_turns=6, max_tokens_per_turn=64, max_response_tokens=600, max_context=4096)
    settings = SamplingSettings(max_tokens=64, stop_token_ids=(tok.eos_token_id,))
    engine = ScriptedEngine(tok, turns, tok.eos_token_id)
    return asyncio.run(run_episode(engine, agent, tok, ToolBox(tools, 30, 256, None), row, limits, settings))


def test_a_multi_turn_episode_reaches_the_batch_with_each_turn_reward_on_its_last_token(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = {"question": "What is 12*3?", "answer": "36"}
    ep = play(tok, TURNS, row)
    assert ep.finish_reason == "answer" and ep.final_answer is not None and ep.num_turns == 4
    assert ep.turn_tool_errors == [1, 0, 1, 0]
    runs = sampled_runs(ep.loss_mask)
    assert len(runs) == ep.num_turns  # what the reward counts as turns is what collate counts
    assert [last for _, last in runs] == ep.turn_ends

    # the inner reward gives turns 1 and 2 a bonus; the wrapper takes 0.125 off turns 1 and 3
    scorer = Scorer(RewardFn("shaped", tool_error_penalty("test_turn_rewards_given", penalty=0.125)), tok)
    scores = scorer(ep, row)
    assert scores == {"reward": 1.0, "bonus": 0.5, "tool_error_turns": 2.0}
    assert scores.turn_rewards == [0.375, 0.25, -0.125, 0.0]

    item = m.WorkItem(sample_id="7:0", row=row, group_size=1)
    [traj] = to_trajectories("actor-0", item, 0, ep, scores)
    wire = m.decode(m.encode(traj))
    m.check_trajectory(wire)
    check_alignment(wire)
    assert wire.reward == 1.0 and wire.turn_rewards == [0.375, 0.25, -0.125]

    batch = collate([wire], {"7:0": 0}, pad_id=tok.pad_token_id)
    P = len(ep.prompt_ids)  # response token j is target position P - 1 + j
    expected = torch.zeros_like(batch.token_rewards)
    expected[0, P - 1 + runs[0][1]] = 0.375
    expected[0, P - 1 + runs[1][1]] = 0.25
    expected[0, P - 1 + runs[2][1]] = -0.125
    expected[0, P - 1 + runs[3][1]] = 1.0  # the outcome; turn 4's own reward is 0
    assert torch.equal(batch.token_rewards, expected)
    assert batch.loss_mask[0, P - 1 + runs[3][1]] == 1 and batch.loss_mask[0, P - 1 + runs[3][1] + 1 :].sum() == 0

    # token-level estimators see them where they are. gamma = 1: every token of turn k has the
    # return of turn k's reward and everything after it
    inputs = AdvantageInputs(batch.token_rewards, batch.loss_mask, batch.group_index, values=torch.zeros_like(batch.token_rewards))
    per_turn = [0.375 + 0.25 - 0.125 + 1.0, 0.25 - 0.125 + 1.0, -0.125 + 1.0, 1.0]  # 1.5, 1.125, 0.875, 1.0
    expected_returns = torch.zeros_like(batch.token_rewards)
    for (first, last), g in zip(runs, per_turn):
        expected_returns[0, P - 1 + first : P + last] = g
    _, returns = reinforce_plus_plus(inputs, AdvantageConfig(gamma=1.0))
    assert torch.equal(returns, expected_returns)
    # GAE with a zero critic, gamma = lam = 1: advantages are those returns too; `gae` then whitens them
    adv, returns = compute_gae(inputs.token_rewards, inputs.values, inputs.response_mask, gamma=1.0, lam=1.0)
    assert torch.equal(adv, expected_returns) and torch.equal(returns, expected_returns)
    whitened, _ = gae(inputs, AdvantageConfig(gamma=1.0, lam=1.0))
    on = batch.loss_mask > 0
    v = expected_returns[on].double()
    torch.testing.assert_close(whitened[on].double(), (v - v.mean()) / v.std(), atol=1e-5, rtol=1e-5)

    # the registered built-in on the same episode: -0.1 on the two failed turns
    builtin = Scorer(get_reward("math_tool_error_penalty"), tok)(ep, row)
    assert builtin == {"reward": 1.0, "tool_error_turns": 2.0} and builtin.turn_rewards == [-0.1, 0.0, -0.1, 0.0]
    [traj] = to_trajectories("actor-0", item, 0, ep, builtin)
    rew = collate([traj], {"7:0": 0}, pad_id=tok.pad_token_id).token_rewards[0]
    assert rew.nonzero().flatten().tolist() == [P - 1 + runs[0][1], P - 1 + runs[2][1], P - 1 + runs[3][1]]
    assert rew[rew != 0].tolist() == pytest.approx([-0.1, -0.1, 1.0])


def test_more_turn_rewards_than_turns_is_refused_at_the_wire():
    traj = m.Trajectory(
        actor_id="a", sample_id="s", chain=0, prompt_ids=m.pack([1, 2], "int32"), response_ids=m.pack([3, 4, 5], "int32"),
        loss_mask=m.pack([1, 0, 1], "uint8"), logprobs=m.pack([-1.0, 0.0, -1.0], "float32"), versions=m.pack([0, -1, 0], "int32"),
        reward=1.0, reward_components={"reward": 1.0}, stats=m.EpisodeStats(num_turns=2, tool_calls={}), turn_rewards=[0.5, 0.5, 0.5],
    )
    with pytest.raises(m.ProtocolError, match=r"3 turn_rewards for 2 run\(s\) of sampled tokens"):
        m.check_trajectory(m.decode(m.encode(traj)))


# ----------------------------------------------------------------------------- a split episode


@reward("test_turn_rewards_three")
def _three(final_answer, trajectory, answer):
    return {"reward": float(final_answer == answer), "turn_rewards": [0.5, 0.25, 0.125]}


def test_each_segment_of_a_split_episode_carries_the_rewards_of_its_own_turns(tiny_model_dir, tmp_path):
    """An external harness that rewrites its history after two turns: segment 0 holds turns 1-2,
    segment 1 turn 3; the outcome goes on the last segment only."""
    pytest.importorskip("openai")
    pytest.importorskip("aiohttp")
    from transformers import AutoTokenizer

    from actors.endpoint import Endpoint
    from actors.external import ExternalRunner
    from tests.test_endpoint import REWRITING_AGENT

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    agent_file = tmp_path / "agent.py"
    agent_file.write_text(REWRITING_AGENT)
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    engine = ScriptedEngine(tok, ["40", "Yes, 40.", "40"], stop)
    runner = ExternalRunner(Endpoint(engine, tok, None), f"{agent_file}:run", timeout_s=60)
    limits = EpisodeLimits(max_turns=6, max_tokens_per_turn=64, max_response_tokens=600, max_context=2048)
    row = {"question": "What is 12*3+4?", "answer": "40"}

    async def go():
        try:
            return await runner.run_episode(engine, None, tok, None, row, limits, SamplingSettings(max_tokens=64, stop_token_ids=(stop,)))
        finally:
            await runner.close()

    ep = asyncio.run(go())
    assert ep.splits == 1 and ep.num_turns == 3
    scores = Scorer(get_reward("test_turn_rewards_three"), tok)(ep, row)
    assert scores == {"reward": 1.0} and scores.turn_rewards == [0.5, 0.25, 0.125]
    item = m.WorkItem(sample_id="s0", row=row, group_size=1)
    wire = [m.decode(m.encode(t)) for t in to_trajectories("actor-0", item, 0, ep, scores)]
    assert [(t.segment, t.num_segments, t.turn_rewards) for t in wire] == [(0, 2, [0.5, 0.25]), (1, 2, [0.125])]
    for t in wire:
        m.check_trajectory(t)

    batch = collate(wire, {"s0": 0}, pad_id=0)
    for i, (t, values) in enumerate(zip(wire, [[0.5, 0.25], [0.125 + 1.0]])):
        P = len(t.prompt_ids)
        ends = [P - 1 + last for _, last in sampled_runs(t.loss_mask.numpy())]
        assert len(ends) == len(values)  # segment 0: two turns with "Sure?" between them; segment 1: one
        row_rewards = batch.token_rewards[i]
        assert row_rewards.nonzero().flatten().tolist() == ends and row_rewards[ends].tolist() == values


# ----------------------------------------------------------------------------- ReMax's baseline


def test_remax_baseline_is_the_greedy_rollouts_score_with_its_turn_rewards(tmp_path, tiny_model_dir):
    """The sampled rows are scored by outcome + turn rewards, so the greedy baseline is too
    (a greedy chain split in two segments: its outcome once, both segments' turn rewards)."""
    import msgspec

    from tests.learner_support import learner_config, make_traj, make_trajs, trainer_world_1

    trajs = make_trajs()  # prompts 0:0 and 0:1, 4 chains each, two turns (two runs of sampled tokens)
    trajs[0] = msgspec.structs.replace(trajs[0], turn_rewards=[0.25, -0.5])
    g0 = make_traj("0:0", 4, 1.0, seed=90, greedy=True)
    g1 = make_traj("0:1", 4, 0.0, seed=91, greedy=True)
    split = [msgspec.structs.replace(g0, turn_rewards=[0.25], segment=0, num_segments=2),
             msgspec.structs.replace(g0, turn_rewards=[0.0, 0.5], segment=1, num_segments=2)]
    trajs += split + [msgspec.structs.replace(g1, turn_rewards=[-0.125])]
    cfg = learner_config(tiny_model_dir, tmp_path, "algorithm.adv_estimator=remax")
    with trainer_world_1(cfg) as trainer:
        batch = trainer.step_batch(trajs).batch
    assert batch.baseline_rewards.tolist() == [1.75] * 4 + [-0.125] * 4  # 1 + 0.25 + 0.5; 0 - 0.125
    # row 0's score is its outcome plus its turn rewards: 1 + 0.25 - 0.5
    assert batch.token_rewards[0].sum().item() == 0.75


def test_sampled_run_ends_are_the_turns_of_a_mask():
    from protocol.messages import sampled_run_ends

    assert sampled_run_ends([1, 1, 0, 1, 0, 0, 1]) == [1, 3, 6]
    assert sampled_run_ends([0, 1, 1, 0]) == [2]
    assert sampled_run_ends([0, 0]) == [] and sampled_run_ends([]) == []
    assert sampled_run_ends(np.array([1], dtype=np.int8)) == [0]
