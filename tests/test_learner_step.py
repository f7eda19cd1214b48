"""Each advantage estimator, KL term, critic warm-up and LoRA through the real `Trainer.train_step`
(in-process, gloo, world size 1) on hand-made trajectories."""

import math

import pytest
import torch

from tests.learner_support import changed, learner_config, make_trajs, state, trainer_world_1


@pytest.mark.parametrize(
    "estimator", ["grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "remax", "gae", "opo", "grpo_passk", "gpg"]
)
def test_each_estimator_trains_through_train_step(tmp_path, tiny_model_dir, estimator):
    cfg = learner_config(tiny_model_dir, tmp_path, f"algorithm.adv_estimator={estimator}")
    with trainer_world_1(cfg) as trainer:
        sb = trainer.step_batch(make_trajs(greedy=estimator == "remax"))
        assert len(sb.batch) == 8  # greedy rollouts are never trained on
        before = state(trainer.model)
        stats = trainer.train_step(sb.batch)
        after = state(trainer.model)
    assert math.isfinite(stats["actor/pg_loss"]) and stats["actor/grad_norm"] > 0
    assert changed(before, after)
    if estimator == "gae":
        assert math.isfinite(stats["critic/vf_loss"]) and stats["critic/grad_norm"] > 0
    else:
        assert not any(k.startswith("critic/") for k in stats)


@pytest.mark.parametrize(
    "override",
    [f"actor_rollout_ref.actor.loss_mode={m}" for m in ("gspo", "cispo", "clip_cov", "kl_cov")]
    + [f"algorithm.off_policy_correction={c}" for c in ("none", "tis", "seq_tis", "seq_mis", "geo_mis", "icepop")]
    + ["actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm"],
)
def test_each_policy_loss_and_correction_trains_through_train_step(tmp_path, tiny_model_dir, override):
    cfg = learner_config(tiny_model_dir, tmp_path, override)
    with trainer_world_1(cfg) as trainer:
        batch = trainer.step_batch(make_trajs()).batch
        before = state(trainer.model)
        stats = trainer.train_step(batch)
        after = state(trainer.model)
    assert math.isfinite(stats["actor/pg_loss"]) and 0.0 <= stats["actor/is_masked_frac"] <= 1.0
    if "seq_mis" in override or "geo_mis" in override:
        # make_trajs' actor log-probs (uniform in [-8, -4]) are far from the tiny model's: whole
        # episodes are rejected, so nothing may move; otherwise the policy moves
        assert stats["actor/is_masked_frac"] > 0
    else:
        assert stats["actor/grad_norm"] > 0 and changed(before, after)


def test_decoupled_cap_masks_exactly_the_tokens_above_it(tmp_path, tiny_model_dir):
    """actor/is_masked_frac = the fraction of sampled tokens whose pi_prox / pi_behav exceeds
    behav_imp_weight_cap, recomputed here from the learner's own log-probs."""
    # micro-batches of 3, 3 and 2 rows: the step reports the fraction of all its tokens
    cfg = learner_config(tiny_model_dir, tmp_path, "algorithm.behav_imp_weight_cap=2",
                         "actor_rollout_ref.actor.ppo_mini_batch_size=2")
    with trainer_world_1(cfg) as trainer:
        batch = trainer.step_batch(make_trajs()).batch
        prox = trainer.logprobs(batch, len(batch))
        stats = trainer.train_step(batch)
    mask = batch.loss_mask > 0
    expected = float(((prox - batch.behaviour_logprobs).exp() > 2)[mask].float().mean())
    assert 0 < expected < 1  # the batch has tokens on both sides of the cap
    assert stats["actor/is_masked_frac"] == pytest.approx(expected, abs=1e-6)


def _misaligned(t):
    """``t`` with a log-prob on an observation token (check_alignment refuses it)."""
    import msgspec
    import numpy as np

    from protocol import messages as m

    lp = t.logprobs.numpy().copy()
    lp[np.nonzero(t.loss_mask.numpy() == 0)[0][0]] = -1.0
    return msgspec.structs.replace(t, logprobs=m.pack(lp, "float32"))


def test_a_group_with_a_refused_chain_is_dropped_whole():
    from learner.trainer import whole_groups

    trajs = make_trajs(greedy=True)  # 0:0 chains 0-3, 0:1 chains 0-3, then each prompt's greedy rollout
    g0, g1 = trajs[:4] + [trajs[8]], trajs[4:8] + [trajs[9]]
    kept, groups, refused = whole_groups([("0:0", g0), ("0:1", [g1[0], _misaligned(g1[1]), *g1[2:]])])
    assert kept == g0 and (groups, refused) == (1, 1)
    # a refused greedy rollout drops its group too (its rows would have no ReMax baseline)
    kept, groups, refused = whole_groups([("0:0", g0[:4] + [_misaligned(g0[4])]), ("0:1", g1)])
    assert kept == g1 and (groups, refused) == (1, 1)
    assert whole_groups([("0:0", [_misaligned(t) for t in g0])]) == ([], 1, 5)


def test_collate_of_nothing_says_so():
    from learner.batch import collate

    with pytest.raises(ValueError, match="no trajectories"):
        collate([], {}, 0)


def test_remax_baseline_is_the_greedy_reward_of_the_prompt(tmp_path, tiny_model_dir):
    cfg = learner_config(tiny_model_dir, tmp_path, "algorithm.adv_estimator=remax")
    with trainer_world_1(cfg) as trainer:
        batch = trainer.step_batch(make_trajs(greedy=True)).batch
    # prompt 0:0's greedy rollout scored 1, prompt 0:1's scored 0 (make_trajs)
    assert batch.baseline_rewards.tolist() == [1.0] * 4 + [0.0] * 4
    assert batch.rewards.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def test_remax_without_greedy_rollouts_is_an_error(tmp_path, tiny_model_dir):
    cfg = learner_config(tiny_model_dir, tmp_path, "algorithm.adv_estimator=remax")
    with trainer_world_1(cfg) as trainer:
        with pytest.raises(ValueError, match="no greedy-rollout baseline"):
            trainer.train_step(trainer.step_batch(make_trajs(greedy=False)).batch)


@pytest.mark.parametrize("kind", ["low_var_kl", "kl", "mse", "full"])
def test_kl_loss_is_zero_against_the_initial_policy_then_positive(tmp_path, tiny_model_dir, kind):
    cfg = learner_config(
        tiny_model_dir, tmp_path,
        "actor_rollout_ref.actor.use_kl_loss=true", f"actor_rollout_ref.actor.kl_loss_type={kind}",
        "actor_rollout_ref.actor.kl_loss_coef=0.1", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
    )
    with trainer_world_1(cfg) as trainer:
        batch = trainer.step_batch(make_trajs()).batch
        first = trainer.train_step(batch)  # one optimizer step, taken at the reference itself
        second = trainer.train_step(batch)
    assert first["actor/kl_coef"] == pytest.approx(0.1)
    assert first["actor/kl_loss"] == pytest.approx(0.0, abs=1e-6)
    assert second["actor/kl_loss"] > 1e-6 if kind != "kl" else abs(second["actor/kl_loss"]) > 1e-6


ADAPTIVE_KL_IN_REWARD = (
    "algorithm.use_kl_in_reward=true", "algorithm.kl_penalty=low_var_kl",
    "algorithm.kl_ctrl.type=adaptive", "algorithm.kl_ctrl.kl_coef=0.05",
    "algorithm.kl_ctrl.target_kl=0.1", "algorithm.kl_ctrl.horizon=100",
)


def test_kl_in_reward_fixed_and_adaptive_controller(tmp_path, tiny_model_dir):
    cfg = learner_config(tiny_model_dir, tmp_path, *ADAPTIVE_KL_IN_REWARD)
    with trainer_world_1(cfg) as trainer:
        batch = trainer.step_batch(make_trajs()).batch
        first = trainer.train_step(batch)
        second = trainer.train_step(batch)
    # step 1: policy == reference, KL 0, so the adaptive coefficient shrinks by
    # 1 + clip(0 / 0.1 - 1, -0.2, 0.2) * 8 / 100 = 0.984
    assert first["actor/reward_kl_penalty"] == pytest.approx(0.0, abs=1e-6)
    assert first["actor/reward_kl_penalty_coeff"] == pytest.approx(0.05)
    assert second["actor/reward_kl_penalty_coeff"] == pytest.approx(0.05 * 0.984)
    assert second["actor/reward_kl_penalty"] > 0


def test_adaptive_kl_coefficient_is_restored_from_a_checkpoint(tmp_path, tiny_model_dir):
    cfg = learner_config(tiny_model_dir, tmp_path, *ADAPTIVE_KL_IN_REWARD, "trainer.resume_mode=auto")
    with trainer_world_1(cfg) as trainer:
        batch = trainer.step_batch(make_trajs()).batch
        trainer.train_step(batch)
        trainer.version = 1
        trainer.save_checkpoint()
    with trainer_world_1(cfg) as resumed:
        assert resumed.version == 1
        # one update at KL 0 (see above): 0.05 * 0.984, not the configured 0.05
        assert resumed.kl_in_reward.controller.value == pytest.approx(0.05 * 0.984)


def test_critic_warmup_trains_only_the_critic(tmp_path, tiny_model_dir):
    cfg = learner_config(tiny_model_dir, tmp_path, "algorithm.adv_estimator=gae", "trainer.critic_warmup=1")
    with trainer_world_1(cfg) as trainer:
        batch = trainer.step_batch(make_trajs()).batch
        policy0, critic0 = state(trainer.model), state(trainer.critic.model)
        warm = trainer.train_step(batch)
        trainer.version += 1
        policy1, critic1 = state(trainer.model), state(trainer.critic.model)
        trained = trainer.train_step(batch)
        policy2 = state(trainer.model)
    assert not changed(policy0, policy1) and changed(critic0, critic1)
    assert "actor/pg_loss" not in warm and "critic/vf_loss" in warm
    assert changed(policy1, policy2) and "actor/pg_loss" in trained


def test_value_targets_are_gae_returns_of_values_before_the_update(tmp_path, tiny_model_dir):
    """gamma = lam = 1: the return at every sampled token is the episode reward."""
    cfg = learner_config(tiny_model_dir, tmp_path, "algorithm.adv_estimator=gae", "critic.optim.lr=1e-2")
    with trainer_world_1(cfg) as trainer:
        batch = trainer.step_batch(make_trajs()).batch
        values0 = trainer.critic.values(batch, len(batch))
        losses = [trainer.train_step(batch)["critic/vf_loss"] for _ in range(3)]
        values1 = trainer.critic.values(batch, len(batch))
    mask = batch.loss_mask > 0
    target = batch.rewards[:, None].expand_as(values0)
    err0 = ((values0 - target)[mask] ** 2).mean()
    err1 = ((values1 - target)[mask] ** 2).mean()
    assert err1 < err0 and losses[-1] < losses[0]


def test_ppo_epochs_and_minibatches_recompute_proximal_logprobs(tmp_path, tiny_model_dir):
    """2 epochs x 2 mini-batches: the first mini-batch starts at the proximal policy
    (ppo_kl 0), later ones move away from it (ppo_kl != 0)."""
    cfg = learner_config(tiny_model_dir, tmp_path, "actor_rollout_ref.actor.ppo_epochs=2",
                         "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4")
    with trainer_world_1(cfg) as trainer:
        batch = trainer.step_batch(make_trajs()).batch
        seen = []
        real_policy_loss = __import__("learner.algos", fromlist=["policy_loss"]).policy_loss

        def spy(inputs, loss_cfg):
            loss, metrics = real_policy_loss(inputs, loss_cfg)
            seen.append(metrics["ppo_kl"])
            return loss, metrics

        import learner.trainer as t
        t.algos.policy_loss, saved = spy, t.algos.policy_loss
        try:
            trainer.train_step(batch)
        finally:
            t.algos.policy_loss = saved
    assert len(seen) == 4  # 2 epochs x 2 mini-batches x 1 micro-batch
    assert seen[0] == pytest.approx(0.0, abs=1e-6)
    assert all(abs(k) > 1e-7 for k in seen[1:])


def test_lora_trains_only_adapters_and_publishes_merged_base_weights(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg = learner_config(tiny_model_dir, tmp_path, "actor_rollout_ref.model.lora_rank=4",
                         "actor_rollout_ref.model.lora_alpha=8", "actor_rollout_ref.actor.optim.lr=1e-2")
    with trainer_world_1(cfg) as trainer:
        before = state(trainer.model)
        trainer.train_step(trainer.step_batch(make_trajs()).batch)
        after = state(trainer.model)
        from learner.lora import publish_view
        from learner.model import stream_full_tensors

        view = publish_view(trainer.weights_for_export.lora, torch.float32)  # what engines without adapters get
        published = {k: v.numpy() for k, v in view(stream_full_tensors(trainer.model, view.gather_dtype))}
        hf = trainer.weights_for_actors  # HF engines apply the adapters themselves: they get only those
        adapters = dict(hf(stream_full_tensors(trainer.model, hf.gather_dtype, hf.keep)))
    moved = changed(before, after)
    assert moved and all(".lora_" in k for k in moved)
    assert set(adapters) == {k for k in after if ".lora_A." in k or ".lora_B." in k}
    assert all(torch.equal(adapters[k], after[k]) for k in adapters)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    assert set(published) <= set(base) and set(base) - set(published) <= {"lm_head.weight"}
    q = "model.layers.0.self_attn.q_proj"
    peft = f"base_model.model.{q}"
    a, b = after[f"{peft}.lora_A.default.weight"], after[f"{peft}.lora_B.default.weight"]
    expected = base[f"{q}.weight"] + (8 / 4) * b @ a
    torch.testing.assert_close(torch.from_numpy(published[f"{q}.weight"]), expected)
    assert not torch.equal(expected, base[f"{q}.weight"])
    torch.testing.assert_close(torch.from_numpy(published["model.embed_tokens.weight"]), base["model.embed_tokens.weight"])


def test_gradient_checkpointing_gives_the_same_update(tmp_path, tiny_model_dir):
    results = []
    for gc in ("false", "true"):
        cfg = learner_config(tiny_model_dir, tmp_path / gc, f"actor_rollout_ref.model.enable_gradient_checkpointing={gc}")
        with trainer_world_1(cfg) as trainer:
            trainer.train_step(trainer.step_batch(make_trajs()).batch)
            results.append(state(trainer.model))
    plain, checkpointed = results
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-5, atol=1e-6)


def _full_logits(model, mb, temperature):
    """[n, L-1, V] logits at every position: what ``next_token_logits`` avoids computing."""
    pos = (mb.attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=pos)
    return out.logits[:, :-1].float() / temperature


def test_response_only_logits_give_the_loss_and_gradient_of_full_logits(tmp_path, tiny_model_dir):
    """The policy loss with entropy and the exact (full-vocabulary) KL term, computed from logits
    gathered at the sampled positions, equals the same loss from logits at every position: value
    to 1e-5 and every parameter's gradient to 1e-6. Rows of unequal length (one longer prompt:
    the others are padded) check the per-row gather; the proximal and reference log-probs
    (no-grad passes) match too."""
    import msgspec

    from learner import algos
    from learner.reference import next_token_logits
    from protocol import messages as m

    cfg = learner_config(
        tiny_model_dir, tmp_path, "actor_rollout_ref.actor.use_kl_loss=true", "actor_rollout_ref.actor.kl_loss_type=full",
        "actor_rollout_ref.actor.entropy_coeff=0.01", "actor_rollout_ref.rollout.temperature=0.7",
    )
    trajs = make_trajs()
    trajs[0] = msgspec.structs.replace(trajs[0], prompt_ids=m.pack(list(range(20, 29)), "int32"))
    with trainer_world_1(cfg) as trainer:
        mb = trainer.step_batch(trajs).batch
        assert (mb.attention_mask == 0).any()  # padded rows
        mask, temp = mb.loss_mask, 0.7
        adv = torch.linspace(-1.0, 1.0, len(mb))[:, None].expand_as(mask)
        labels = mb.input_ids[:, 1:]
        actor = cfg.actor_rollout_ref.actor

        def loss_of(logprobs, entropy, kl):
            per_token, _ = algos.policy_loss(
                algos.PolicyLossInputs(logprobs, logprobs.detach() + 0.05 * mask, mb.behaviour_logprobs, adv, mask),
                trainer.loss_cfg,
            )
            per_token = per_token - actor.entropy_coeff * entropy + actor.kl_loss_coef * kl
            return algos.agg_loss(per_token, mask, actor.loss_agg_mode)

        def grads(loss):
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            return {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

        gathered = next_token_logits(trainer.model, mb, temp)
        assert gathered.logits.shape[0] == int(mask.sum())  # the LM head ran on sampled positions only
        ref = next_token_logits(trainer.reference.model, mb, temp, gathered.where)
        lp = gathered.logprobs()
        kl = gathered.spread(algos.full_kl(gathered.logits, ref.logits))
        loss_small = loss_of(lp, gathered.entropy(), kl)
        g_small = grads(loss_small)

        full = _full_logits(trainer.model, mb, temp)
        with torch.no_grad():
            ref_full = _full_logits(trainer.reference.model, mb, temp)
        lp_full = algos.logprobs_from_logits(full, labels)
        loss_full = loss_of(lp_full, algos.entropy_from_logits(full), algos.full_kl(full, ref_full))
        g_full = grads(loss_full)

        torch.testing.assert_close(loss_small, loss_full, rtol=0, atol=1e-5)
        assert g_small.keys() == g_full.keys() and g_full
        for name in g_full:
            torch.testing.assert_close(g_small[name], g_full[name], rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(lp.detach(), lp_full.detach() * mask, rtol=0, atol=1e-5)
        torch.testing.assert_close(
            ref.logprobs(), algos.logprobs_from_logits(ref_full, labels) * mask, rtol=0, atol=1e-5
        )
        torch.testing.assert_close(trainer.logprobs(mb, len(mb)), lp_full.detach() * mask, rtol=0, atol=1e-5)


def test_world_1_plain_module_matches_the_fsdp_path_on_one_step(tmp_path, tiny_model_dir):
    """At world size 1 on CPU (fp32, nothing to shard or offload) the policy, reference and
    critic are plain modules; one step (2 mini-batches of 3+1-row micro-batches, so the proximal
    pass runs too) moves every parameter as the FSDP2-wrapped model does on the same 1-rank
    gloo group, and the weight stream gives the full weights as new tensors."""
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from learner.model import fsdp_shard, stream_full_tensors
    from learner.optim import build_optimizer

    cfg = learner_config(tiny_model_dir, tmp_path)
    with trainer_world_1(cfg) as trainer:
        assert not any(isinstance(p, DTensor) for p in trainer.model.parameters())
        batch = trainer.step_batch(make_trajs()).batch
        start = state(trainer.model)
        plain_stats = trainer.train_step(batch)
        plain = state(trainer.model)
        streamed = dict(stream_full_tensors(trainer.model, torch.float32))
        assert streamed.keys() == plain.keys()
        for name, p in trainer.model.named_parameters():
            if name in streamed:
                torch.testing.assert_close(streamed[name], plain[name], rtol=0, atol=0)
                assert streamed[name].data_ptr() != p.data_ptr()  # a copy, safe to keep while training goes on

        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        trainer.model = fsdp_shard(model, trainer.device, plain_at_world_1=False)
        assert all(isinstance(p, DTensor) for p in trainer.model.parameters())
        assert not changed(start, state(trainer.model))
        trainer.optimizer, trainer.scheduler = build_optimizer(
            trainer.model.parameters(), cfg.actor_rollout_ref.actor.optim, trainer.total_steps
        )
        fsdp_stats = trainer.train_step(batch)
        fsdp = state(trainer.model)
    assert changed(start, plain)
    for name in plain:
        torch.testing.assert_close(plain[name], fsdp[name], rtol=0, atol=1e-6, msg=name)
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/loss"):
        assert plain_stats[key] == pytest.approx(fsdp_stats[key], abs=1e-5)


class _ScalarReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of a tensor's value on the host (``.item()``, ``float(t)``, ``bool(t)``:
    aten's ``_local_scalar_dense``, a device sync on GPU) made by Relay's code: transformers'
    own check of the attention mask (one per forward, to skip an all-ones mask) is not counted."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            import traceback

            if not any("/transformers/" in f.filename for f in traceback.extract_stack()):
                self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("extra", [[], ["actor_rollout_ref.actor.entropy_coeff=0.01", "actor_rollout_ref.actor.use_kl_loss=true"]])
def test_host_reads_per_step_do_not_grow_with_micro_batches(tmp_path, tiny_model_dir, extra):
    """The policy update reads its metrics on the host once per step, not per micro-batch: a step
    of 8 one-row micro-batches makes as many scalar reads as one of 2 four-row micro-batches."""
    reads = {}
    for micro in (1, 4):
        cfg = learner_config(tiny_model_dir, tmp_path / f"m{micro}", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
                             f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}", *extra)
        with trainer_world_1(cfg) as trainer:
            batch = trainer.step_batch(make_trajs()).batch
            trainer.train_step(batch)  # warm-up
            with _ScalarReads() as counter:
                stats = trainer.train_step(batch)
            reads[micro] = counter.count
        assert math.isfinite(stats["actor/pg_loss"]) and stats["actor/grad_norm"] > 0
    assert reads[1] == reads[4], reads


def test_packed_sequences_give_the_logprobs_of_padded_rows(tmp_path, tiny_model_dir):
    """Packing (``next_token_logits(packed=True)``; not yet wired to use_remove_padding): rows of
    unequal length packed into one row (positions restarting per
    sequence, transformers' per-sequence causal mask) give the same log-probs and entropies as the
    padded batch, to 1e-5, at every real position; no sequence attends to another (changing one
    row's tokens leaves the others' log-probs alone)."""
    import msgspec

    from learner.reference import next_token_logits
    from protocol import messages as m

    cfg = learner_config(tiny_model_dir, tmp_path)
    trajs = make_trajs()
    trajs[0] = msgspec.structs.replace(trajs[0], prompt_ids=m.pack(list(range(20, 31)), "int32"))
    trajs[3] = msgspec.structs.replace(trajs[3], prompt_ids=m.pack([7, 8], "int32"))
    with trainer_world_1(cfg) as trainer, torch.no_grad():
        mb = trainer.step_batch(trajs).batch
        assert (mb.attention_mask == 0).any()
        every = mb.attention_mask[:, 1:] > 0  # every real next token
        padded = next_token_logits(trainer.model, mb, 1.0, every)
        packed = next_token_logits(trainer.model, mb, 1.0, every, packed=True)
        torch.testing.assert_close(packed.logprobs(), padded.logprobs(), rtol=0, atol=1e-5)
        torch.testing.assert_close(packed.entropy(), padded.entropy(), rtol=0, atol=1e-5)
        other = mb.select(list(range(len(mb))))
        other.input_ids[1, : int(other.attention_mask[1].sum())] = 42  # a different row 1
        changed_row = next_token_logits(trainer.model, other, 1.0, every, packed=True).logprobs()
        keep = torch.ones(len(mb), dtype=torch.bool)
        keep[1] = False
        torch.testing.assert_close(changed_row[keep], packed.logprobs()[keep], rtol=0, atol=1e-5)
