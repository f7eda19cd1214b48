"""Config schema, presets, overrides, aliases and error messages."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from configs import schema
from configs.loader import (
    ALIASES,
    CONFIG_DIR,
    ConfigError,
    all_keys,
    canonical_key,
    derive,
    dump_config,
    load_config,
    no_effect_notes,
)
from configs.schema import RelayConfig

REPO = Path(__file__).resolve().parents[1]
PRESET_FILES = sorted(CONFIG_DIR.rglob("*.yaml"))


def get(cfg: BaseModel, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- presets


def test_there_are_presets():
    names = {p.relative_to(CONFIG_DIR).as_posix() for p in PRESET_FILES}
    assert {"demo.yaml", "gsm8k.yaml", "experiment/quick_test.yaml", "experiment/single_gpu.yaml",
            "experiment/multi_node.yaml"} <= names


@pytest.mark.parametrize("preset", PRESET_FILES, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_every_preset_loads(preset, tmp_path):
    cfg = load_config([preset])
    assert "{" not in cfg.trainer.default_local_dir
    assert cfg.critic.model.path is not None
    assert load_config([write(tmp_path / "resolved.yaml", dump_config(cfg))]) == cfg


def test_preset_by_name_and_contents():
    demo = load_config(["demo"])
    assert demo.agent.tools == ["calculator"] and demo.algorithm.adv_estimator == "grpo"
    assert demo.data.train_files == ["runs/demo/data/train.jsonl"]
    assert demo.data.val_files == ["runs/demo/data/test.jsonl"]
    assert demo.trainer.n_gpus_per_node == 2 and demo.actor_rollout_ref.rollout.num_actors == 2
    assert load_config([]).trainer.n_gpus_per_node is None  # without a preset: fitted to the machine

    quick = load_config(["experiment/quick_test"])
    assert quick.trainer.total_training_steps == 10
    assert quick.agent == demo.agent  # inherited through defaults: [../demo.yaml]

    gsm = load_config(["gsm8k.yaml"])
    assert gsm.data.train_files == ["../shared/data/gsm8k/train.jsonl"]
    assert gsm.agent.reward_name == "gsm8k_reward"
    assert (REPO / gsm.data.train_files[0]).exists() or not (REPO.parent / "shared").exists()

    multi = load_config(["experiment/multi_node.yaml"])
    assert multi.trainer.nnodes == 2 and multi.transport.bind_host == "0.0.0.0"
    assert multi.actor_rollout_ref.rollout.name == "vllm"


def test_defaults_only_schema():
    cfg = load_config()
    assert cfg == derive(RelayConfig())
    assert cfg.trainer.default_local_dir == "runs/relay/demo"


# --------------------------------------------------------------------------- keys users type

ACCEPTED_KEYS = """
agent.{use_agent,agent_type,tools,template,model_name_or_path,reward_name,backend,max_turns,max_steps,num_chains,max_tokens_per_turn}
agent.init_args.{use_agent,agent_type,tools,template,model_name_or_path,reward_name,backend,max_turns,max_steps,num_chains,max_tokens_per_turn}
algorithm.{adv_estimator,gamma,lam,use_kl_in_reward,kl_penalty,kl_ctrl.type,kl_ctrl.kl_coef,kl_ctrl.target_kl,kl_ctrl.horizon}
data.{train_files,val_files,train_batch_size,val_batch_size}
trainer.{project_name,experiment_name,logger,total_training_steps,total_epochs,nnodes,n_gpus_per_node,save_freq,test_freq,val_before_train,critic_warmup,resume_mode,resume_from_path}
actor_rollout_ref.actor.{optim.lr,ppo_mini_batch_size,ppo_micro_batch_size_per_gpu,use_kl_loss,kl_loss_coef,kl_loss_type,entropy_coeff,fsdp_config.param_offload,fsdp_config.optimizer_offload}
actor_rollout_ref.model.{path,enable_gradient_checkpointing,use_remove_padding}
actor_rollout_ref.rollout.{name,response_length,tensor_model_parallel_size,gpu_memory_utilization,log_prob_micro_batch_size_per_gpu}
actor_rollout_ref.ref.{fsdp_config.param_offload,log_prob_micro_batch_size_per_gpu}
critic.model.path
critic.{ppo_mini_batch_size,ppo_micro_batch_size_per_gpu}
"""


def expand(spec: str) -> list[str]:
    keys = []
    for line in spec.split():
        m = re.fullmatch(r"(.*)\{(.*)\}", line)
        keys += [m[1] + leaf for leaf in m[2].split(",")] if m else [line]
    return keys


# value as typed on the command line, and the value expected on the canonical field,
# by the key's last dotted part (plus kl_ctrl.type, whose last part is ambiguous)
VALUES = {
    "use_agent": ("false", False),
    "agent_type": ("react", "react"),
    "tools": ("[calculator,search]", ["calculator", "search"]),
    "template": ("qwen2.5", "qwen2.5"),
    "model_name_or_path": ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
    "reward_name": ("gsm8k_reward", "gsm8k_reward"),
    "backend": ("async_vllm", "vllm"),
    "max_turns": ("3", 3),
    "max_steps": ("5", 5),
    "num_chains": ("4", 4),
    "max_tokens_per_turn": ("64", 64),
    "adv_estimator": ("rloo", "rloo"),
    "gamma": ("0.99", 0.99),
    "lam": ("0.95", 0.95),
    "use_kl_in_reward": ("True", True),
    "kl_penalty": ("low_var_kl", "low_var_kl"),
    "kl_ctrl.type": ("adaptive", "adaptive"),
    "kl_coef": ("0.05", 0.05),
    "target_kl": ("0.2", 0.2),
    "horizon": ("500", 500),
    "train_files": ("/a/b.jsonl", ["/a/b.jsonl"]),
    "val_files": ("[/a/c.jsonl,/a/d.jsonl]", ["/a/c.jsonl", "/a/d.jsonl"]),
    "train_batch_size": ("16", 16),
    "val_batch_size": ("64", 64),
    "project_name": ("proj", "proj"),
    "experiment_name": ("exp1", "exp1"),
    "logger": ("['console','wandb']", ["console", "wandb"]),
    "total_training_steps": ("100", 100),
    "total_epochs": ("3", 3),
    "nnodes": ("2", 2),
    "n_gpus_per_node": ("8", 8),
    "save_freq": ("10", 10),
    "test_freq": ("5", 5),
    "val_before_train": ("False", False),
    "critic_warmup": ("2", 2),
    "resume_mode": ("disable", "disable"),
    "resume_from_path": ("/ckpt/step_10", "/ckpt/step_10"),
    "lr": ("1e-6", 1e-6),
    "ppo_mini_batch_size": ("2", 2),
    "ppo_micro_batch_size_per_gpu": ("2", 2),
    "use_kl_loss": ("true", True),
    "kl_loss_coef": ("0.01", 0.01),
    "kl_loss_type": ("k3", "k3"),
    "entropy_coeff": ("0.001", 0.001),
    "param_offload": ("true", True),
    "optimizer_offload": ("True", True),
    "path": ("/models/qwen", "/models/qwen"),
    "enable_gradient_checkpointing": ("true", True),
    "use_remove_padding": ("true", True),
    "name": ("vllm", "vllm"),
    "response_length": ("512", 512),
    "tensor_model_parallel_size": ("2", 2),
    "gpu_memory_utilization": ("0.7", 0.7),
    "log_prob_micro_batch_size_per_gpu": ("32", 32),
}

# where the AgentFly spellings must land (independent of the loader's table)
EXPECTED_CANONICAL = {
    "agent.max_steps": "agent.max_turns",
    "agent.model_name_or_path": "actor_rollout_ref.model.path",
    "agent.backend": "actor_rollout_ref.rollout.name",
}


def expected_canonical(key: str) -> str:
    key = key.replace("agent.init_args.", "agent.")
    return EXPECTED_CANONICAL.get(key, key)


def value_for(key: str):
    return VALUES.get(".".join(key.split(".")[-2:])) or VALUES[key.split(".")[-1]]


@pytest.mark.parametrize("key", expand(ACCEPTED_KEYS))
def test_key_accepted_as_written(key):
    text, expected = value_for(key)
    target = expected_canonical(key)
    assert target in all_keys()
    assert canonical_key(key) == target
    cfg = load_config([], [f"{key}={text}"])
    assert get(cfg, target) == expected


def test_accepted_keys_list_is_complete():
    keys = expand(ACCEPTED_KEYS)
    assert len(keys) == 11 * 2 + 9 + 4 + 13 + 9 + 3 + 5 + 2 + 1 + 2
    assert set(keys) <= set(all_keys(aliases=True))


def test_aliases_in_nested_yaml(tmp_path):
    preset = write(tmp_path / "agentfly.yaml", """
agent:
  init_args:
    max_steps: 7
    model_name_or_path: my/model
  backend: transformers
actor_rollout_ref:
  rollout:
    n: 6
    val_kwargs:
      temperature: 0.6
""")
    cfg = load_config([preset])
    assert cfg.agent.max_turns == 7
    assert cfg.actor_rollout_ref.model.path == "my/model"
    assert cfg.critic.model.path == "my/model"
    assert cfg.actor_rollout_ref.rollout.name == "hf"
    assert cfg.agent.num_chains == 6
    assert cfg.actor_rollout_ref.rollout.val_temperature == 0.6


def test_every_alias_targets_a_valid_key():
    for alias, target in ALIASES.items():
        if target.endswith(".*"):
            assert any(k.startswith(target[:-1]) for k in all_keys()), alias
        else:
            assert canonical_key(target) in all_keys(), alias


@pytest.mark.parametrize(
    "backend, name",
    [("async_vllm", "vllm"), ("vllm", "vllm"), ("async_verl", "vllm"), ("transformers", "hf"), ("hf", "hf")],
)
def test_backend_value_mapping(backend, name):
    for key in ("agent.backend", "agent.init_args.backend"):
        assert load_config([], [f"{key}={backend}"]).actor_rollout_ref.rollout.name == name


def test_backend_without_equivalent_is_an_error():
    with pytest.raises(ConfigError, match=r"agent\.backend: 'client' has no Relay equivalent"):
        load_config([], ["agent.backend=client"])


# --------------------------------------------------------------------------- override parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[calculator,search]", ["calculator", "search"]),
        ("[calculator, search]", ["calculator", "search"]),
        ('["calculator"]', ["calculator"]),
        ("['calculator','search']", ["calculator", "search"]),
        ("calculator", ["calculator"]),
        ("[]", []),
    ],
)
def test_list_override(text, expected):
    assert load_config([], [f"agent.tools={text}"]).agent.tools == expected


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("trainer.logger=['console','wandb']", "trainer.logger", ["console", "wandb"]),
        ("trainer.logger=[console,tensorboard]", "trainer.logger", ["console", "tensorboard"]),
        ("data.train_files=/a/b.jsonl", "data.train_files", ["/a/b.jsonl"]),
        ("trainer.val_before_train=true", "trainer.val_before_train", True),
        ("trainer.val_before_train=True", "trainer.val_before_train", True),
        ("trainer.val_before_train=false", "trainer.val_before_train", False),
        ("actor_rollout_ref.actor.optim.lr=1e-6", "actor_rollout_ref.actor.optim.lr", 1e-6),
        ("actor_rollout_ref.actor.optim.lr=3E-5", "actor_rollout_ref.actor.optim.lr", 3e-5),
        ("actor_rollout_ref.actor.optim.lr=0.0005", "actor_rollout_ref.actor.optim.lr", 5e-4),
        ("agent.template=null", "agent.template", None),
        ("trainer.total_training_steps=null", "trainer.total_training_steps", None),
        ("+agent.system_prompt=Be brief.", "agent.system_prompt", "Be brief."),
        ("++algorithm.gamma=0.5", "algorithm.gamma", 0.5),
        ("trainer.experiment_name=007", "trainer.experiment_name", "007"),
        ("trainer.experiment_name=1.0", "trainer.experiment_name", "1.0"),
        ("trainer.experiment_name='a b'", "trainer.experiment_name", "a b"),
        ("transport.host=10.0.0.1", "transport.host", "10.0.0.1"),
        ("actor_rollout_ref.actor.optim.betas=[0.9,0.95]", "actor_rollout_ref.actor.optim.betas", (0.9, 0.95)),
        ("actor_rollout_ref.model.target_modules=[q_proj,v_proj]", "actor_rollout_ref.model.target_modules",
         ["q_proj", "v_proj"]),
        ("algorithm.kl_ctrl={type: adaptive, kl_coef: 0.02}", "algorithm.kl_ctrl.kl_coef", 0.02),
    ],
)
def test_override_values(override, key, expected):
    assert get(load_config([], [override]), key) == expected


def test_later_override_wins_and_reset():
    cfg = load_config([], ["algorithm.gamma=0.5", "algorithm.gamma=0.7"])
    assert cfg.algorithm.gamma == 0.7
    assert load_config(["demo"], ["~trainer.total_training_steps"]).trainer.total_training_steps is None


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        load_config([], ["algorithm.gamma"])


# --------------------------------------------------------------------------- errors


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError) as e:
        load_config([], ["algorithm.adv_estimater=grpo"])
    assert str(e.value) == "unknown config key 'algorithm.adv_estimater'; did you mean 'algorithm.adv_estimator'?"


def test_unknown_key_suggests_alias_spelling():
    with pytest.raises(ConfigError, match=r"did you mean 'agent\.init_args\.max_steps'"):
        load_config([], ["agent.init_args.max_step=3"])


def test_unknown_key_in_preset_names_file(tmp_path):
    preset = write(tmp_path / "bad.yaml", "actor_rollout_ref:\n  actor:\n    optim:\n      lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config([preset])
    assert "did you mean 'actor_rollout_ref.actor.optim.lr'?" in str(e.value)
    assert "bad.yaml" in str(e.value)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError) as e:
        load_config([], ["algorithm.gamma=abc"])
    assert str(e.value) == "algorithm.gamma: expected a number, got 'abc'"
    with pytest.raises(ConfigError, match=r"^data\.train_batch_size: expected an integer, got 'many'"):
        load_config([], ["data.train_batch_size=many"])
    with pytest.raises(ConfigError, match=r"^trainer\.val_before_train: expected a boolean"):
        load_config([], ["trainer.val_before_train=maybe"])
    with pytest.raises(ConfigError, match=r"^trainer\.logger\[1\]: expected one of .*'wandb'.*, got 'slack'"):
        load_config([], ["trainer.logger=[console,slack]"])
    with pytest.raises(ConfigError, match=r"^algorithm\.adv_estimator: expected one of .*got 'ppo'"):
        load_config([], ["algorithm.adv_estimator=ppo"])
    with pytest.raises(ConfigError, match=r"^actor_rollout_ref\.rollout\.top_p: must be less than or equal to 1"):
        load_config([], ["actor_rollout_ref.rollout.top_p=1.5"])
    with pytest.raises(ConfigError, match=r"^algorithm\.gamma: expected a number, got True"):
        load_config([], ["algorithm.gamma=true"])
    with pytest.raises(ConfigError, match=r"^data\.train_batch_size: expected an integer, got 2\.5"):
        load_config([], ["data.train_batch_size=2.5"])
    with pytest.raises(ConfigError, match=r"^actor_rollout_ref\.model\.target_modules: expected a list or a string"):
        load_config([], ["actor_rollout_ref.model.target_modules={a: 1}"])


def test_numbers_in_text_fields_are_text(tmp_path):
    preset = write(tmp_path / "n.yaml", "trainer:\n  experiment_name: 7\nagent:\n  template: 2.5\n")
    cfg = load_config([preset])
    assert (cfg.trainer.experiment_name, cfg.agent.template) == ("7", "2.5")
    assert cfg.trainer.default_local_dir == "runs/relay/7"


def test_wrong_type_in_preset_names_key_and_file(tmp_path):
    preset = write(tmp_path / "typed.yaml", "algorithm:\n  gamma: high\n")
    with pytest.raises(ConfigError, match=r"algorithm\.gamma: expected a number, got 'high' \(in .*typed\.yaml\)"):
        load_config([preset])


def test_bad_yaml_names_file(tmp_path):
    preset = write(tmp_path / "broken.yaml", "agent:\n  tools: [calculator\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: invalid YAML"):
        load_config([preset])


def test_preset_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"list\.yaml: a preset must be a mapping"):
        load_config([write(tmp_path / "list.yaml", "- a\n- b\n")])


def test_missing_preset():
    with pytest.raises(ConfigError, match="preset 'nope' not found; bundled presets: .*demo"):
        load_config(["nope"])


def test_section_given_a_value():
    with pytest.raises(ConfigError, match="'algorithm' is a section"):
        load_config([], ["algorithm=grpo"])


def test_cross_section_checks():
    with pytest.raises(ConfigError, match=r"data\.train_batch_size \(6\) must be a multiple of .*ppo_mini_batch_size \(4\)"):
        load_config([], ["data.train_batch_size=6"])
    with pytest.raises(ConfigError, match="agent.num_chains"):
        load_config([], ["actor_rollout_ref.rollout.n=1"])
    assert load_config([], ["actor_rollout_ref.rollout.n=1", "algorithm.adv_estimator=reinforce_plus_plus"])
    with pytest.raises(ConfigError, match="resume_from_path"):
        load_config([], ["trainer.resume_mode=resume_path"])


def test_error_type():
    assert issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------- layering


def test_layered_presets_later_wins(tmp_path):
    base = write(tmp_path / "base.yaml", "algorithm:\n  gamma: 0.5\n  lam: 0.5\nagent:\n  max_turns: 2\n")
    write(tmp_path / "sub" / "child.yaml",
          "defaults: [../base.yaml]\nalgorithm:\n  gamma: 0.6\ntrainer:\n  experiment_name: child\n")
    last = write(tmp_path / "last.yaml", "algorithm.lam: 0.9\n")

    child = load_config([tmp_path / "sub" / "child.yaml"])
    assert (child.algorithm.gamma, child.algorithm.lam, child.agent.max_turns) == (0.6, 0.5, 2)
    assert child.trainer.default_local_dir == "runs/relay/child"

    both = load_config([tmp_path / "sub" / "child.yaml", last], ["agent.max_steps=9"])
    assert (both.algorithm.gamma, both.algorithm.lam, both.agent.max_turns) == (0.6, 0.9, 9)

    assert load_config([tmp_path / "sub" / "child.yaml", base]).algorithm.gamma == 0.5


def test_defaults_self_position_and_cycle(tmp_path):
    write(tmp_path / "a.yaml", "algorithm:\n  gamma: 0.1\n")
    b = write(tmp_path / "b.yaml", "defaults: [_self_, a]\nalgorithm:\n  gamma: 0.2\n")
    assert load_config([b]).algorithm.gamma == 0.1
    c = write(tmp_path / "c.yaml", "defaults: [d.yaml]\n")
    write(tmp_path / "d.yaml", "defaults: [c.yaml]\n")
    with pytest.raises(ConfigError, match="defaults cycle"):
        load_config([c])


# --------------------------------------------------------------------------- derive / dump


def test_derive():
    cfg = load_config([], ["trainer.project_name=p", "trainer.experiment_name=e",
                           "actor_rollout_ref.actor.clip_ratio=0.3",
                           "actor_rollout_ref.actor.clip_ratio_high=0.28",
                           "actor_rollout_ref.model.path=m"])
    assert cfg.trainer.default_local_dir == "runs/p/e"
    assert cfg.actor_rollout_ref.actor.clip_ratio_low == 0.3
    assert cfg.actor_rollout_ref.actor.clip_ratio_high == 0.28
    assert cfg.critic.model.path == "m"
    assert cfg.critic.ppo_mini_batch_size == cfg.actor_rollout_ref.actor.ppo_mini_batch_size
    assert cfg.transport.weights_dir == "runs/p/e/weights"
    assert derive(cfg) == cfg
    explicit = load_config([], ["trainer.default_local_dir=/scratch/run", "critic.model.path=c"])
    assert explicit.trainer.default_local_dir == "/scratch/run" and explicit.critic.model.path == "c"


def test_dump_round_trip(tmp_path):
    cfg = load_config(["experiment/multi_node"], ["agent.tools=[calculator,search]"])
    dumped = write(tmp_path / "resolved.yaml", dump_config(cfg))
    assert load_config([dumped]) == cfg


# --------------------------------------------------------------------------- schema hygiene


def _models():
    seen, todo = [], [RelayConfig]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.append(model)
        for field in model.model_fields.values():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                todo.append(field.annotation)
    return seen


def test_every_field_documented_and_strict():
    for model in _models():
        assert model.model_config.get("extra") == "forbid", model.__name__
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"


def test_all_keys():
    keys = all_keys()
    assert len(keys) == len(set(keys))
    assert "actor_rollout_ref.actor.optim.lr" in keys and "agent.max_steps" not in keys
    with_aliases = all_keys(aliases=True)
    assert {"agent.max_steps", "agent.init_args.max_steps", "agent.init_args.tools"} <= set(with_aliases)


def test_no_effect_notes():
    cfg = load_config([], ["actor_rollout_ref.rollout.tensor_model_parallel_size=2", "trainer.n_gpus_per_node=2",
                           "actor_rollout_ref.rollout.gpu_memory_utilization=0.9",
                           "actor_rollout_ref.actor.fsdp_config.param_offload=true",
                           "algorithm.kl_ctrl.kl_coef=0.1"])
    cpu = "\n".join(no_effect_notes(cfg, has_gpu=False))
    for key in ("rollout.tensor_model_parallel_size=2", "gpu_memory_utilization=0.9",
                "actor.fsdp_config.param_offload=true", "n_gpus_per_node=2",
                "kl_ctrl.kl_coef=0.1"):
        assert key in cpu
    assert "use_remove_padding" not in cpu  # packing runs on CPU too (SDPA block mask)
    gpu = "\n".join(no_effect_notes(cfg, has_gpu=True))
    assert "param_offload" not in gpu and "n_gpus_per_node" not in gpu
    assert "tensor_model_parallel_size=2: only used by rollout.name=vllm" in gpu
    assert no_effect_notes(load_config(), has_gpu=True) == []
    forced_cpu = load_config([], ["trainer.device=cpu", "trainer.n_gpus_per_node=2"])
    assert any("n_gpus_per_node" in n for n in no_effect_notes(forced_cpu, has_gpu=True))


def test_configs_import_without_torch():
    code = "import sys, configs.loader, configs.schema; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_schema_module_has_no_torch_import():
    for path in CONFIG_DIR.glob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+torch", path.read_text(), re.M), path
    assert schema.RelayConfig is RelayConfig


# --------------------------------------------------------------------------- verl scripts, Agent-Tunix, Hydra habits

from configs.loader import NO_EFFECT, TUNIX_ALIASES, load_config_with_notes, suggest_key  # noqa: E402

# verl keys from its GSM8K/PPO run scripts that Relay implements (key=value -> (canonical key, value))
VERL_IMPLEMENTED = {
    "actor_rollout_ref.rollout.max_model_len=4096": ("actor_rollout_ref.rollout.max_model_len", 4096),
    "actor_rollout_ref.rollout.enforce_eager=True": ("actor_rollout_ref.rollout.enforce_eager", True),
    "actor_rollout_ref.rollout.max_num_batched_tokens=8192": ("actor_rollout_ref.rollout.max_num_batched_tokens", 8192),
    "actor_rollout_ref.rollout.val_kwargs.temperature=0.6": ("actor_rollout_ref.rollout.val_temperature", 0.6),
    "actor_rollout_ref.rollout.val_kwargs.do_sample=True": ("actor_rollout_ref.rollout.val_do_sample", True),
    "actor_rollout_ref.rollout.val_kwargs.n=1": ("actor_rollout_ref.rollout.val_n", 1),
    "data.truncation='left'": ("data.truncation", "left"),
    "data.truncation=right": ("data.truncation", "right"),
    "data.truncation='error'": ("data.truncation", "error"),
    "data.filter_overlong_prompts=True": ("data.filter_overlong_prompts", True),
    "custom_reward_function.path=rewards/my_score.py": ("agent.reward_name", "rewards/my_score.py:compute_score"),
    "actor_rollout_ref.actor.use_dynamic_bsz=True": ("actor_rollout_ref.actor.use_dynamic_bsz", True),
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=24000": ("actor_rollout_ref.actor.ppo_max_token_len_per_gpu", 24000),
    "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True": ("actor_rollout_ref.rollout.log_prob_use_dynamic_bsz", True),
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=8000": ("actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu", 8000),
    "actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True": ("actor_rollout_ref.ref.log_prob_use_dynamic_bsz", True),
    "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=8000": ("actor_rollout_ref.ref.log_prob_max_token_len_per_gpu", 8000),
}


@pytest.mark.parametrize("override", VERL_IMPLEMENTED)
def test_verl_keys_with_behaviour(override):
    key, expected = VERL_IMPLEMENTED[override]
    cfg, notes = load_config_with_notes([], [override])
    assert get(cfg, key) == expected
    assert notes == []


def test_val_do_sample_false_is_greedy_and_custom_reward_name():
    cfg = load_config([], ["actor_rollout_ref.rollout.val_kwargs.temperature=0.6",
                           "actor_rollout_ref.rollout.val_kwargs.do_sample=False",
                           "custom_reward_function.path=/x/r.py", "custom_reward_function.name=score"])
    assert cfg.actor_rollout_ref.rollout.val_temperature == 0.0
    assert cfg.agent.reward_name == "/x/r.py:score"
    assert derive(cfg) == cfg


def test_log_prob_token_budgets_follow_the_actor_unless_set():
    """As verl's defaults (``${actor.use_dynamic_bsz}``, ``${actor.ppo_max_token_len_per_gpu}``)."""
    cfg = load_config([], ["actor_rollout_ref.actor.use_dynamic_bsz=True", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=6000",
                           "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=9000"])
    arr = cfg.actor_rollout_ref
    assert (arr.rollout.log_prob_use_dynamic_bsz, arr.rollout.log_prob_max_token_len_per_gpu) == (True, 6000)
    assert (arr.ref.log_prob_use_dynamic_bsz, arr.ref.log_prob_max_token_len_per_gpu) == (True, 9000)
    off = load_config([], ["actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True"]).actor_rollout_ref
    assert (off.actor.use_dynamic_bsz, off.rollout.log_prob_use_dynamic_bsz, off.ref.log_prob_use_dynamic_bsz) == (False, True, False)
    assert off.rollout.log_prob_max_token_len_per_gpu == off.actor.ppo_max_token_len_per_gpu == 16384
    assert derive(cfg) == cfg


VERL_NO_EFFECT = [
    "critic.use_dynamic_bsz=True",
    "critic.ppo_max_token_len_per_gpu=24000",
    "actor_rollout_ref.rollout.free_cache_engine=True",
    "actor_rollout_ref.rollout.mode=async",
    "actor_rollout_ref.actor.strategy=fsdp2",
    "reward_model.reward_manager=prime",
    "trainer.balance_batch=True",
]


def test_verl_keys_without_effect_are_accepted_with_one_note_each():
    cfg, notes = load_config_with_notes([], VERL_NO_EFFECT)
    assert cfg == load_config()
    assert len(notes) == len(VERL_NO_EFFECT)
    for override, note in zip(VERL_NO_EFFECT, notes):
        key, value = override.split("=")
        assert note.startswith(f"{key}={value.lower() if value in ('True', 'False') else value}: no effect")
        assert "\n" not in note


def test_verl_values_matching_relay_say_nothing():
    _, notes = load_config_with_notes([], [
        "actor_rollout_ref.actor.strategy=fsdp", "reward_model.enable=False",
        "critic.use_dynamic_bsz=False", "actor_rollout_ref.actor.ulysses_sequence_parallel_size=1",
    ])
    assert notes == []


def test_verl_values_relay_cannot_honour_are_errors():
    with pytest.raises(ConfigError) as e:
        load_config([], ["reward_model.enable=True", "actor_rollout_ref.actor.strategy=megatron"])
    lines = str(e.value).splitlines()
    assert lines[0].startswith("reward_model.enable=true: Relay has no learned reward model")
    assert lines[1] == "actor_rollout_ref.actor.strategy=megatron: Relay's learner trains with FSDP only"


def test_every_error_of_a_command_is_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config([], ["actor_rollout_ref.rollout.max_model_lenn=4096", "data.trunc=left", "algorithm.gamma=high",
                         "trainer.logger=[console,slack]", "nonsense"])
    lines = str(e.value).splitlines()
    assert len(lines) == 5
    assert lines[0] == ("unknown config key 'actor_rollout_ref.rollout.max_model_lenn'; "
                        "did you mean 'actor_rollout_ref.rollout.max_model_len'?")
    assert lines[1].startswith("unknown config key 'data.trunc'; no key is named like it")
    assert lines[2] == "override 'nonsense' is not of the form key=value"
    assert lines[3] == "algorithm.gamma: expected a number, got 'high'"
    assert lines[4].startswith("trainer.logger[1]: expected one of")


@pytest.mark.parametrize(
    "typed, suggestion",
    [
        ("algorithm.adv_estimater", "algorithm.adv_estimator"),
        ("actor_rollout_ref.rollout.lr", "actor_rollout_ref.actor.optim.lr"),  # same last part
        ("actor_rollout_ref.actor.optim.lrr", "actor_rollout_ref.actor.optim.lr"),
        ("trainer.total_training_step", "trainer.total_training_steps"),
        ("actor_rollout_ref.rollout.max_modl_len", "actor_rollout_ref.rollout.max_model_len"),
        ("actor_rollout_ref.rollout.foo_bar_baz", None),
        ("data.shuffle_seed", None),  # 'seed' and 'shuffle' exist, but no last part is close
    ],
)
def test_did_you_mean_only_when_close(typed, suggestion):
    assert suggest_key(typed) == suggestion


TUNIX = {
    "grpo.num_generations=4": ("agent.num_chains", 4),
    "grpo.epsilon=0.2": ("actor_rollout_ref.actor.clip_ratio", 0.2),
    "optimizer.learning_rate=3e-6": ("actor_rollout_ref.actor.optim.lr", 3e-6),
    "optimizer.warmup_ratio=0.1": ("actor_rollout_ref.actor.optim.lr_warmup_steps_ratio", 0.1),
    "optimizer.max_grad_norm=0.1": ("actor_rollout_ref.actor.grad_clip", 0.1),
    "model.lora_rank=64": ("actor_rollout_ref.model.lora_rank", 64),
    "generation.temperature=0.9": ("actor_rollout_ref.rollout.temperature", 0.9),
    "generation.top_k=50": ("actor_rollout_ref.rollout.top_k", 50),
    "generation.top_p=0.95": ("actor_rollout_ref.rollout.top_p", 0.95),
    "generation.max_generation_steps=768": ("actor_rollout_ref.rollout.response_length", 768),
    "generation.max_prompt_length=256": ("data.max_prompt_length", 256),
    "training.micro_batch_size=2": ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", 2),
    "training.num_epochs=3": ("trainer.total_epochs", 3),
}


@pytest.mark.parametrize("override", TUNIX)
def test_agent_tunix_keys(override):
    key, expected = TUNIX[override]
    assert get(load_config([], [override]), key) == expected


def test_tunix_table_is_tested_and_beta_turns_the_kl_loss_on():
    assert {o.split("=")[0] for o in TUNIX} | {"grpo.beta", "optimizer.weight_decay", "model.lora_alpha"} == set(TUNIX_ALIASES)
    on = load_config([], ["grpo.beta=0.04"]).actor_rollout_ref.actor
    assert (on.use_kl_loss, on.kl_loss_coef) == (True, 0.04)
    assert load_config([], ["grpo.beta=0"]).actor_rollout_ref.actor.use_kl_loss is False


def test_hydra_experiment_group_selects_the_preset():
    for text in ("+experiment=quick_test", "experiment=quick_test", "++experiment=quick_test.yaml"):
        assert load_config([], [text]) == load_config(["experiment/quick_test"])
    # the group is applied before the other overrides, wherever it is written
    cfg = load_config([], ["trainer.total_training_steps=3", "+experiment=quick_test"])
    assert cfg.trainer.total_training_steps == 3 and cfg.trainer.experiment_name == "quick_test"
    with pytest.raises(ConfigError, match=r"no preset 'experiment/quik_test'; experiment presets: multi_node, quick_test"):
        load_config([], ["+experiment=quik_test"])


def test_tool_configs_from_the_command_line_and_yaml(tmp_path):
    cfg = load_config([], ["agent.tools=[search,answer]", "agent.tool_configs.search.corpus=docs.jsonl",
                           "agent.tool_configs.search.top_k=5", "agent.tool_configs.code_interpreter.wall_s=2.5"])
    assert cfg.agent.tool_configs == {"search": {"corpus": "docs.jsonl", "top_k": 5}, "code_interpreter": {"wall_s": 2.5}}
    preset = write(tmp_path / "t.yaml", "agent:\n  tool_configs:\n    search: {endpoint: 'http://x', style: searxng}\n")
    assert load_config([preset]).agent.tool_configs == {"search": {"endpoint": "http://x", "style": "searxng"}}
    # a later setting of a level replaces what was below it; ~ forgets; {} empties
    later = load_config([preset], ["agent.tool_configs.search={corpus: c.jsonl}"])
    assert later.agent.tool_configs == {"search": {"corpus": "c.jsonl"}}
    assert load_config([preset], ["~agent.tool_configs"]).agent.tool_configs == {}
    assert load_config([preset], ["agent.tool_configs={}"]).agent.tool_configs == {}
    assert load_config([], ["agent.init_args.tool_configs.search.corpus=a.jsonl"]).agent.tool_configs == {"search": {"corpus": "a.jsonl"}}
    assert load_config([write(tmp_path / "d.yaml", dump_config(cfg))]) == cfg
    with pytest.raises(ConfigError, match=r"agent\.tool_configs"):
        load_config([], ["agent.tool_configs.search=3"])


def test_prompt_length_default_is_verls():
    assert load_config().data.max_prompt_length == 512
    assert load_config().data.val_files == []


def test_migrating_doc_tables_are_generated_from_the_alias_tables():
    from configs import migrating

    text = migrating.DOC.read_text()
    assert text == migrating.render(text), "docs/migrating.md is out of date: run python -m configs.migrating"
    for table in (migrating.AGENTFLY_ALIASES, migrating.VERL_ALIASES, migrating.TUNIX_ALIASES, NO_EFFECT):
        for key in table:
            assert f"`{key.removesuffix('*')}" in text, key
