import asyncio
import threading
import time

import pytest

from envs.rewards import RewardError, RewardFn, TrajectoryInfo, abandoned_reward_threads, get_reward, reward, run_reward

TRAJ = TrajectoryInfo(messages=[], num_turns=1, tool_calls=[], truncated=False, response_text="")


@pytest.mark.parametrize(
    "final,answer,expected",
    [
        ("The answer is 5535", "5535", 1.0),
        ("so 1,234 apples", "1234", 1.0),
        ("total 18.0", "18", 1.0),
        ("it is 12 then 13", "12", 0.0),
        ("no number", "3", 0.0),
        (None, "3", 0.0),
        ("-7", "-7", 1.0),
    ],
)
def test_math_reward_string_equal(final, answer, expected):
    assert get_reward("math_reward_string_equal")(final, TRAJ, answer=answer) == {"reward": expected}


def test_gsm8k_reward_reads_hash_line():
    row = {"question": "q", "answer": "She sells 16 - 3 - 4 = 9 eggs.\n9 * 2 = $18.\n#### 18"}
    fn = get_reward("gsm8k_reward")
    assert fn("She makes $18 a day.", TRAJ, **row) == {"reward": 1.0}
    assert fn("She makes $9 a day.", TRAJ, **row) == {"reward": 0.0}
    assert fn("1,000", TRAJ, question="q", answer="#### 1,000") == {"reward": 1.0}


def test_reward_dict_normalisation_and_field_selection():
    @reward("test_parts_no_total")
    def parts(final_answer, trajectory, answer):
        return {"correct": 1.0, "format": 0.25}

    @reward("test_parts_with_total")
    def with_total(final_answer, trajectory, **kwargs):
        return {"reward": 2.0, "correct": 1.0, "n_fields": float(len(kwargs))}

    assert get_reward("test_parts_no_total")("x", TRAJ, answer="1", other="ignored") == {
        "correct": 1.0,
        "format": 0.25,
        "reward": 1.25,
    }
    assert get_reward("test_parts_with_total")("x", TRAJ, a=1, b=2) == {"reward": 2.0, "correct": 1.0, "n_fields": 2.0}


def test_missing_field_names_it():
    with pytest.raises(KeyError, match="answer"):
        get_reward("gsm8k_reward")("1", TRAJ, question="q")


def test_dotted_path_reward():
    fn = get_reward("envs.rewards.math_rewards:math_reward_string_equal")
    assert fn("7", TRAJ, answer="7") == {"reward": 1.0}
    with pytest.raises(KeyError):
        get_reward("no_such_reward")


# ----------------------------------------------------------------------------- step 2 rewards

from envs.monitors import EpisodeSummary, monitor_batch  # noqa: E402


@pytest.mark.parametrize(
    "final,answer,expected",
    [
        ("The answer is $\\frac{1}{2}$", "0.5", 1.0),
        ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
        ("so she makes 18 dollars", "Work...\n#### 18", 1.0),
        ("\\boxed{3}", "4", 0.0),
        (None, "4", 0.0),
    ],
)
def test_math_reward_equivalence(final, answer, expected):
    assert get_reward("math_reward")(final, TRAJ, answer=answer) == {"reward": expected}


def test_math_reward_format_components():
    with_tool = TrajectoryInfo(messages=[], num_turns=2, tool_calls=["calculator"], truncated=False, response_text="")
    out = get_reward("math_reward_format")("\\boxed{4}", with_tool, answer="4")
    assert out == {"correct": 1.0, "format": 0.1, "tool": 0.1, "reward": pytest.approx(1.2)}
    out = get_reward("math_reward_format")("\\boxed{5}", TRAJ, answer="4")
    assert out == {"correct": 0.0, "format": 0.1, "tool": 0.0, "reward": pytest.approx(0.1)}


def test_qa_rewards_squad_normalisation():
    em, f1 = get_reward("qa_em"), get_reward("qa_f1_reward")
    assert em("The Eiffel Tower!", TRAJ, answer="eiffel tower") == {"reward": 1.0}
    assert em("Eiffel", TRAJ, answer=["tour eiffel", "eiffel tower"]) == {"reward": 0.0}
    # pred tokens {eiffel, tower, paris}, gold {eiffel, tower}: P=2/3, R=1, F1=0.8
    assert f1("the Eiffel tower, Paris", TRAJ, answer="Eiffel Tower") == {"reward": pytest.approx(0.8)}
    assert f1(None, TRAJ, answer="x") == {"reward": 0.0}


def test_code_reward_fraction_passed_and_early_exit_does_not_pass():
    fn = get_reward("code_reward")
    tests = ["assert double(2) == 4", "assert double(-1) == -2", "assert double(3) == 7"]
    answer = "Here:\n```python\ndef double(x):\n    return 2 * x\n```"
    assert fn(answer, TRAJ, tests=tests) == {"reward": pytest.approx(2 / 3)}
    assert fn("import os\nos._exit(0)", TRAJ, tests=tests) == {"reward": 0.0}
    assert fn(None, TRAJ, tests=tests) == {"reward": 0.0}


def test_monitors_hand_computed():
    batch = [
        EpisodeSummary(reward={"reward": 1.2, "correct": 1.0, "format": 0.1, "tool": 0.1}, tool_calls=["calculator"], num_turns=2, response_length=10),
        EpisodeSummary(reward={"reward": 0.1, "correct": 0.0, "format": 0.1, "tool": 0.0}, tool_calls=[], num_turns=1, response_length=20),
        EpisodeSummary(reward={"reward": 0.2, "correct": 0.0, "format": 0.1, "tool": 0.1}, tool_calls=["calculator", "calculator", "search"], num_turns=4, response_length=30),
    ]
    m = monitor_batch(batch)
    assert m["monitor/tool_use_rate/calculator"] == pytest.approx(2 / 3)
    assert m["monitor/tool_calls_per_episode/calculator"] == pytest.approx(1.0)
    assert m["monitor/tool_use_rate/search"] == pytest.approx(1 / 3)
    assert m["monitor/format_reward_share"] == pytest.approx(0.5 / 1.5)
    # lengths 10,20,30 (mean 20), rewards 1.2,0.1,0.2 (mean 0.5): sxy=-10, sxx=200, syy=0.74
    assert m["monitor/length_reward_corr"] == pytest.approx(-10 / (200 * 0.74) ** 0.5)
    assert m["monitor/mean_turns"] == pytest.approx(7 / 3)


# ----------------------------------------------------------------------------- run_reward: timeouts and errors


def _wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


def test_hung_reward_is_an_error_naming_reward_and_sample_while_it_still_hangs():
    release = threading.Event()
    entered = threading.Event()

    def hangs(final_answer, trajectory):
        entered.set()
        release.wait(120)
        return 1.0

    fn = RewardFn("hangs_forever", hangs, timeout_s=0.3)
    before = abandoned_reward_threads()
    try:
        with pytest.raises(RewardError) as info:
            asyncio.run(run_reward(fn, lambda: fn("x", TRAJ), sample="gsm8k-17 chain 2"))
        assert entered.is_set() and not release.is_set()  # reported while the reward is still stuck
        message = str(info.value)
        assert "reward 'hangs_forever'" in message and "sample gsm8k-17 chain 2" in message and "0.3 s" in message
        assert (info.value.reward, info.value.sample) == ("hangs_forever", "gsm8k-17 chain 2")
        assert abandoned_reward_threads() == before + 1
    finally:
        release.set()
    _wait_until(lambda: abandoned_reward_threads() == before, 30, "the abandoned reward thread to return")


@pytest.mark.parametrize("exc", [ValueError("bad row"), SystemExit(2), KeyboardInterrupt(), asyncio.CancelledError()])
def test_reward_raising_anything_is_a_reward_error(exc):
    def raises(final_answer, trajectory):
        raise exc

    fn = RewardFn("raises", raises, timeout_s=30)

    async def main():
        ticker = asyncio.create_task(asyncio.sleep(0.01, result="loop alive"))
        with pytest.raises(RewardError) as info:
            await run_reward(fn, lambda: fn("x", TRAJ), sample="s1 chain 0")
        return info.value, await ticker

    error, tick = asyncio.run(main())
    assert str(error).startswith(f"reward 'raises' failed on sample s1 chain 0: {type(exc).__name__}")
    assert error.__cause__ is exc and tick == "loop alive"


def test_run_reward_returns_the_scores_and_cancellation_passes_through():
    fn = get_reward("math_reward_string_equal", timeout_s=30)
    assert fn.timeout_s == 30
    assert asyncio.run(run_reward(fn, lambda: fn("it is 7", TRAJ, answer="7"), sample="a")) == {"reward": 1.0}

    release = threading.Event()
    slow = RewardFn("slow", lambda final_answer, trajectory: release.wait(60) and 1.0, timeout_s=60)

    async def cancel_it():
        task = asyncio.create_task(run_reward(slow, lambda: slow("x", TRAJ), sample="b"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(cancel_it())
    finally:
        release.set()
    with pytest.raises(ValueError, match="positive timeout_s"):
        asyncio.run(run_reward(get_reward("qa_em"), lambda: {}, sample="c"))


def test_reward_timeout_is_a_config_key():
    from configs.loader import load_config

    assert load_config().reward.timeout_s == 120.0
    assert load_config([], ["reward.timeout_s=2.5"]).reward.timeout_s == 2.5


def test_code_reward_wait_is_bounded():
    from envs.rewards.code import _run_in_thread, run_deadline_s

    with pytest.raises(TimeoutError, match="stuck did not finish within 0.2 s"):
        _run_in_thread(asyncio.sleep(600), 0.2, "stuck")
    assert _run_in_thread(asyncio.sleep(0, result=7), 30, "quick") == 7
    assert run_deadline_s(1) < run_deadline_s(5)


def test_reward_threads_are_reused_and_a_stuck_one_holds_only_itself():
    fn = RewardFn("threaded", get_reward("math_reward_string_equal").fn, timeout_s=30)  # not inline: a reward thread
    names = []

    def scored():
        names.append(threading.current_thread().ident)
        return fn("it is 7", TRAJ, answer="7")

    for _ in range(5):  # one after the other: each call finds the previous call's thread idle
        assert asyncio.run(run_reward(fn, scored, sample="a")) == {"reward": 1.0}
        time.sleep(0.05)  # the worker goes back to waiting after handing over its result
    assert len(set(names)) == 1

    release, entered = threading.Event(), threading.Event()
    stuck = RewardFn("stuck", lambda final_answer, trajectory: (entered.set(), release.wait(60))[1] and 1.0, timeout_s=0.2)
    try:
        with pytest.raises(RewardError):
            asyncio.run(run_reward(stuck, lambda: stuck("x", TRAJ), sample="b"))
        assert entered.is_set()
        # the stuck call took the idle thread: the next call gets a new one and is not held up
        assert asyncio.run(run_reward(fn, scored, sample="c")) == {"reward": 1.0}
        assert len(names) == 6 and names[-1] != names[0]
    finally:
        release.set()


def test_an_inline_reward_is_called_in_place_and_its_errors_are_reward_errors():
    assert get_reward("math_reward_string_equal").inline and get_reward("gsm8k_reward").inline
    assert not get_reward("math_reward").inline and not get_reward("qa_em").inline  # sympy, or not declared bounded
    ran_on = []

    def scored(final_answer, trajectory):
        ran_on.append(threading.current_thread())
        if final_answer is None:
            raise ValueError("no answer")
        return {"reward": 0.5, "format": 1.0}

    fn = RewardFn("in_place", scored, timeout_s=30, inline=True)
    assert asyncio.run(run_reward(fn, lambda: fn("x", TRAJ), sample="s0")) == {"reward": 0.5, "format": 1.0}
    assert ran_on == [threading.main_thread()]  # no reward thread
    with pytest.raises(RewardError, match="reward 'in_place' failed on sample s1 chain 0: ValueError: no answer") as info:
        asyncio.run(run_reward(fn, lambda: fn(None, TRAJ), sample="s1 chain 0"))
    assert (info.value.reward, info.value.sample) == ("in_place", "s1 chain 0")


def test_the_actors_scorer_decodes_the_response_only_for_a_reward_that_reads_it():
    from actors.actor import Scorer
    from actors.rollout import Episode

    class CountingTokenizer:  # decode is all a Scorer asks of its tokenizer
        decodes = 0
        clean_up_tokenization_spaces = True

        def decode(self, ids, skip_special_tokens=False):
            self.decodes += 1
            return " ".join(map(str, ids))

    ep = Episode(prompt_ids=[1], response_ids=[7, 8, 9], loss_mask=[1, 1, 1], num_turns=1, final_answer="7")
    tok = CountingTokenizer()
    outcome = Scorer(get_reward("math_reward_string_equal"), tok)(ep, {"answer": "7"})
    assert outcome == {"reward": 1.0} and tok.decodes == 0

    def reads(final_answer, trajectory, **row):
        return float(trajectory.response_text == "7 8 9" and trajectory.response_text == "7 8 9")

    assert Scorer(RewardFn("reads", reads, 5.0, inline=True), tok)(ep, {})["reward"] == 1.0 and tok.decodes == 1  # decoded once, at the first read
    given = TrajectoryInfo(messages=[], num_turns=1, response_text="as given")
    assert given.response_text == "as given" and TRAJ.response_text == ""
