#!/usr/bin/env bash
# A code agent: the model writes ```python blocks, the sandboxed code interpreter runs them;
# the final answer's program is scored by the row's tests (code_reward), GRPO.
#   bash examples/code_interpreter_grpo.sh
#   MODEL=tiny bash examples/code_interpreter_grpo.sh           # 2 tiny steps on CPU
# Data: examples/data/code_{train,test}.jsonl ({"question", "tests": ["assert f(2) == 4", ...]}).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

"$RELAY" train \
  algorithm.adv_estimator=grpo \
  data.train_files="[examples/data/code_train.jsonl]" \
  data.val_files="[examples/data/code_test.jsonl]" \
  data.train_batch_size=4 \
  data.max_prompt_length=512 \
  data.max_response_length=1024 \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.actor.optim.lr=1e-6 \
  actor_rollout_ref.actor.ppo_mini_batch_size=4 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
  actor_rollout_ref.rollout.name=hf \
  actor_rollout_ref.rollout.n=8 \
  agent.agent_type=code \
  agent.tools="[code_interpreter]" \
  agent.reward_name=code_reward \
  agent.max_steps=3 \
  agent.max_tokens_per_turn=256 \
  agent.tool_timeout_s=15 \
  trainer.project_name=relay-examples \
  trainer.experiment_name=code_interpreter_grpo \
  trainer.logger="[console,jsonl]" \
  trainer.total_epochs=30 \
  trainer.n_gpus_per_node=1 \
  trainer.save_freq=20 \
  trainer.test_freq=5 \
  "${TINY[@]}" "$@"
