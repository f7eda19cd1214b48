"""Code that runs inside vLLM's worker process, mixed into its worker class.

vLLM builds its worker class at run time as ``class Worker(WorkerBase,
RelayWorkerExtension)`` when the engine is created with
``worker_extension_cls="actors.engines.vllm_worker.RelayWorkerExtension"``.
The engine process calls these methods by name with ``collective_rpc``; ``self``
is then vLLM's worker (it has ``reload_weights`` and ``model_runner``).

This module must import without vLLM: the worker process imports it by path.
"""

from __future__ import annotations

import torch


class RelayWorkerExtension:
    """Relay's methods on vLLM's worker: in-place weight reload and log-prob mode."""

    def relay_load_weights(self, safetensors_path: str) -> int:
        """Load the HF-named tensors of a safetensors file into the running model in place.

        Returns how many tensors were read. The engine process writes the file
        (to shared memory, ``/dev/shm``) because ``collective_rpc`` arguments
        cross a msgpack hop that does not rebuild tensors inside containers.
        ``reload_weights`` runs the model's own ``load_weights`` (which maps HF
        names, fuses q/k/v and gate/up) and then redoes the platform's
        post-load processing, which the CPU backend needs because it repacks
        weights after loading: copying into parameters directly would be
        silently ignored there.
        """
        from safetensors import safe_open

        with safe_open(safetensors_path, framework="pt") as weights:
            names = list(weights.keys())
            self.reload_weights(weights_iterator=((name, weights.get_tensor(name)) for name in names))
        return len(names)

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
