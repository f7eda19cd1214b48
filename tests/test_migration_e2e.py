"""A verl or AgentFly user's run pastes in and works (slow: real `relay train` runs, 2 steps each).

- The three commands of AgentFly's training guide (docs/api_references/training/training.md:
  GSM8K + calculator with GRPO, ReAct + search with REINFORCE++, the code agent), verbatim but
  for the launcher (`relay train` instead of `python -m agentfly.cli train`) and one tiny-model
  override, on JSON data in AgentFly's format at the paths the guide uses.
- A verl GSM8K GRPO script (verl's examples/grpo_trainer/run_qwen2-7b.sh with the keys of its
  seq-balance variant) on parquet data in verl's layout, with a verl-style compute_score file.
- A resume with a changed learning rate is refused with the diff, before anything starts.
- The example scripts with MODEL=tiny.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
GSM8K = Path("/work/shared/data/gsm8k")
RELAY = [sys.executable, "-m", "launcher.cli", "train"]


def tiny_override(model: str, run_dir: Path) -> list[str]:
    """What a user changes to try a command on a laptop: the tiny model on CPU, 2 small steps."""
    return [
        f"actor_rollout_ref.model.path={model}", "actor_rollout_ref.rollout.name=hf", "trainer.device=cpu",
        "trainer.n_gpus_per_node=1", "actor_rollout_ref.rollout.num_actors=1", "trainer.total_training_steps=2",
        "data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.rollout.n=2",
        "agent.max_tokens_per_turn=16", "data.max_response_length=64", "trainer.val_before_train=false",
        "trainer.test_freq=-1", "trainer.save_freq=-1", "trainer.logger=[console,jsonl]",
        # the tiny model's byte-level tokenizer makes prompts ~3x as long as Qwen's
        "data.max_prompt_length=1024",
        f"trainer.default_local_dir={run_dir}",
    ]


AGENTFLY_GSM8K = """
    algorithm.adv_estimator=grpo
    data.train_files=./data/rlhf/math/gsm8k_train.json
    data.val_files=./data/rlhf/math/gsm8k_test.json
    data.train_batch_size=64
    agent.use_agent=True
    agent.init_config.agent_type=hf
    agent.init_config.tools=[calculator]
    agent.init_config.template=qwen2.5
    agent.init_config.model_name_or_path=Qwen/Qwen2.5-3B-Instruct
    agent.init_config.reward_name=math_reward_string_equal
    agent.init_config.backend_config.backend=async_verl
    agent.run_config.max_turns=3
    agent.run_config.num_chains=8
    agent.run_config.generation_config.max_tokens=256
    agent.run_config.context_config.resource_backend=local
    actor_rollout_ref.actor.optim.lr=5e-7
    actor_rollout_ref.model.path=Qwen/Qwen2.5-3B-Instruct
    actor_rollout_ref.actor.ppo_mini_batch_size=64
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8
    actor_rollout_ref.actor.use_kl_loss=True
    actor_rollout_ref.actor.kl_loss_coef=0.001
    actor_rollout_ref.actor.kl_loss_type=mse
    actor_rollout_ref.actor.entropy_coeff=0.001
    actor_rollout_ref.rollout.name=vllm
    actor_rollout_ref.rollout.response_length=256
    actor_rollout_ref.rollout.tensor_model_parallel_size=1
    actor_rollout_ref.rollout.gpu_memory_utilization=0.5
    critic.model.path=Qwen/Qwen2.5-3B-Instruct
    algorithm.kl_ctrl.kl_coef=0.001
    trainer.logger=['console','wandb']
    trainer.project_name=AgentRL
    trainer.experiment_name=test_gsm8k
    trainer.n_gpus_per_node=1
    trainer.nnodes=1
    trainer.save_freq=50
    trainer.test_freq=10
    trainer.total_training_steps=100
"""

AGENTFLY_REACT_SEARCH = """
    algorithm.adv_estimator=reinforce_plus_plus
    data.train_files=./data/rlhf/qa/train_random_8000.json
    data.val_files=./data/rlhf/qa/dev_random_500.json
    data.train_batch_size=128
    data.val_batch_size=512
    agent.use_agent=True
    agent.init_config.agent_type=react
    agent.init_config.tools=[google_search,answer]
    agent.init_config.model_name_or_path=Qwen/Qwen2.5-3B-Instruct
    agent.init_config.reward_name=qa_f1_reward
    agent.init_config.backend_config.backend=async_verl
    agent.run_config.max_turns=4
    agent.run_config.num_chains=1
    agent.run_config.generation_config.max_tokens=512
    agent.run_config.context_config.resource_backend=local
    actor_rollout_ref.actor.optim.lr=5e-7
    actor_rollout_ref.model.path=Qwen/Qwen2.5-3B-Instruct
    actor_rollout_ref.actor.ppo_mini_batch_size=128
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2
    actor_rollout_ref.actor.use_kl_loss=True
    actor_rollout_ref.actor.kl_loss_coef=0.001
    actor_rollout_ref.actor.kl_loss_type=mse
    actor_rollout_ref.actor.entropy_coeff=0.001
    actor_rollout_ref.rollout.name=vllm
    actor_rollout_ref.rollout.response_length=512
    actor_rollout_ref.rollout.tensor_model_parallel_size=2
    actor_rollout_ref.rollout.gpu_memory_utilization=0.5
    critic.model.path=Qwen/Qwen2.5-3B-Instruct
    critic.ppo_mini_batch_size=32
    algorithm.kl_ctrl.kl_coef=0.001
    trainer.logger=['console','wandb']
    trainer.project_name=AgentRL
    trainer.experiment_name=react_search_agent
    trainer.n_gpus_per_node=8
    trainer.nnodes=1
    trainer.save_freq=50
    trainer.test_freq=10
    trainer.total_training_steps=200
    trainer.val_before_train=True
"""

AGENTFLY_CODE = """
    algorithm.adv_estimator=grpo
    data.train_files=./data/rlhf/code/train.json
    data.val_files=./data/rlhf/code/val.json
    data.train_batch_size=64
    agent.use_agent=True
    agent.init_config.agent_type=code
    agent.init_config.tools=[python_executor]
    agent.init_config.model_name_or_path=Qwen/Qwen2.5-3B-Instruct
    agent.init_config.reward_name=code_reward
    agent.init_config.backend_config.backend=async_verl
    agent.run_config.max_turns=5
    agent.run_config.num_chains=4
    agent.run_config.generation_config.max_tokens=512
    agent.run_config.context_config.resource_backend=local
    actor_rollout_ref.actor.optim.lr=4e-7
    actor_rollout_ref.model.path=Qwen/Qwen2.5-3B-Instruct
    actor_rollout_ref.actor.ppo_mini_batch_size=64
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4
    actor_rollout_ref.actor.use_kl_loss=True
    actor_rollout_ref.actor.kl_loss_coef=0.001
    actor_rollout_ref.actor.kl_loss_type=mse
    actor_rollout_ref.actor.entropy_coeff=0.001
    actor_rollout_ref.rollout.name=vllm
    actor_rollout_ref.rollout.response_length=512
    actor_rollout_ref.rollout.tensor_model_parallel_size=1
    actor_rollout_ref.rollout.gpu_memory_utilization=0.5
    critic.model.path=Qwen/Qwen2.5-3B-Instruct
    algorithm.kl_ctrl.kl_coef=0.001
    trainer.logger=['console','wandb']
    trainer.project_name=AgentRL
    trainer.experiment_name=code_agent
    trainer.n_gpus_per_node=4
    trainer.nnodes=1
    trainer.save_freq=50
    trainer.test_freq=10
    trainer.total_training_steps=300
"""

VERL_GSM8K = """
    algorithm.adv_estimator=grpo
    data.train_files=./data/gsm8k/train.parquet
    data.val_files=./data/gsm8k/test.parquet
    data.train_batch_size=1024
    data.max_prompt_length=512
    data.max_response_length=1024
    data.filter_overlong_prompts=True
    data.truncation='error'
    actor_rollout_ref.model.path=Qwen/Qwen2-7B-Instruct
    actor_rollout_ref.actor.optim.lr=1e-6
    actor_rollout_ref.model.use_remove_padding=True
    actor_rollout_ref.actor.ppo_mini_batch_size=256
    actor_rollout_ref.actor.use_dynamic_bsz=True
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=24000
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=40
    actor_rollout_ref.actor.use_kl_loss=True
    actor_rollout_ref.actor.kl_loss_coef=0.001
    actor_rollout_ref.actor.kl_loss_type=low_var_kl
    actor_rollout_ref.actor.entropy_coeff=0
    actor_rollout_ref.actor.strategy=fsdp
    actor_rollout_ref.model.enable_gradient_checkpointing=True
    actor_rollout_ref.actor.fsdp_config.param_offload=False
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=40
    actor_rollout_ref.rollout.tensor_model_parallel_size=2
    actor_rollout_ref.rollout.name=vllm
    actor_rollout_ref.rollout.mode=async
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6
    actor_rollout_ref.rollout.max_model_len=2048
    actor_rollout_ref.rollout.max_num_batched_tokens=8192
    actor_rollout_ref.rollout.enforce_eager=False
    actor_rollout_ref.rollout.free_cache_engine=True
    actor_rollout_ref.rollout.n=5
    actor_rollout_ref.rollout.val_kwargs.n=1
    actor_rollout_ref.rollout.val_kwargs.do_sample=False
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=40
    actor_rollout_ref.ref.fsdp_config.param_offload=True
    algorithm.use_kl_in_reward=False
    custom_reward_function.path=./gsm8k_score.py
    reward_model.enable=False
    trainer.critic_warmup=0
    trainer.logger='["console","wandb"]'
    trainer.project_name='verl_grpo_example_gsm8k'
    trainer.experiment_name='qwen2_7b_function_rm'
    trainer.n_gpus_per_node=8
    trainer.nnodes=1
    trainer.save_freq=20
    trainer.test_freq=5
    trainer.total_epochs=15
"""

VERL_SCORE = '''
import re


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl's GSM8K rule: the number after '####' (else the last number) equals the ground truth."""
    found = re.findall(r"#### (\\-?[0-9\\.\\,]+)", solution_str) or re.findall(r"(\\-?[0-9\\.\\,]+)", solution_str)
    return 1.0 if found and found[-1].replace(",", "") == ground_truth else 0.0
'''


def gsm8k_rows(split: str, n: int) -> list[dict]:
    rows = [json.loads(line) for line in (GSM8K / f"{split}.jsonl").read_text().splitlines()[:n]]
    return [{"question": r["question"], "answer": r["answer"].split("####")[-1].strip()} for r in rows]


def write_json(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A user's directory: AgentFly JSON at the guide's paths, verl parquet at ./data/gsm8k."""
    if not (GSM8K / "train.jsonl").exists():
        pytest.skip("GSM8K not at /work/shared/data/gsm8k")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("user")
    rlhf = root / "data" / "rlhf"
    write_json(rlhf / "math" / "gsm8k_train.json", gsm8k_rows("train", 16))
    write_json(rlhf / "math" / "gsm8k_test.json", gsm8k_rows("test", 8))
    qa = [json.loads(line) for line in (REPO / "examples/data/qa_train.jsonl").read_text().splitlines()]
    write_json(rlhf / "qa" / "train_random_8000.json", qa)
    write_json(rlhf / "qa" / "dev_random_500.json", qa[:4])
    code = [json.loads(line) for line in (REPO / "examples/data/code_train.jsonl").read_text().splitlines()]
    write_json(rlhf / "code" / "train.json", code)
    write_json(rlhf / "code" / "val.json", code[:4])
    (root / "data" / "gsm8k").mkdir(parents=True)
    for split, n in (("train", 16), ("test", 8)):
        rows = [{
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": r["question"] + ' Let\'s think step by step and output the final answer after "####".'}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": r["answer"]},
            "extra_info": {"split": split, "index": i, "answer": r["answer"], "question": r["question"]},
        } for i, r in enumerate(gsm8k_rows(split, n))]
        pq.write_table(pa.Table.from_pylist(rows), root / "data" / "gsm8k" / f"{split}.parquet")
    (root / "gsm8k_score.py").write_text(VERL_SCORE)
    return root


def train(workdir: Path, command: str, extra: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([*RELAY, *command.split(), *extra], cwd=workdir, env=env, capture_output=True, text=True, timeout=900)


def steps_trained(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sorted({r["step"] for r in records if "reward/mean" in r})


CASES = {
    "agentfly_gsm8k_calculator_grpo": (AGENTFLY_GSM8K, []),
    "agentfly_react_search_reinforce": (AGENTFLY_REACT_SEARCH, [f"agent.tool_configs.google_search.corpus={REPO}/examples/data/qa_corpus.jsonl"]),
    "agentfly_code_agent": (AGENTFLY_CODE, []),
    "verl_gsm8k_parquet_grpo": (VERL_GSM8K, []),
}


@pytest.mark.parametrize("name", CASES)
def test_pasted_command_trains_two_steps(workdir, tiny_model_dir, name):
    command, extra = CASES[name]
    run_dir = workdir / "runs" / name
    out = train(workdir, command, [*extra, *tiny_override(tiny_model_dir, run_dir)])
    assert out.returncode == 0, out.stderr[-4000:]
    assert steps_trained(run_dir) == [1, 2]
    assert "Traceback" not in out.stderr
    if name.startswith("verl"):
        for setting in ("rollout.free_cache_engine=true", "rollout.mode=async"):
            assert f"note: actor_rollout_ref.{setting}: no effect" in out.stderr
        assert "note: actor_rollout_ref.actor.use_dynamic_bsz" not in out.stderr  # token-budget micro-batches


def test_resume_with_a_changed_learning_rate_is_refused(workdir, tiny_model_dir):
    run_dir = workdir / "runs" / "resume"
    base = [*tiny_override(tiny_model_dir, run_dir), "trainer.save_freq=2"]
    first = train(workdir, VERL_GSM8K, base)
    assert first.returncode == 0, first.stderr[-4000:]
    assert (run_dir / "checkpoints" / "global_step_2" / "COMPLETE").exists()
    again = train(workdir, VERL_GSM8K, [*base, "actor_rollout_ref.actor.optim.lr=2e-6"])
    assert again.returncode == 2
    assert "actor_rollout_ref.actor.optim.lr: 1e-06 -> 2e-06" in again.stderr
    assert "set a new trainer.experiment_name" in again.stderr and "trainer.resume_mode=disable" in again.stderr
    assert "Traceback" not in again.stderr
    assert steps_trained(run_dir) == [1, 2]  # nothing more was trained or overwritten


@pytest.mark.parametrize("script", ["gsm8k_calculator_grpo", "react_qa_search_reinforce", "code_interpreter_grpo"])
def test_example_scripts_with_the_tiny_model(script):
    if script.startswith("gsm8k") and not (GSM8K / "train.jsonl").exists():
        pytest.skip("GSM8K not at /work/shared/data/gsm8k")
    env = {**os.environ, "MODEL": "tiny", "DATA": str(GSM8K)}  # the script's default ../shared is relative to a checkout in /work
    out = subprocess.run(["bash", f"examples/{script}.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert steps_trained(REPO / "runs" / "relay-examples" / f"{script}-tiny")[-1] == 2
