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

Weights. Through vLLM's own weight-transfer API with Relay's backend
(``actors/engines/vllm_transfer.py``, registered as ``relay`` with vLLM's
``WeightTransferEngineFactory``): the engine is started with
``weight_transfer_config={"backend": "relay"}`` and binds a local ZeroMQ PUSH
socket that the worker's transfer engine pulls from. ``load_weights`` consumes
the stream the actor received, regroups it into buckets of ``bucket_bytes``
(a tensor larger than that travels as row pieces, which the worker joins
before vLLM's loaders see it: they take whole tensors) and, per bucket, pushes
the raw bytes and calls ``update_weights`` with their names, dtypes, shapes,
pieces and checksum; ``start_weight_update`` /
``finish_weight_update`` bracket the update (vLLM's layerwise reload); then the
prefix cache is reset so no KV computed with the old weights is reused. No
file, no restart. (Tensors cannot ride in the RPC itself: the
client-to-engine-core hop is msgpack, which rebuilds tensors only where a type
annotation says so.) vLLM updates in place, with no standby copy: an update
that fails after its first bucket was applied leaves the engine unusable, so
it raises ``EngineBroken`` and every later ``generate`` does too (the actor
exits and is restarted from disk); a stream refused before its first bucket
(``WeightsRejected``) changes nothing.

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
import uuid
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any, Coroutine, Iterable, TypeVar

import torch

from actors.engines.base import Engine, Generation, SamplingSettings

_T = TypeVar("_T")
_GiB = 1 << 30
WORKER_EXTENSION = "actors.engines.vllm_worker.RelayWorkerExtension"
TRANSFER_BACKEND = "relay"  # actors/engines/vllm_transfer.py, registered by vllm_worker on import


class EngineBroken(RuntimeError):
    """A weight update failed after vLLM had applied part of it: this engine must not serve."""


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
        bucket_bytes: int = 64 << 20,
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
            weight_transfer_config={"backend": TRANSFER_BACKEND},
            **memory,
        )
        self.bucket_bytes = bucket_bytes
        from transformers import AutoConfig

        # vLLM's layerwise reload updates a tied lm_head only if lm_head.weight itself arrives (an
        # embedding alone would leave the old output head serving): the worker loads it under both names
        self._tied = bool(getattr(AutoConfig.from_pretrained(model_path), "tie_word_embeddings", False))
        self.broken: BaseException | None = None
        self._zmq = None
        self._push = None

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

        import zmq
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        llm = AsyncLLM.from_engine_args(engine_args)
        await llm.collective_rpc("relay_untruncated_logprobs", timeout=self.rpc_timeout_s)
        # the local hop of weight buckets: this process PUSHes, the worker's transfer engine PULLs
        self._zmq = zmq.Context()
        self._push = self._zmq.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        endpoint = f"ipc://{tempfile.gettempdir()}/relay-vllm-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._push.bind(endpoint)
        await llm.init_weight_transfer_engine(
            WeightTransferInitRequest(init_info={"endpoint": endpoint, "timeout_s": self.rpc_timeout_s, "tied_head": self._tied})
        )
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
        if self.broken is not None:
            raise EngineBroken("this vLLM engine's weights are half-updated; it cannot serve") from self.broken
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
        """Stream HF-named tensors into the running model through vLLM's weight-transfer API and
        serve ``version`` (``adopt`` changes nothing: the worker copies into its own layout).

        Blocks until the worker has loaded them. Safe while ``generate`` calls run
        (in-flight updates): new requests wait, running ones finish on the old
        weights (and are tagged with the old version), then the update runs.
        Must not be called from the engine's own loop thread.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("load_weights called from the vLLM engine loop thread would deadlock")
        if self.broken is not None:
            raise EngineBroken("this vLLM engine's weights are half-updated; it cannot serve") from self.broken
        import msgspec
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        from protocol.weights import buckets_of

        started = False
        try:
            for i, bucket in enumerate(buckets_of(named_tensors, self.bucket_bytes)):
                # the receiver verified this bucket before yielding it: only now does vLLM change
                if not started:
                    self._run(self._begin_update(), self.rpc_timeout_s, f"vLLM weight update to v{version}: drain and start")
                    started = True
                self._push.send_multipart([msgspec.msgpack.encode([version, i]), *bucket.buffers()], copy=False)
                info = {
                    "version": version, "bucket": i, "names": [mt.name for mt in bucket.metas],
                    "dtypes": [mt.dtype for mt in bucket.metas], "shapes": [mt.shape for mt in bucket.metas],
                    "nbytes": [mt.nbytes for mt in bucket.metas], "checksum": bucket.checksum,
                    # row pieces of tensors larger than a bucket: the worker joins them before loading
                    "full_shapes": [mt.full_shape or [] for mt in bucket.metas],
                    "row_starts": [mt.row_start for mt in bucket.metas],
                }
                self._run(self._llm.update_weights(WeightTransferUpdateRequest(update_info=info)), self.rpc_timeout_s,
                          f"vLLM weight update to v{version}, bucket {i}")
                del bucket
            if not started:
                raise ValueError(f"weights v{version}: the stream held no tensors")
            self._run(self._finish_update(version), self.rpc_timeout_s, f"vLLM weight update to v{version}: finish")
        except BaseException as e:
            if not started:
                raise  # nothing reached vLLM: it serves the previous version
            self.broken = e
            self._loop.call_soon_threadsafe(self._open.set)  # waiting requests fail instead of hanging
            raise EngineBroken(f"vLLM weight update to v{version} failed after it began; this engine cannot serve") from e

    async def _begin_update(self) -> None:
        """Close the gate, let running requests finish, start the update."""
        self._open.clear()
        await self._idle.wait()
        await self._llm.start_weight_update()

    async def _finish_update(self, version: int) -> None:
        """Finish the update, drop KV computed with the old weights, serve ``version``, reopen."""
        await self._llm.finish_weight_update(weight_version=str(version))
        if not await self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update")
        self.version = version
        self._open.set()

    async def close(self) -> None:
        """Shut vLLM down (its processes exit) and stop the loop thread."""
        self.shutdown()

    def shutdown(self) -> None:
        """Synchronous ``close``; safe to call twice."""
        if self._llm is not None:
            llm, self._llm = self._llm, None
            self._run(_call_soon(llm.shutdown), 120.0, "vLLM shutdown")
        if self._push is not None:
            self._push.close(0)
            self._zmq.term()
            self._push = self._zmq = None
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


def _export_repo_root_on_pythonpath() -> None:
    """Make ``actors.engines.vllm_worker`` importable in spawned vLLM processes."""
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if repo_root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [repo_root, *paths] if p)
