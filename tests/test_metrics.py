"""Learner metrics computed from trajectories, checked by hand."""

import pytest

from learner.metrics import reward_metrics, staleness_metrics
from protocol import messages as m


def traj(reward, components, tools, turns, n_resp, truncated=False):
    return m.Trajectory(
        actor_id="a", sample_id="0:0", chain=0, prompt_ids=m.pack([1], "int32"),
        response_ids=m.pack([2] * n_resp, "int32"), loss_mask=m.pack([1] * n_resp, "uint8"),
        logprobs=m.pack([-1.0] * n_resp, "float32"), versions=m.pack([0] * n_resp, "int32"),
        reward=reward, reward_components=components,
        stats=m.EpisodeStats(num_turns=turns, tool_calls=tools, truncated=truncated, gen_tokens=n_resp, gen_time_s=1.0),
    )


def test_reward_and_episode_metrics_by_hand():
    trajs = [
        traj(1.1, {"reward": 1.1, "correct": 1.0, "format": 0.1}, {"calculator": 2}, 3, 10),
        traj(0.1, {"reward": 0.1, "correct": 0.0, "format": 0.1}, {}, 1, 30, truncated=True),
    ]
    out = reward_metrics(trajs, None)
    assert out["reward/mean"] == pytest.approx(0.6) and out["reward/min"] == pytest.approx(0.1)
    assert out["reward/std"] == pytest.approx(0.5)
    assert out["reward/correct"] == pytest.approx(0.5) and out["reward/format"] == pytest.approx(0.1)
    assert out["episode/tool_calls/calculator"] == 1.0  # 2 calls over 2 episodes
    assert out["episode/tool_use_rate"] == 0.5 and out["episode/truncated_rate"] == 0.5
    assert out["episode/turns"] == 2.0 and out["episode/response_tokens"] == 20.0
    assert out["monitor/format_reward_share"] == pytest.approx(0.2 / 1.2)  # format terms' share of all reward
    assert out["monitor/length_reward_corr"] == pytest.approx(-1.0)  # longer response, lower reward


def test_staleness_histogram():
    out = staleness_metrics([0, 1, 1, 2])
    assert out == {"staleness/hist_0": 0.25, "staleness/hist_1": 0.5, "staleness/hist_2": 0.25, "staleness/mean": 1.0, "staleness/max": 2}
