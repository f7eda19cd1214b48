"""The vLLM engine: continuous batching with vLLM v1 ``AsyncLLM``, ids in, ids out.

Threading. ``AsyncLLM`` is bound to the event loop it first runs on, while the
``Engine`` contract has an async ``generate`` and a *sync* ``load_weights``.
So the engine owns one background thread running its own event loop, and every
call into vLLM is a coroutine scheduled on that loop: ``generate`` awaits it
from the caller's loop (any loop, any number of ``asyncio.run`` calls), and
``load_weights`` blocks on it with a timeout. Cancelling a ``generate`` aborts
its vLLM request.

Log-probs. vLLM is started with ``logprobs_mode="processed_logprobs"`` (the
log-softmax of the logits after temperature) and each request asks for
``logprobs=0`` (only the sampled token). vLLM would take those log-probs after
top-k/top-p masking too; ``RelayWorkerExtension.relay_untruncated_logprobs``
moves them to just before the masking, so what comes back is always
``log_softmax(logits / T)[token]`` over the whole vocabulary, what the learner
recomputes. Greedy requests (``T == 0``) get ``log_softmax(logits)``.

Weights. ``load_weights`` writes the HF-named tensors to one safetensors file
in ``/dev/shm`` and asks the worker, with ``collective_rpc``, to reload them in
place from it (``actors/engines/vllm_worker.py``); then the prefix cache is
reset so no KV computed with the old weights is reused, and the file is
deleted. No restart. (Tensors cannot ride in the RPC itself: the
client-to-engine-core hop is msgpack, which rebuilds tensors only where a type
annotation says so.)

Stopping. A request stops on ``settings.stop_token_ids`` only (the model's own
EOS is ignored unless listed there) and the stop id is kept in the output.

``import vllm`` happens only inside the class, so this module imports without it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
import threading
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any, Coroutine, Iterable, TypeVar

import torch

from actors.engines.base import Engine, Generation, SamplingSettings

_T = TypeVar("_T")
_GiB = 1 << 30
WORKER_EXTENSION = "actors.engines.vllm_worker.RelayWorkerExtension"


class VLLMEngine(Engine):
    """One vLLM ``AsyncLLM`` serving one model, driven from its own loop thread."""

    def __init__(
        self,
        model_path: str,
        *,
        seed: int = 0,
        max_model_len: int | None = None,
        cpu_kvcache_space_gb: float = 1.0,
        gpu_memory_utilization: float = 0.85,
        tensor_model_parallel_size: int = 1,
        enforce_eager: bool = False,
        dtype: str = "auto",
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        start_timeout_s: float = 900.0,
        rpc_timeout_s: float = 600.0,
    ) -> None:
        """Start vLLM on ``model_path`` (an HF model directory; no tokenizer needed).

        ``max_model_len`` (prompt plus completion) defaults to the model's
        ``max_position_embeddings``.

        ``cpu_kvcache_space_gb`` sizes the KV cache on CPU machines and
        ``gpu_memory_utilization`` the share of GPU memory vLLM may take on GPU
        machines; each is ignored on the other kind. ``enforce_eager`` skips
        CUDA graphs / torch.compile (faster start, slower decode).
        """
        # vLLM starts its engine-core and worker processes; fork after torch
        # and threads are up is unsafe, so ask for spawn before vllm is imported.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        # The worker process imports the extension by its dotted path.
        _export_repo_root_on_pythonpath()

        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        self.version = 0
        self.rpc_timeout_s = rpc_timeout_s
        self._request_ids = itertools.count()
        memory: dict[str, Any]
        if current_platform.is_cpu():
            memory = {"kv_cache_memory_bytes": int(cpu_kvcache_space_gb * _GiB)}
            # vLLM's CPU platform lets this legacy variable override the above.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(cpu_kvcache_space_gb)))
        else:
            memory = {"gpu_memory_utilization": gpu_memory_utilization}
        engine_args = AsyncEngineArgs(
            model=model_path,
            seed=seed,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_model_parallel_size,
            enforce_eager=enforce_eager,
            dtype=dtype,
            max_num_seqs=max_num_seqs,
            **({"max_num_batched_tokens": max_num_batched_tokens} if max_num_batched_tokens else {}),
            skip_tokenizer_init=True,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
            worker_extension_cls=WORKER_EXTENSION,
            **memory,
        )

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vllm-engine-loop", daemon=True
        )
        self._thread.start()
        self._llm = None
        try:
            self._llm = self._run(self._start(engine_args), start_timeout_s, "vLLM engine start-up")
        except BaseException:
            self._stop_loop()
            raise

    async def _start(self, engine_args: Any) -> Any:
        from vllm.v1.engine.async_llm import AsyncLLM

        llm = AsyncLLM.from_engine_args(engine_args)
        await llm.collective_rpc("relay_untruncated_logprobs", timeout=self.rpc_timeout_s)
        # A gate on the engine loop: a weight update closes it, waits for running turns, swaps, reopens.
        # So every request is sampled by one version, even when the actor updates in flight.
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._active = 0
        return llm

    async def generate(self, prompt_ids: list[int], settings: SamplingSettings) -> Generation:
        """Sample a continuation of ``prompt_ids``; concurrent calls are batched by vLLM."""
        future = asyncio.run_coroutine_threadsafe(self._generate(list(prompt_ids), settings), self._loop)
        return await asyncio.wrap_future(future)

    async def _generate(self, prompt_ids: list[int], settings: SamplingSettings) -> Generation:
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=1,
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            seed=settings.seed,
            stop_token_ids=list(settings.stop_token_ids),
            ignore_eos=True,
            logprobs=0,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        await self._open.wait()
        version = self.version
        self._active += 1
        self._idle.clear()
        final = None
        try:
            async for output in self._llm.generate(
                TokensPrompt(prompt_token_ids=prompt_ids), params, request_id=f"relay-{next(self._request_ids)}"
            ):
                final = output
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()
        if final is None or not final.finished:
            raise RuntimeError(f"vLLM returned no finished output for a {len(prompt_ids)}-token prompt")
        completion = final.outputs[0]
        token_ids = list(completion.token_ids)
        logprobs = [position[token].logprob for token, position in zip(token_ids, completion.logprobs)]
        if completion.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"unexpected vLLM finish_reason {completion.finish_reason!r}")
        return Generation(
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=completion.finish_reason,
            version=version,
        )

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, adopt: bool = False) -> None:
        """Reload HF-named tensors into the running model in place and serve ``version``
        (``adopt`` changes nothing: the worker always copies into its own layout).

        Blocks until the worker has loaded them. Safe while ``generate`` calls run
        (in-flight updates): new requests wait, running ones finish on the old
        weights (and are tagged with the old version), then the weights swap.
        Must not be called from the engine's own loop thread.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("load_weights called from the vLLM engine loop thread would deadlock")
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        storages: set[int] = set()
        for name, tensor in named_tensors:
            tensor = tensor.detach().to("cpu").contiguous()
            if tensor.untyped_storage().data_ptr() in storages:  # tied weights: safetensors refuses aliases
                tensor = tensor.clone()
            storages.add(tensor.untyped_storage().data_ptr())
            tensors[name] = tensor
        with tempfile.TemporaryDirectory(prefix="relay-vllm-weights-", dir=_shared_memory_dir()) as tmp:
            path = os.path.join(tmp, "weights.safetensors")
            save_file(tensors, path)
            del tensors
            self._run(self._gated_load(path, version), self.rpc_timeout_s, f"vLLM weight reload to version {version}")

    async def _gated_load(self, path: str, version: int) -> None:
        """Close the gate, let running requests finish, reload, serve ``version``, reopen."""
        self._open.clear()
        try:
            await self._idle.wait()
            await self._load(path)
            self.version = version
        finally:
            self._open.set()

    async def _load(self, path: str) -> None:
        # One result per worker (tensor-parallel ranks each read the file).
        loaded = await self._llm.collective_rpc("relay_load_weights", timeout=self.rpc_timeout_s, args=(path,))
        if not loaded or min(loaded) == 0:
            raise RuntimeError(f"vLLM workers loaded {loaded} tensors from {path}")
        if not await self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight reload")

    async def close(self) -> None:
        """Shut vLLM down (its processes exit) and stop the loop thread."""
        self.shutdown()

    def shutdown(self) -> None:
        """Synchronous ``close``; safe to call twice."""
        if self._llm is not None:
            llm, self._llm = self._llm, None
            self._run(_call_soon(llm.shutdown), 120.0, "vLLM shutdown")
        self._stop_loop()

    def _run(self, coroutine: Coroutine[Any, Any, _T], timeout_s: float, what: str) -> _T:
        """Run ``coroutine`` on the engine loop and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeoutError:
            future.cancel()
            raise TimeoutError(f"gave up waiting {timeout_s:.0f}s for {what}") from None

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)


async def _call_soon(function: Any) -> Any:
    return function()


def _shared_memory_dir() -> str | None:
    """``/dev/shm`` where it exists (RAM-backed, so no disk write), else the default temp dir."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _export_repo_root_on_pythonpath() -> None:
    """Make ``actors.engines.vllm_worker`` importable in spawned vLLM processes."""
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if repo_root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [repo_root, *paths] if p)
