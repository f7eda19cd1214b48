"""Relay's backend for vLLM's own weight-transfer API (``vllm.distributed.weight_transfer``).

vLLM 0.32 updates a running engine's weights through a pluggable *weight
transfer engine* that lives in each worker process: the engine client calls
``init_weight_transfer_engine`` once, then per update ``start_weight_update``,
``update_weights`` (one call per chunk) and ``finish_weight_update``; the
worker forwards each to the engine its config names
(``WeightTransferConfig.backend``), built by ``WeightTransferEngineFactory``.
vLLM ships NCCL and CUDA-IPC engines (GPU) and lets others register. This is
the one Relay registers, as ``relay`` (``actors/engines/vllm_worker.py``
registers it when the worker imports the extension module):

- the actor process (``VLLMEngine``) binds a local ZeroMQ ``PUSH`` socket
  (``ipc://``) and tells the worker its address (``RelayInitInfo``);
- per bucket of the stream the actor received from the learner (already
  verified by the receiver), the actor pushes the tensors' raw bytes as one
  multipart message and calls ``update_weights`` with their names, dtypes,
  shapes, row pieces and xxh3 checksum (``RelayUpdateInfo``); the worker engine
  pulls the message, checks it and loads the tensors with the model's
  ``load_weights`` (which maps HF names, fuses q/k/v and gate/up); a tensor
  larger than a bucket comes as row pieces in successive buckets and is joined
  in the worker first (the loaders take whole tensors), so the worker holds one
  such tensor while it arrives; for a tied model the embedding is loaded as the
  output head too (``RelayInitInfo.tied_head``), so it crosses the socket once;
- ``start_weight_update`` / ``finish_weight_update`` run vLLM's layerwise
  reload (``initialize_layerwise_reload`` / ``finalize_layerwise_reload``), which
  redoes the platform's post-load processing layer by layer (the CPU backend
  repacks weights after loading).

No file, no ``/dev/shm``: the bytes go from the actor's receive buffers to the
worker over a local socket, a bucket at a time. Only this module imports vLLM at
module level; it runs in the worker process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import torch
import zmq
from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo

from protocol import messages as m
from protocol.transport import checksum
from protocol.weights import Rows, item_of, place, tensor_from_buffer

BACKEND = "relay"


@dataclass
class RelayInitInfo(WeightTransferInitInfo):
    endpoint: str
    """The actor's local PUSH socket (``ipc://...``)."""
    timeout_s: float = 600.0
    """Longest wait for one bucket's bytes."""
    tied_head: bool = False
    """The model ties its output head to the input embedding: load each received
    ``model.embed_tokens.weight`` as ``lm_head.weight`` too (vLLM's layerwise reload redoes a
    layer's post-load processing only for a layer whose weights arrive, so without it the CPU
    backend would keep the old head's packed copy; the learner sends a tied head once, as the
    embedding)."""


@dataclass
class RelayUpdateInfo(WeightTransferUpdateInfo):
    version: int
    bucket: int
    names: list[str] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)
    shapes: list[list[int]] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)
    checksum: int = 0
    full_shapes: list[list[int]] = field(default_factory=list)
    """Per tensor: the whole tensor's shape if it is a row piece (``TensorMeta.full_shape``), else ``[]``."""
    row_starts: list[int] = field(default_factory=list)
    """Per tensor: a piece's first row (0 for a whole tensor)."""


class RelayWeightTransferEngine(WeightTransferEngine[RelayInitInfo, RelayUpdateInfo]):
    """Worker side: pulls each bucket's bytes from the actor and loads them layerwise."""

    init_info_cls = RelayInitInfo
    update_info_cls = RelayUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self._ctx: zmq.Context | None = None
        self._pull = None
        self._timeout_s = 600.0
        self.buckets_loaded = 0
        self._joining: tuple[str, torch.Tensor, int] | None = None  # a tensor arriving in row pieces
        self._tied_head = False

    def init_transfer_engine(self, init_info: RelayInitInfo) -> None:
        self.shutdown()
        self._ctx = zmq.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.connect(init_info.endpoint)
        self._timeout_s = init_info.timeout_s
        self._tied_head = init_info.tied_head

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        self._joining = None

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        if self._joining is not None:
            raise RuntimeError(f"relay weight transfer: {self._joining[0]} ended after row {self._joining[2]} of its pieces")

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict) -> None:
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type != "cpu":
            torch.accelerator.synchronize()

    def receive_weights(self, info: RelayUpdateInfo) -> None:
        if self._pull is None:
            raise RuntimeError("relay weight transfer: init_weight_transfer_engine was not called")
        what = f"weights v{info.version} bucket {info.bucket}"
        if not self._pull.poll(int(self._timeout_s * 1000)):
            raise TimeoutError(f"relay weight transfer: no bytes for {what} within {self._timeout_s:.0f}s")
        frames = self._pull.recv_multipart(copy=False)
        version, bucket = msgspec.msgpack.decode(frames[0].bytes)
        bufs = [f.buffer for f in frames[1:]]
        if (version, bucket) != (info.version, info.bucket) or len(bufs) != len(info.names):
            raise RuntimeError(f"relay weight transfer: got v{version} bucket {bucket} ({len(bufs)} tensors) for {what}")
        if checksum(bufs) != info.checksum:
            raise RuntimeError(f"relay weight transfer: {what} fails its xxh3_64 checksum between actor and worker")
        fulls = info.full_shapes or [[] for _ in info.names]
        starts = info.row_starts or [0 for _ in info.names]
        items = [
            (name, item_of(meta, tensor_from_buffer(buf, meta)))
            for name, dt, shape, n, full, start, buf in zip(info.names, info.dtypes, info.shapes, info.nbytes, fulls, starts, bufs)
            for meta in [m.TensorMeta(name=name, dtype=dt, shape=list(shape), nbytes=n, full_shape=full or None, row_start=start)]
        ]
        # vLLM's weight loaders take whole tensors (they fuse q/k/v and cut tensor-parallel shards):
        # a tensor sent in row pieces is joined here, across buckets, and loaded once its last row came
        tensors = []
        for name, t in items:
            if not isinstance(t, Rows):
                tensors.append((name, t))
                continue
            if t.start == 0:
                self._joining = (name, torch.empty(t.shape, dtype=t.data.dtype), 0)
            if self._joining is None or self._joining[0] != name:
                raise RuntimeError(f"relay weight transfer: {what}: a piece of {name} at row {t.start} without its first rows")
            _, buf, nxt = self._joining
            place(buf, t, name, nxt)
            self._joining = (name, buf, t.stop)
            if t.last:
                tensors.append((name, buf))
                self._joining = None
        if self._tied_head:  # the head is the embedding: processed as a layer of its own
            tensors += [("lm_head.weight", t) for name, t in tensors if name == "model.embed_tokens.weight"]
        if tensors:
            self.model.load_weights(weights=tensors)
        self.buckets_loaded += 1

    def shutdown(self) -> None:
        if self._pull is not None:
            self._pull.close(0)
            self._pull = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
