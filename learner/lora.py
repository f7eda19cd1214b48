"""LoRA through peft: only the adapters train; actors receive merged full weights.

``add_adapters`` wraps the policy before it is sharded (identity when the rank
is 0). The learner gathers the full state dict of the wrapped model every
step; ``merged_arrays`` folds each adapter into its base weight,

    W' = W + (lora_alpha / lora_rank) * B @ A        A: [r, in], B: [out, r]

and renames every tensor back to the base model's parameter names (peft's
``base_model.model.`` prefix and ``.base_layer`` infix removed, adapter
tensors dropped), so actors and ``export_hf`` see a plain model of the base
architecture. Chosen once at setup with ``publish_view``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

Arrays = list[tuple[str, np.ndarray]]

_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    """Adapter rank r (0 = no LoRA)."""
    alpha: int
    """Scaling numerator: adapters are scaled by alpha / r."""
    target_modules: list[str] | str
    """peft ``target_modules``: module names or ``all-linear``."""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def add_adapters(model, lora: LoraSettings | None):
    """Wrap ``model`` with fresh LoRA adapters (B = 0, so outputs are unchanged) and freeze the rest."""
    if lora is None or lora.rank == 0:
        return model
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, target_modules=lora.target_modules, lora_dropout=0.0, bias="none"
    )
    return get_peft_model(model, cfg)


def merged_arrays(arrays: Arrays, scale: float, adapter: str = "default") -> Arrays:
    """Fold LoRA adapters into their base weights and restore the base model's names.

    Args:
        arrays: the full state dict of a peft-wrapped model as (name, array) pairs.
        scale: lora_alpha / lora_rank.
        adapter: the peft adapter name.

    Returns:
        (name, array) pairs of the base model, adapters merged (float32 where merged).
    """
    by_name = dict(arrays)
    out: Arrays = []
    for name, value in arrays:
        if f".lora_A.{adapter}." in name or f".lora_B.{adapter}." in name:
            continue
        if ".base_layer." in name:
            module, leaf = name.split(".base_layer.")
            if leaf == "weight":
                a = by_name[f"{module}.lora_A.{adapter}.weight"].astype(np.float32)
                b = by_name[f"{module}.lora_B.{adapter}.weight"].astype(np.float32)
                value = value.astype(np.float32) + scale * (b @ a)
            name = f"{module}.{leaf}"
        out.append((name.removeprefix(_PREFIX), value))
    return out


def publish_view(lora: LoraSettings) -> Callable[[Arrays], Arrays]:
    """What the learner publishes given its gathered state dict: itself, or the merged base model."""
    if lora.rank == 0:
        return lambda arrays: arrays
    return lambda arrays: merged_arrays(arrays, lora.scale)
