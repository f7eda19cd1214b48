#!/usr/bin/env bash
# A ReAct agent (Thought / Action / Action Input text) with `search` and `answer` tools
# on a small QA set, REINFORCE++, token-F1 reward (qa_f1_reward).
#   bash examples/react_qa_search_reinforce.sh
#   MODEL=tiny bash examples/react_qa_search_reinforce.sh       # 2 tiny steps on CPU
# Data: examples/data/qa_{train,test}.jsonl ({"question", "answer"}), corpus
# examples/data/qa_corpus.jsonl, searched with BM25 by the built-in `search` tool
# (agent.tool_configs.search.corpus; examples/qa_tools.py shows the same tool as user code).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

"$RELAY" train \
  algorithm.adv_estimator=reinforce_plus_plus \
  algorithm.gamma=1.0 \
  data.train_files="[examples/data/qa_train.jsonl]" \
  data.val_files="[examples/data/qa_test.jsonl]" \
  data.train_batch_size=6 \
  data.max_prompt_length=1024 \
  data.max_response_length=768 \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.actor.optim.lr=1e-6 \
  actor_rollout_ref.actor.ppo_mini_batch_size=6 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
  actor_rollout_ref.rollout.name=hf \
  actor_rollout_ref.rollout.n=4 \
  agent.agent_type=react \
  agent.tools="[search,answer]" \
  agent.tool_configs.search.corpus=examples/data/qa_corpus.jsonl \
  agent.tool_configs.search.top_k=2 \
  agent.reward_name=qa_f1_reward \
  agent.max_steps=4 \
  agent.max_tokens_per_turn=128 \
  trainer.project_name=relay-examples \
  trainer.experiment_name=react_qa_search_reinforce \
  trainer.logger="[console,jsonl]" \
  trainer.total_epochs=20 \
  trainer.n_gpus_per_node=1 \
  trainer.save_freq=20 \
  trainer.test_freq=5 \
  "${TINY[@]}" "$@"
