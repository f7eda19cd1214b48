"""LoRA through peft: only the adapters train; actors receive the adapters or merged weights.

``add_adapters`` wraps the policy before it is sharded (identity when the rank
is 0). What leaves the learner is the gathered state-dict stream
(``learner/model.py:stream_full_tensors``) passed through ``publish_view``:
for a LoRA policy, ``merged_stream`` folds each adapter into its base weight,

    W' = W + (lora_alpha / lora_rank) * B @ A        A: [r, in], B: [out, r]

as soon as the three tensors of a module have gone by (peft lists them
together, so it holds one module's worth), and renames every tensor back to
the base model's parameter names (peft's ``base_model.model.`` prefix and
``.base_layer`` infix removed, adapter tensors dropped), so actors and
``export_hf`` see a plain model of the base architecture. The merge runs in
fp32 (the stream is gathered in fp32 for it) and each merged tensor is then
cast to the serve dtype. Chosen once at setup with ``publish_view``.

Where the engine can load adapters itself (the HF engine, via peft, built with
the same ``LoraSettings``), ``publish_view(..., adapters_only=True)`` sends
only the adapter tensors (peft names, ``lora_A``/``lora_B``), and only they are
gathered from the shards: a rank-r update of a d x d projection is 2rd numbers
instead of d^2. Checkpoints and the final export are always merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

Named = Iterable[tuple[str, torch.Tensor]]

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


def merged_stream(named: Named, scale: float, dtype: torch.dtype, adapter: str = "default") -> Iterator[tuple[str, torch.Tensor]]:
    """Fold LoRA adapters into their base weights and restore the base model's names, lazily.

    Args:
        named: the full state dict of a peft-wrapped model as (name, tensor) pairs, fp32.
        scale: lora_alpha / lora_rank.
        dtype: what each output tensor is cast to (after the fp32 merge).
        adapter: the peft adapter name.

    Yields:
        (name, tensor) pairs of the base model, adapters merged. Raises ``ValueError`` if an
        adapted module's base weight or adapters are missing from the stream.
    """
    from protocol.weights import whole

    parts: dict[str, dict[str, torch.Tensor]] = {}
    a_key, b_key = f".lora_A.{adapter}.weight", f".lora_B.{adapter}.weight"
    # an adapted weight gathered in row pieces is joined first: its A and B come after it in the
    # stream, so the merge cannot run piece by piece (it holds that one weight whole); every other
    # tensor's pieces pass through, cast
    for name, value in whole(named, only=lambda n: n.endswith(".base_layer.weight")):
        if name.endswith(a_key) or name.endswith(b_key):
            module, kind = name[: -len(a_key)], "A" if name.endswith(a_key) else "B"
        elif name.endswith(".base_layer.weight"):
            module, kind = name[: -len(".base_layer.weight")], "W"
        else:
            if f".lora_A.{adapter}." in name or f".lora_B.{adapter}." in name:
                continue  # adapter biases or other adapter tensors (bias="none": none expected)
            yield name.replace(".base_layer.", ".").removeprefix(_PREFIX), _cast(value, dtype)
            continue
        got = parts.setdefault(module, {})
        got[kind] = value
        if len(got) == 3:
            del parts[module]
            merged = got["W"].float() + scale * (got["B"].float() @ got["A"].float())
            yield f"{module}.weight".removeprefix(_PREFIX), merged.to(dtype)
    if parts:
        raise ValueError(f"LoRA merge: modules without base weight or adapters: {sorted(parts)[:5]}")


def _cast(t, dtype: torch.dtype):
    """``t`` (a tensor, or a ``protocol.weights.Rows`` piece of one) in ``dtype`` if floating point."""
    from protocol.weights import Rows

    if isinstance(t, Rows):
        return Rows(_cast(t.data, dtype), t.start, t.shape)
    return t.to(dtype) if t.is_floating_point() else t


def is_adapter(name: str, adapter: str = "default") -> bool:
    """``name`` is a LoRA adapter tensor of a peft-wrapped model."""
    return f".lora_A.{adapter}." in name or f".lora_B.{adapter}." in name


class PublishView:
    """What the learner publishes from its gathered state-dict stream: the stream itself, the
    merged base model, or (``adapters_only``) the LoRA adapters alone. ``gather_dtype`` is what
    the stream should be gathered in, ``keep`` which state-dict entries it needs at all."""

    def __init__(self, lora: LoraSettings, dtype: torch.dtype, adapters_only: bool = False):
        self.lora, self.dtype = lora, dtype
        self.adapters_only = adapters_only and lora.rank > 0
        self.merges = lora.rank > 0 and not self.adapters_only
        self.gather_dtype = torch.float32 if self.merges else dtype
        self.keep: Callable[[str], bool] | None = is_adapter if self.adapters_only else None

    @property
    def what(self) -> str:
        """For the log: what actors receive."""
        if self.adapters_only:
            return f"the LoRA adapters only (rank {self.lora.rank}; the engine applies them via peft)"
        if self.merges:
            return f"full weights with the LoRA adapters merged (rank {self.lora.rank})"
        return "full weights"

    def __call__(self, named: Named) -> Iterator[tuple[str, torch.Tensor]]:
        if not self.merges:
            return iter(named)
        return merged_stream(named, self.lora.scale, self.dtype)


def publish_view(lora: LoraSettings, dtype: torch.dtype = torch.float32, adapters_only: bool = False) -> PublishView:
    """The ``PublishView`` of ``lora`` producing tensors in ``dtype``."""
    return PublishView(lora, dtype, adapters_only)
