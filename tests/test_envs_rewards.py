import pytest

from envs.rewards import TrajectoryInfo, get_reward, reward

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
