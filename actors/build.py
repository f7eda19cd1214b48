"""Assembling an actor's parts (engine, tokenizer, agent, tools, reward) from config.

Shared by the actor process, ``relay eval`` and the SFT demonstration builder,
so every path rolls out episodes with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.engines.base import Engine, SamplingSettings
from actors.rollout import EpisodeLimits, ToolBox, encode
from configs.schema import RelayConfig


@dataclass
class Parts:
    tokenizer: object
    agent: object
    toolbox: ToolBox
    scorer: object
    limits: EpisodeLimits
    sampling: SamplingSettings


def build_parts(cfg: RelayConfig, model_path: str) -> Parts:
    """Everything but the engine, for ``cfg`` and the model at ``model_path``."""
    from transformers import AutoConfig, AutoTokenizer

    from actors.actor import Scorer
    from envs.agents import agent_for_config
    from envs.rewards import get_reward

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    agent = agent_for_config(cfg, tokenizer)
    tools = list(agent.tools.values())

    def count_tokens(text: str) -> int:
        return len(encode(tokenizer, text))

    toolbox = ToolBox(tools, cfg.agent.tool_timeout_s, cfg.agent.tool_max_output_tokens, count_tokens)
    stop_ids = {tokenizer.convert_tokens_to_ids(s) for s in agent.stop_strings}
    if tokenizer.eos_token_id is not None:
        stop_ids.add(tokenizer.eos_token_id)
    stop_ids.discard(tokenizer.unk_token_id)
    rollout = cfg.actor_rollout_ref.rollout
    max_context = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", 4096)
    if rollout.max_model_len is not None:  # verl's rollout.max_model_len caps the context
        max_context = min(max_context, rollout.max_model_len)
    limits = EpisodeLimits(
        max_turns=cfg.agent.max_turns,
        max_tokens_per_turn=cfg.agent.max_tokens_per_turn,
        max_response_tokens=rollout.response_length,
        max_context=max_context,
    )
    sampling = SamplingSettings(
        max_tokens=cfg.agent.max_tokens_per_turn,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        top_k=rollout.top_k,
        stop_token_ids=tuple(sorted(i for i in stop_ids if i is not None)),
    )
    return Parts(tokenizer, agent, toolbox, Scorer(get_reward(cfg.agent.reward_name, timeout_s=cfg.reward.timeout_s), tokenizer), limits, sampling)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_engine(cfg: RelayConfig, model_path: str, seed: int = 0) -> Engine:
    """The configured inference engine (``rollout.name``) serving ``model_path``."""
    rollout = cfg.actor_rollout_ref.rollout
    if rollout.name == "vllm":
        from actors.engines.vllm_engine import VLLMEngine

        return VLLMEngine(
            model_path,
            seed=seed,
            cpu_kvcache_space_gb=rollout.cpu_kvcache_space_gb,
            gpu_memory_utilization=rollout.gpu_memory_utilization,
            tensor_model_parallel_size=rollout.tensor_model_parallel_size,
            # the CPU build compiles for ~1 min at start for no gain on small models
            enforce_eager=not _has_cuda() if rollout.enforce_eager is None else rollout.enforce_eager,
            max_model_len=rollout.max_model_len,
            max_num_batched_tokens=rollout.max_num_batched_tokens,
            dtype="auto" if _has_cuda() else "float32",  # CPU: the learner's fp32, not vLLM-CPU's default bf16
        )
    import torch

    from protocol.weights import serve_dtype

    cuda = torch.cuda.is_available()
    model = cfg.actor_rollout_ref.model  # LoRA: the learner sends only the adapters to HF engines
    lora = (model.lora_rank, model.lora_alpha, model.target_modules) if model.lora_rank > 0 else None
    if rollout.hf_engine_process:
        from actors.engines.hf_process import HFProcessEngine as engine_class
    else:
        from actors.engines.hf_engine import HFEngine as engine_class
    return engine_class(model_path, device="cuda" if cuda else "cpu", seed=seed, dtype=serve_dtype(rollout.dtype, cuda), lora=lora)
