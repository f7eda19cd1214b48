"""bf16 mixed-precision training on CPU (``fsdp_config.mixed_precision=bf16``): FSDP2 computes in
bf16 with fp32 master weights, and the published stream is what the actors serve."""

import torch

from tests.learner_support import learner_config, make_trajs, state, trainer_world_1


def test_a_bf16_train_step_on_cpu(tmp_path, tiny_model_dir):
    cfg = learner_config(tiny_model_dir, tmp_path, "actor_rollout_ref.actor.fsdp_config.mixed_precision=bf16",
                         "actor_rollout_ref.rollout.dtype=bf16", "actor_rollout_ref.actor.optim.lr=1e-3")
    with trainer_world_1(cfg) as trainer:
        seen: list[torch.dtype] = []
        proj = trainer.model.model.layers[0].self_attn.q_proj
        hook = proj.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
        before = state(trainer.model)
        stats = trainer.train_step(trainer.step_batch(make_trajs()).batch)
        hook.remove()
        after = state(trainer.model)
        assert seen and set(seen) == {torch.bfloat16}  # the forward ran in bf16
        assert all(t.dtype == torch.float32 for t in after.values())  # master weights stay fp32
        assert torch.isfinite(torch.tensor(stats["actor/loss"])) and stats["actor/grad_norm"] > 0
        moved = [k for k in before if not torch.equal(before[k], after[k])]
        assert len(moved) > len(before) // 2
        from learner.model import stream_full_tensors

        view = trainer.weights_for_actors
        assert view.gather_dtype == torch.bfloat16
        streamed = dict(view(stream_full_tensors(trainer.model, view.gather_dtype)))
        for k, t in after.items():
            assert streamed[k].dtype == torch.bfloat16 and torch.equal(streamed[k], t.to(torch.bfloat16)), k
