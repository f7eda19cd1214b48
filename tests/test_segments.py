"""Split episodes: a chain that arrives as several training sequences (``Trajectory.segment``).

An external agent's harness that rewrites history splits its episode
(``actors/endpoint.py``); every segment is sent and trained. These tests follow
one split chain across the wire, through the coordinator (a chain is complete
when all its segments arrived; whole-group refusal and requeue still hold),
into ``collate`` (the outcome reward once, at the end of the chain) and the
advantage estimators (``over_chains``: group statistics over chains, every
segment gets its chain's advantage), with values worked by hand, and through
a real train_step (mini-batches sized by episodes, not rows).
"""

import math

import msgspec
import pytest
import torch

from learner import algos
from learner.batch import collate, over_chains
from learner.coordinator import Coordinator, DataStream, complete_chains
from protocol import messages as m


def traj(sid, chain, reward=1.0, segment=0, num_segments=1, sampled=1, version=0, actor="a0"):
    """A trajectory whose response is ``sampled`` sampled tokens then one observation token."""
    mask = [1] * sampled + [0]
    return m.Trajectory(
        actor_id=actor, sample_id=sid, chain=chain,
        prompt_ids=m.pack([1, 2], "int32"), response_ids=m.pack([5] * sampled + [7], "int32"),
        loss_mask=m.pack(mask, "uint8"), logprobs=m.pack([-1.0] * sampled + [0.0], "float32"),
        versions=m.pack([version] * sampled + [-1], "int32"), reward=reward, reward_components={"reward": reward},
        stats=m.EpisodeStats(num_turns=1, tool_calls={}), segment=segment, num_segments=num_segments,
    )


# ----------------------------------------------------------------- the wire


def test_segment_fields_cross_the_wire_and_default_for_older_senders():
    t = m.decode(m.encode(traj("s", 0, segment=1, num_segments=3)))
    assert (t.segment, t.num_segments) == (1, 3)
    fields = msgspec.msgpack.decode(m.encode(traj("s", 0)))
    old = msgspec.msgpack.encode({k: v for k, v in fields.items() if k not in ("segment", "num_segments")})
    t = m.decode(old)  # a sender that predates the fields: one sequence per chain
    assert (t.segment, t.num_segments) == (0, 1)


@pytest.mark.parametrize("segment,num_segments", [(1, 1), (-1, 2), (0, 0), (3, 2)])
def test_a_segment_outside_its_count_is_a_protocol_error(segment, num_segments):
    with pytest.raises(m.ProtocolError, match="segment"):
        m.decode(m.encode(traj("s", 0, segment=segment, num_segments=num_segments)))


# ----------------------------------------------------------------- coordinator


def coordinator(group_size=2, batch_groups=1, rows=5):
    c = Coordinator(DataStream([{"question": f"q{i}"} for i in range(rows)], shuffle=False, seed=0),
                    batch_groups=batch_groups, group_size=group_size, max_staleness=0, peer_timeout_s=60)
    c.on_request("p", m.Register(actor_id="a0", host="h", pid=1, engine="x"))
    return c


def ask(c, n=1):
    return c.on_request("p", m.WorkRequest(actor_id="a0", version=0, max_groups=n)).items


def test_a_group_completes_only_when_every_segment_of_every_chain_arrived():
    c = coordinator(group_size=2)
    sid = ask(c)[0].sample_id
    c.on_trajectory(traj(sid, 0, segment=1, num_segments=2))  # segments may arrive in any order
    c.on_trajectory(traj(sid, 1))
    assert not c.complete and complete_chains(c.partial[sid]) == 1  # two trajectories, but chain 0 lacks a segment
    c.on_trajectory(traj(sid, 0, segment=1, num_segments=2))  # the same segment again
    assert c.counters["trajectories_duplicate"] == 1 and not c.complete
    c.on_trajectory(traj(sid, 0, segment=0, num_segments=3))  # disagrees with its chain's count
    assert c.counters["trajectories_bad_segments"] == 1 and not c.complete
    c.on_trajectory(traj(sid, 0, segment=0, num_segments=2))
    batch, _ = c.take_batch(timeout_s=1)
    [(got, group)] = batch
    assert got == sid and sorted((t.chain, t.segment) for t in group) == [(0, 0), (0, 1), (1, 0)]


def test_a_split_group_with_a_misaligned_segment_is_requeued_whole():
    c = coordinator(group_size=1)
    c.max_group_refusals = 1
    bad = msgspec.structs.replace(traj("x", 0, segment=1, num_segments=2), versions=m.pack([0, 0], "int32"),
                                  logprobs=m.pack([-1.0, -1.0], "float32"))  # an observation token with a version and a log-prob
    for attempt in range(2):
        sid = ask(c)[0].sample_id
        assert sid == "0:0"  # the refused group comes back first
        c.on_trajectory(traj(sid, 0, segment=0, num_segments=2))
        assert not c.complete and c.counters["groups_refused"] == attempt
        c.on_trajectory(msgspec.structs.replace(bad, sample_id=sid))
        assert not c.complete and c.counters["groups_refused"] == attempt + 1 and sid not in c.partial
    assert c.failed_samples[0][0] == "0:0" and ask(c)[0].sample_id == "0:1"


def test_a_dead_actors_half_received_chain_is_requeued():
    c = coordinator(group_size=1)
    sid = ask(c)[0].sample_id
    c.on_trajectory(traj(sid, 0, segment=0, num_segments=2))
    c.on_tick(c.actors["a0"].last_seen + 61)  # silent past peer_timeout_s
    assert sid not in c.partial and list(c.stream.requeue) == [sid]


# ----------------------------------------------------------------- collate and advantages

# Prompt A: chain 0 split in two segments (2 sampled tokens, then 1), reward 1; chain 1 whole, reward 0.
# Prompt B: chains of rewards 1, 1, 0, none split.
ROWS = [
    traj("A", 0, 1.0, segment=0, num_segments=2, sampled=2),
    traj("A", 1, 0.0),
    traj("A", 0, 1.0, segment=1, num_segments=2, sampled=1),
    traj("B", 0, 1.0), traj("B", 1, 1.0), traj("B", 2, 0.0),
]


def laid_out():
    batch = collate(ROWS, {"A": 0, "B": 1}, pad_id=0)
    inputs = algos.AdvantageInputs(batch.token_rewards, batch.loss_mask, batch.group_index)
    return batch, inputs


def per_row(adv, mask):
    """The one advantage each row carries on all its sampled tokens."""
    out = []
    for a, k in zip(adv, mask):
        values = set(a[k > 0].tolist())
        assert len(values) == 1
        out.append(values.pop())
    return out


def test_collate_puts_the_outcome_once_at_the_end_of_the_chain():
    batch, _ = laid_out()
    assert batch.chain_index.tolist() == [0, 1, 0, 2, 3, 4] and batch.segment_index.tolist() == [0, 0, 1, 0, 0, 0]
    assert batch.token_rewards.sum(-1).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]  # not on segment 0 of A#0
    assert batch.rewards.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0]  # every segment carries its chain's reward
    # the outcome sits on the last sampled token of the last segment: target position P - 1 + 0
    assert batch.token_rewards[2, 1] == 1.0 and batch.loss_mask[2].tolist()[:3] == [0.0, 1.0, 0.0]


def test_grpo_counts_chains_not_segments():
    batch, inputs = laid_out()
    adv, returns = over_chains(algos.grpo, inputs, algos.AdvantageConfig(eps=0.0), batch.chain_index, batch.segment_index)
    # A: scores 1, 0 -> mean 1/2, unbiased std sqrt(2 * (1/2)^2 / 1) = 1/sqrt 2 -> +-(1/2) * sqrt 2
    # B: scores 1, 1, 0 -> mean 2/3, std sqrt(((1/3)^2 * 2 + (2/3)^2) / 2) = 1/sqrt 3 -> 1/sqrt 3, 1/sqrt 3, -2/sqrt 3
    h, t = math.sqrt(2) / 2, 1 / math.sqrt(3)
    assert per_row(adv, batch.loss_mask) == pytest.approx([h, -h, h, t, t, -2 * t], abs=1e-6)
    assert torch.equal(adv, returns) and bool((adv[batch.loss_mask == 0] == 0).all())
    # over segments (each row its own episode) A's statistics would be wrong: rows 0, 1 score 0, row 2 scores 1
    wrong = per_row(algos.grpo(inputs, algos.AdvantageConfig(eps=0.0))[0], batch.loss_mask)
    assert wrong[0] != pytest.approx(h)


def test_rloo_gives_every_segment_its_chains_advantage():
    batch, inputs = laid_out()
    adv, _ = over_chains(algos.rloo, inputs, algos.AdvantageConfig(), batch.chain_index, batch.segment_index)
    # A: 1 - 0 = 1 and 0 - 1 = -1;  B: 1 - (1 + 0) / 2 = 1/2, 1/2, 0 - 1 = -1
    assert per_row(adv, batch.loss_mask) == pytest.approx([1.0, -1.0, 1.0, 0.5, 0.5, -1.0])


def test_token_level_returns_flow_back_across_the_split():
    batch, inputs = laid_out()
    returns = over_chains(algos.reinforce_plus_plus, inputs, algos.AdvantageConfig(gamma=0.5), batch.chain_index, batch.segment_index)[1]
    # A#0's sampled tokens, in episode order: segment 0's two, then segment 1's one (reward 1):
    # returns 0.25, 0.5 (discounted once per sampled token, the observation and prompt in between skipped), 1
    assert returns[0][batch.loss_mask[0] > 0].tolist() == pytest.approx([0.25, 0.5])
    assert returns[2][batch.loss_mask[2] > 0].tolist() == pytest.approx([1.0])


def test_without_a_split_over_chains_is_the_estimator_itself():
    rows = [traj("A", 0, 1.0), traj("A", 1, 0.0, sampled=2)]
    batch = collate(rows, {"A": 0}, pad_id=0)
    inputs = algos.AdvantageInputs(batch.token_rewards, batch.loss_mask, batch.group_index)
    cfg = algos.AdvantageConfig()
    for fn in (algos.grpo, algos.rloo, algos.reinforce_plus_plus):
        got = over_chains(fn, inputs, cfg, batch.chain_index, batch.segment_index)
        want = fn(inputs, cfg)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_gae_bootstraps_across_the_split():
    batch, _ = laid_out()
    values = torch.full(batch.token_rewards.shape, 0.25)
    inputs = algos.AdvantageInputs(batch.token_rewards, batch.loss_mask, batch.group_index, values=values)
    _, returns = over_chains(algos.gae, inputs, algos.AdvantageConfig(gamma=1.0, lam=1.0), batch.chain_index, batch.segment_index)
    # gamma = lam = 1: every action token's return is the reward still to come in its episode, so both
    # segments of A#0 return its outcome 1 (segment 0 alone would return 0); A#1 and B#2 return 0
    assert per_row(returns, batch.loss_mask) == pytest.approx([1.0, 0.0, 1.0, 1.0, 1.0, 0.0])


def test_remax_takes_the_baseline_per_chain():
    batch, _ = laid_out()
    baselines = torch.tensor([0.5, 0.5, 0.5, 0.25, 0.25, 0.25])
    inputs = algos.AdvantageInputs(batch.token_rewards, batch.loss_mask, batch.group_index, baseline_rewards=baselines)
    adv, _ = over_chains(algos.remax, inputs, algos.AdvantageConfig(), batch.chain_index, batch.segment_index)
    assert per_row(adv, batch.loss_mask) == pytest.approx([0.5, -0.5, 0.5, 0.75, 0.75, -0.25])


# ----------------------------------------------------------------- through the trainer


def test_train_step_gives_both_segments_their_chains_advantage_and_counts_episodes_for_mini_batches(tmp_path, tiny_model_dir):
    """A real (world size 1) train_step on 2 prompts x 4 chains with chain 0:0#0 split in two:
    both of its rows get the chain's GRPO advantage, and the mini-batches hold
    ``ppo_mini_batch_size`` groups' worth of rows (2 mini-batches of 5 and 4 rows, not 4 + 4 + 1)."""
    from learner import trainer as t
    from tests.learner_support import learner_config, make_traj, make_trajs, trainer_world_1

    trajs = make_trajs()
    trajs[0] = msgspec.structs.replace(trajs[0], num_segments=2)
    trajs.append(msgspec.structs.replace(make_traj("0:0", 0, 1.0, seed=77), segment=1, num_segments=2))
    cfg = learner_config(tiny_model_dir, tmp_path, "algorithm.adv_estimator=grpo", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8")
    seen = []

    def spy(*args):
        out = t_over_chains(*args)
        seen.append(out[0])
        return out

    t_over_chains, t.over_chains = t.over_chains, spy
    try:
        with trainer_world_1(cfg) as trainer:
            batch = trainer.step_batch(trajs).batch
            lengths = batch.attention_mask.sum(-1)
            assert [len(mb[0].idx) for mb in trainer.policy_plan(batch.loss_mask, lengths, episodes=8)] == [5, 4]
            assert len(trainer.policy_plan(batch.loss_mask, lengths)) == 3  # rows counted as episodes
            stats = trainer.train_step(batch)
    finally:
        t.over_chains = t_over_chains
    assert math.isfinite(stats["actor/grad_norm"])
    [adv] = seen
    rows = [i for i, tr in enumerate(trajs) if (tr.sample_id, tr.chain) == ("0:0", 0)]
    # group 0:0 scores 1, 0, 0, 1: mean 1/2, unbiased std sqrt(4 * (1/2)^2 / 3) -> (1/2) / std = sqrt(3) / 2
    assert rows == [0, 8]
    for i in rows:
        assert adv[i][batch.loss_mask[i] > 0].tolist() == pytest.approx([math.sqrt(3) / 2] * 9, abs=1e-5)
