#!/usr/bin/env bash
# GSM8K with the calculator tool and the `hf` agent (chat-template tool calls), GRPO.
#   bash examples/gsm8k_calculator_grpo.sh                      # Qwen2.5-0.5B-Instruct, GPU
#   MODEL=tiny bash examples/gsm8k_calculator_grpo.sh           # 2 tiny steps on CPU (smoke test)
#   bash examples/gsm8k_calculator_grpo.sh trainer.nnodes=1 ...  # any further overrides
# Data: ../shared/data/gsm8k/{train,test}.jsonl (rows {"question", "answer": "... #### 72"}).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DATA=${DATA:-../shared/data/gsm8k}

"$RELAY" train \
  algorithm.adv_estimator=grpo \
  algorithm.norm_adv_by_std_in_grpo=true \
  data.train_files="[$DATA/train.jsonl]" \
  data.val_files="[$DATA/test.jsonl]" \
  data.train_batch_size=32 \
  data.val_batch_size=128 \
  data.max_prompt_length=512 \
  data.max_response_length=1024 \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.model.enable_gradient_checkpointing=true \
  actor_rollout_ref.actor.optim.lr=1e-6 \
  actor_rollout_ref.actor.ppo_mini_batch_size=16 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
  actor_rollout_ref.actor.use_kl_loss=false \
  actor_rollout_ref.rollout.name=hf \
  actor_rollout_ref.rollout.n=8 \
  actor_rollout_ref.rollout.temperature=1.0 \
  actor_rollout_ref.rollout.val_kwargs.temperature=0 \
  agent.agent_type=hf \
  agent.tools="[calculator]" \
  agent.reward_name=gsm8k_reward \
  agent.max_steps=6 \
  agent.max_tokens_per_turn=256 \
  trainer.project_name=relay-examples \
  trainer.experiment_name=gsm8k_calculator_grpo \
  trainer.logger="[console,jsonl]" \
  trainer.total_epochs=1 \
  trainer.n_gpus_per_node=1 \
  trainer.save_freq=50 \
  trainer.test_freq=20 \
  "${TINY[@]}" "$@"
