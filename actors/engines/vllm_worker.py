"""Code that runs inside vLLM's worker process, mixed into its worker class.

vLLM builds its worker class at run time as ``class Worker(WorkerBase,
RelayWorkerExtension)`` when the engine is created with
``worker_extension_cls="actors.engines.vllm_worker.RelayWorkerExtension"``.
The engine process calls these methods by name with ``collective_rpc``; ``self``
is then vLLM's worker (it has ``model_runner``).

Importing this module (the worker does, before it loads the model) also
registers Relay's weight-transfer backend, ``relay``
(``actors/engines/vllm_transfer.py``), with vLLM's
``WeightTransferEngineFactory``, so ``weight_transfer_config={"backend": "relay"}``
finds it when the worker builds its weight-transfer engine.

This module must import without vLLM: the worker process imports it by path.
"""

from __future__ import annotations

import torch

try:
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory
except ImportError:  # no vLLM here: nothing to register
    WeightTransferEngineFactory = None

if WeightTransferEngineFactory is not None:
    try:
        WeightTransferEngineFactory.register_engine("relay", "actors.engines.vllm_transfer", "RelayWeightTransferEngine")
    except ValueError:  # registered already (the module was imported twice in this process)
        pass


class RelayWorkerExtension:
    """Relay's methods on vLLM's worker: the log-prob mode (weights arrive through the ``relay``
    weight-transfer backend)."""

    def relay_untruncated_logprobs(self) -> None:
        """Make sampled-token log-probs ignore top-k/top-p truncation.

        With ``logprobs_mode="processed_logprobs"`` vLLM returns
        ``log_softmax`` of the logits after temperature *and* after top-k/top-p
        masking. Relay's learner recomputes ``log_softmax(logits / T)`` over the
        full vocabulary, so when a request truncates we return the log-probs
        of the temperature-scaled logits taken just before the truncation.
        Requests without top-k/top-p are untouched (the two are equal then).
        """
        topk_topp = self.model_runner.sampler.topk_topp_sampler
        if topk_topp.logprobs_mode != "processed_logprobs":
            raise RuntimeError(
                "relay_untruncated_logprobs needs logprobs_mode='processed_logprobs', "
                f"the engine was built with {topk_topp.logprobs_mode!r}"
            )
        if getattr(topk_topp, "_relay_untruncated", False):
            return
        truncating_forward = topk_topp.forward

        def forward(logits, generators, k, p):
            if k is None and p is None:
                return truncating_forward(logits, generators, k, p)
            # The truncating forward masks ``logits`` in place: take the
            # full-vocabulary log-probs first.
            full = logits.log_softmax(dim=-1, dtype=torch.float32)
            sampled, _ = truncating_forward(logits, generators, k, p)
            return sampled, full

        topk_topp.forward = forward
        topk_topp._relay_untruncated = True
