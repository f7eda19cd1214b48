"""Policy loading, FSDP2 sharding and full-weight gathering.

Any Hugging Face causal-LM directory loads (the embedded tiny model is one).
Each decoder layer is its own FSDP2 unit (``fully_shard``), then the root;
gloo on CPU, NCCL on GPU. bf16 mixed precision on GPU, fp32 on CPU.
``fsdp_config.param_offload`` moves sharded parameters (and with them the
optimizer state) to CPU between uses (``CPUOffloadPolicy``, GPU only). The
policy, the critic (``learner.critic``) and the reference (``learner.reference``)
are all sharded by ``fsdp_shard``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

if TYPE_CHECKING:
    from learner.lora import LoraSettings


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks of an HF causal LM (each becomes an FSDP unit)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return list(base.layers)


def load_policy(
    path: str,
    device: torch.device,
    *,
    gradient_checkpointing: bool = False,
    param_offload: bool = False,
    lora: "LoraSettings | None" = None,
):
    """Load the HF causal LM at ``path``, optionally add LoRA adapters (only they train),
    shard it with FSDP2 and return it (train mode)."""
    from transformers import AutoModelForCausalLM

    from learner.lora import add_adapters

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = add_adapters(model, lora)
    return fsdp_shard(model, device, gradient_checkpointing=gradient_checkpointing, param_offload=param_offload)


def fsdp_shard(model, device: torch.device, *, gradient_checkpointing: bool = False, param_offload: bool = False):
    """Shard an HF model with FSDP2 (one unit per decoder layer, then the root).

    bf16 compute with fp32 gradient reduction on GPU, fp32 on CPU.
    ``param_offload`` keeps the sharded parameters, their gradients and hence the
    optimizer state on CPU (``CPUOffloadPolicy``); it needs a GPU (no effect on CPU).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.to(device)
    kwargs = {}
    if device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if param_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    model.train()
    return model


def full_state_arrays(model) -> list[tuple[str, np.ndarray]]:
    """Gather the full weights (a collective: every rank calls it); rank 0 gets them as numpy."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return []
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # the same tensor as the input embedding: never send it twice
    return [(k, v.detach().to(torch.float32).numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()) for k, v in sd.items()]


def export_hf(arrays: list[tuple[str, np.ndarray]], base_path: str, out_dir: str) -> None:
    """Write ``arrays`` (a full state dict) as a plain HF directory loadable by transformers/vLLM."""
    import shutil
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays}, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set()):
        raise ValueError(f"exported weights do not fit {base_path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
