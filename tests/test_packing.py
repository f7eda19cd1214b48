"""The shared-prefix layout (``learner.packing``): a group's prompt runs through the model once."""

import msgspec
import pytest
import torch

from learner.batch import group_prefixes
from learner.packing import prefix_layout
from protocol import messages as m
from tests.learner_support import learner_config, make_trajs, trainer_world_1


def _layout(rows: list[list[int]], groups: list[int]):
    """``prefix_layout`` of right-padded ``rows``, their shared prefixes found as collate does."""
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    lengths = [len(r) for r in rows]
    return prefix_layout(ids, lengths, groups, group_prefixes(ids.numpy(), lengths, groups).tolist())


def _layout_of(mb):
    return prefix_layout(mb.input_ids, mb.host_lengths.tolist(), mb.host_groups.tolist(), mb.shared_prefix.tolist())


def test_group_prefixes_by_hand():
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 0], [7, 8, 0, 0], [1, 9, 9, 9]]).numpy()
    assert group_prefixes(ids, [4, 3, 2, 4], [0, 0, 1, 2]).tolist() == [2, 2, 2, 4]
    assert group_prefixes(ids, [4, 3, 2, 4], [0, 0, 0, 0]).tolist() == [0, 0, 0, 0]
    assert group_prefixes(ids, [4, 3, 2, 4], [0, 0, 1, 0]).tolist() == [1, 1, 2, 1]


def test_layout_of_one_group_by_hand():
    """Three rows sharing [1, 2, 3]: one sequence of the prefix, then each row's remaining tokens at
    their own positions; a suffix sees the prefix and itself, causally, and no other suffix."""
    lay = _layout([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9], [1, 2, 3, 8]], [0, 0, 0])
    assert lay.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 4, 9, 8]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4, 3]]
    assert lay.source.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 6, 7, 0], [0, 1, 2, 8, 0, 0]]
    assert lay.tokens == 9  # the padded batch: 3 x 6 = 18 slots
    sees = lay.attention_mask[0, 0]
    assert sees.shape == (9, 9)
    assert [j for j in range(9) if sees[7, j]] == [0, 1, 2, 6, 7]  # row 1's "9": the prefix, then its own "4"
    assert [j for j in range(9) if sees[8, j]] == [0, 1, 2, 8]
    assert [j for j in range(9) if sees[5, j]] == [0, 1, 2, 3, 4, 5]
    assert [j for j in range(9) if sees[1, j]] == [0, 1]


def test_layout_pads_groups_to_the_longest_and_padding_sees_only_itself():
    lay = _layout([[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 9, 10, 11, 13], [5, 6, 7, 8, 9, 10, 1, 2],
                   [3, 4, 9, 9, 9, 9, 9, 9], [3, 4, 9, 9, 9, 9, 9, 8]], [0, 0, 0, 1, 1])
    assert lay.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 11, 13, 1, 2], [3, 4, 9, 9, 9, 9, 9, 9, 8, 0, 0, 0]]
    assert lay.position_ids[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 7, 0, 0, 0]
    assert lay.tokens == 12 + 9
    pad = lay.attention_mask[1, 0, 9:]
    assert pad.sum(-1).tolist() == [1, 1, 1] and bool(pad[:, 9:].diagonal().all())
    assert lay.source[4].tolist() == [12 + k for k in range(7)] + [12 + 8]


def test_no_layout_where_it_runs_no_fewer_tokens():
    """Rows that share nothing: the group's sequence is as long as the rows end to end, no smaller
    than the padded batch."""
    assert _layout([[1, 2, 3], [4, 5, 6]], [0, 0]) is None
    # a long response after a short shared prefix: fewer tokens, but a mask larger than the padded one's
    assert _layout([[1] + list(range(10, 40)), [1] + list(range(40, 70)), [1] + list(range(70, 100))], [0, 0, 0]) is None


def _shared_prompt_trajs() -> list[m.Trajectory]:
    """make_trajs' two groups of 4 chains, each group's chains given one 20-token prompt (one chain
    a 3-token longer one that starts with it: the shared prefix is measured, not assumed)."""
    trajs = make_trajs()
    prompts = {"0:0": list(range(30, 50)), "0:1": list(range(100, 120))}
    out = [msgspec.structs.replace(t, prompt_ids=m.pack(prompts[t.sample_id], "int32")) for t in trajs]
    out[2] = msgspec.structs.replace(out[2], prompt_ids=m.pack(prompts["0:0"] + [7, 8, 9], "int32"))
    return out


@pytest.mark.parametrize("micro", [3, 8])
def test_shared_prefix_gives_the_logprobs_and_gradient_of_the_padded_forward(tmp_path, tiny_model_dir, micro):
    """``next_token_logits(share_prefix=True)`` on rows whose groups share a prompt: the same
    log-probs and entropies as the padded forward at every real position (1e-5), and the same
    gradient of a loss over them (1e-6); micro-batches of 3 rows straddle the two groups."""
    from learner.reference import next_token_logits

    cfg = learner_config(tiny_model_dir, tmp_path, "actor_rollout_ref.model.share_prefix=false")
    with trainer_world_1(cfg) as trainer:
        batch = trainer.step_batch(_shared_prompt_trajs()).batch
        for start in range(0, len(batch), micro):
            mb = batch.select(list(range(start, min(start + micro, len(batch)))))
            every = mb.attention_mask[:, 1:] > 0
            assert _layout_of(mb) is not None
            got = {}
            for share in (False, True):
                trainer.optimizer.zero_grad(set_to_none=True)
                out = next_token_logits(trainer.model, mb, 0.7, every, share_prefix=share)
                lp, ent = out.logprobs(), out.entropy()
                (lp.sum() / every.sum() + 0.1 * ent.mean()).backward()
                got[share] = lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
            torch.testing.assert_close(got[True][0], got[False][0], rtol=0, atol=1e-5)
            torch.testing.assert_close(got[True][1], got[False][1], rtol=0, atol=1e-5)
            for name, g in got[False][2].items():
                torch.testing.assert_close(got[True][2][name], g, rtol=0, atol=1e-6, msg=name)


def test_shared_prefix_train_step_matches_the_padded_one(tmp_path, tiny_model_dir, monkeypatch):
    """One train step (one mini-batch of 3-row micro-batches that straddle the groups; entropy
    and KL loss on, so the reference runs too) with ``model.share_prefix`` on and off: the same
    metrics, the same accumulated gradient and the same reference log-probs."""
    extra = ["actor_rollout_ref.actor.entropy_coeff=0.01", "actor_rollout_ref.actor.use_kl_loss=true",
             "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3"]
    import learner.reference

    shared = []
    monkeypatch.setattr(learner.reference, "prefix_layout", lambda *a: shared.append(prefix_layout(*a)) or shared[-1])
    results = {}
    for share in (False, True):
        cfg = learner_config(tiny_model_dir, tmp_path / str(share), f"actor_rollout_ref.model.share_prefix={str(share).lower()}",
                             *extra)
        with trainer_world_1(cfg) as trainer:
            batch = trainer.step_batch(_shared_prompt_trajs()).batch
            ref = trainer.reference.logprobs(batch, len(batch))
            stats = trainer.train_step(batch)
            results[share] = stats, ref, {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    (s0, r0, g0), (s1, r1, g1) = results[False], results[True]
    assert len(shared) >= 3 and all(lay is not None for lay in shared)  # the 3 policy passes and the reference ones
    for key in ("actor/pg_loss", "actor/entropy", "actor/loss", "actor/grad_norm"):
        assert s1[key] == pytest.approx(s0[key], rel=1e-4, abs=1e-6), key
    torch.testing.assert_close(r1, r0, rtol=0, atol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=1e-6, msg=name)


def test_eager_attention_falls_back_to_the_padded_forward(tmp_path, tiny_model_dir):
    """A model whose attention is not SDPA takes no custom mask: ``share_prefix`` leaves it padded
    (and the answer is the same)."""
    from learner.packing import shares_prefix
    from learner.reference import next_token_logits

    cfg = learner_config(tiny_model_dir, tmp_path)
    with trainer_world_1(cfg) as trainer, torch.no_grad():
        mb = trainer.step_batch(_shared_prompt_trajs()).batch
        assert shares_prefix(trainer.model)
        sdpa = next_token_logits(trainer.model, mb, 1.0, share_prefix=True).logprobs()
        trainer.model.config._attn_implementation = "eager"
        assert not shares_prefix(trainer.model)
        eager = next_token_logits(trainer.model, mb, 1.0, share_prefix=True).logprobs()
        torch.testing.assert_close(eager, sdpa, rtol=0, atol=1e-5)


def test_shared_prefix_under_bf16_mixed_precision(tmp_path, tiny_model_dir, monkeypatch):
    """With FSDP2's bf16 compute (``fsdp_config.mixed_precision=bf16``, so the model is wrapped at
    world size 1) the shared-prefix step runs through the layout and matches the padded step to
    bf16 rounding (measured: 2.5e-5 relative on the grad norm)."""
    import learner.reference

    shared = []
    monkeypatch.setattr(learner.reference, "prefix_layout", lambda *a: shared.append(prefix_layout(*a)) or shared[-1])
    stats = {}
    for share in (False, True):
        cfg = learner_config(tiny_model_dir, tmp_path / str(share), "actor_rollout_ref.actor.fsdp_config.mixed_precision=bf16",
                             f"actor_rollout_ref.model.share_prefix={str(share).lower()}",
                             "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4")
        with trainer_world_1(cfg) as trainer:
            stats[share] = trainer.train_step(trainer.step_batch(_shared_prompt_trajs()).batch)
    assert shared and all(lay is not None for lay in shared)
    for key in ("actor/pg_loss", "actor/grad_norm"):
        assert stats[True][key] == pytest.approx(stats[False][key], rel=1e-3), key
