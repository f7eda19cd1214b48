"""The inference-engine contract shared by every engine (transformers, vLLM).

An engine turns token ids into sampled token ids plus the log-probability of
each sampled token under the distribution it was sampled from
(``log_softmax(logits / temperature)``, before top-k/top-p truncation, which is
exactly what the learner recomputes). Engines never see text: the rollout loop
owns tokenization, so the learner trains on the very ids that were sampled.

Requests are submitted one episode-turn at a time with ``await generate(...)``;
an engine batches concurrent requests itself (vLLM: continuous batching;
transformers: continuous batching over a slot KV cache). Weights are replaced in
place with ``load_weights`` and the engine reports the policy version it serves
on every ``Generation``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Iterable

import torch


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample one turn."""

    max_tokens: int
    """Most new tokens to sample for this request."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables it."""
    top_k: int = -1
    """Keep only the k most likely tokens; -1 disables it."""
    stop_token_ids: tuple[int, ...] = ()
    """Sampling stops after any of these ids; the stop id is kept in the output."""
    seed: int | None = None
    """Per-request seed, for reproducible tests."""


@dataclass
class Generation:
    """What one request produced."""

    token_ids: list[int]
    """Sampled ids, including the stop id when one was hit."""
    logprobs: list[float]
    """log p(token) for each sampled id, same length as ``token_ids``."""
    finish_reason: str
    """``"stop"`` (a stop id was sampled) or ``"length"`` (hit ``max_tokens``)."""
    version: int
    """Policy version of the weights that produced every token of this request."""
    extra: dict = field(default_factory=dict)


class Engine(abc.ABC):
    """An inference engine owned by one actor process."""

    version: int = 0

    @abc.abstractmethod
    async def generate(self, prompt_ids: list[int], settings: SamplingSettings) -> Generation:
        """Sample a continuation of ``prompt_ids``. Safe to call concurrently."""

    @abc.abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, adopt: bool = False) -> None:
        """Replace the served weights in place (HF parameter names) and serve ``version``.

        Called only while no ``generate`` is running (the actor pauses admission
        and drains in-flight requests first), so no request mixes two versions.
        ``adopt``: the caller hands the tensors over (nothing else writes or frees
        their memory), so an engine may serve them as they are instead of copying.
        """

    async def close(self) -> None:
        """Release the engine's resources."""
