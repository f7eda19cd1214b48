# Shared by the example scripts: run from the repository root with the project's relay.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RELAY=${RELAY:-$([ -x .venv/bin/relay ] && echo .venv/bin/relay || echo relay)}
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
# MODEL=tiny: the embedded tiny model on CPU, a couple of small steps (a smoke test, not training).
# Only sizes and run length are shrunk: the script's own data, agent and prompt settings stay.
TINY=()
if [ "$MODEL" = tiny ]; then
  TINY=(
    trainer.total_training_steps="${STEPS:-2}" trainer.n_gpus_per_node=1 actor_rollout_ref.rollout.num_actors=1
    data.train_batch_size=2 actor_rollout_ref.actor.ppo_mini_batch_size=2 actor_rollout_ref.rollout.n=2
    agent.max_tokens_per_turn=16 data.max_response_length=64
    actor_rollout_ref.model.enable_gradient_checkpointing=false trainer.device=cpu
    trainer.val_before_train=false trainer.test_freq=-1 trainer.save_freq=-1
    "trainer.default_local_dir=runs/{project_name}/{experiment_name}-tiny"
  )
elif [ -n "${STEPS:-}" ]; then
  TINY=(trainer.total_training_steps="$STEPS")
fi
