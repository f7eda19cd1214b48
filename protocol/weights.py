"""Weight channels, learner -> actors: a bucketed stream, one small interface, three transports.

The stream
----------
Learner rank 0 publishes a version as an *iterable* of ``(name, tensor)``
pairs that it gathers from the FSDP shards one parameter at a time, already in
the dtype the actors serve (``learner/model.py:stream_full_tensors``). Every
publisher groups that stream into *buckets* of at most ``bucket_bytes``
(``buckets_of``: consecutive tensors) and hashes each bucket (xxh3_64 over its
tensors' raw bytes) as soon as it is full. Tensors travel as raw bytes with a
dtype string (``bfloat16``, ``float32``, ...; ``messages.TENSOR_DTYPES``): no
numpy upcast, no copy between the gathered tensor and the socket or file.

A tensor larger than a bucket (an embedding, an LM head) travels as *pieces*:
row ranges along dim 0 (contiguous byte ranges), each in the bucket it fills,
each with its own ``TensorMeta`` (``full_shape``, ``row_start``) and covered by
its bucket's checksum. The learner gathers such a tensor piece by piece from
the shards too (``stream_full_tensors(piece_bytes=...)``), so no bucket and no
gather on rank 0 is larger than ``bucket_bytes``, whatever the model size. A
stream item is ``(name, tensor)`` or ``(name, Rows)`` for a piece; engines copy
each piece into its rows of the staged tensor (``place``) or join the pieces
first (``whole``). Senders that predate pieces never send one (the fields
default to "whole"); a receiver that predates them would see a piece's shape
and refuse it as not fitting the model.

Receivers return the tensors as an iterable too. The zmq and filesystem ones
are lazy: a bucket is read and verified when the consumer (the engine's
``load_weights``) reaches it, and a bucket that fails its checksum, or a
stream that ends early, raises ``WeightsRejected`` *before* any of that
bucket's tensors is yielded. The engine stages what it receives and swaps
only after the last bucket (``actors/engines/hf_engine.py``), so a refused
update leaves the served version untouched.

The transports
--------------
``zmq`` (default; one node or many)
    A version is *streamed* (``StreamingVersion``, ``transport.weights_window`` > 0): the
    learner announces it when its stream opens, actors ask (``WeightsRequest``, usually
    within a heartbeat or at once from a long-polling work request), and the ``LearnerServer``
    sends each bucket to every subscriber as soon as it is sealed (one ``WeightsChunk``
    message: header with the checksum, then one frame per tensor, zero-copy, tracked) while
    rank 0 gathers the next. A bucket is freed once every actor behind the version was sent it
    and ZeroMQ let go of its bytes; rank 0 gathers bucket ``i + 1`` only once fewer than
    ``window`` buckets are held, so it holds about ``window`` buckets whatever the model size.
    The last chunk is an empty end marker carrying the total (earlier ones say 0). An actor
    that asks after the first bucket was freed is held (``WeightsRequest.wait_s``) until the
    version opens again: the trainer re-publishes while it waits for data
    (``LearnerServer.weights_wanted``) and every new version subscribes it. With
    ``window`` = 0 the whole version is gathered into a ``BucketSnapshot`` first and kept
    until the next publish (one copy in the serve dtype; actors pull at their own pace).
    ``fetch`` reads the chunks one by one as its stream is consumed.

``filesystem`` (nodes that share a disk)
    Each bucket is written as one safetensors shard of
    ``<weights_dir>/.tmp-v<N>-<pid>/`` as soon as it is full and then freed
    (rank 0 holds one bucket, whatever the model size); ``manifest.json`` with
    each shard's size and checksum is written last, the directory is renamed to
    ``v<N>`` (atomic on one filesystem), and all but the newest ``keep``
    versions are garbage-collected (renamed aside first, so a reader never
    lists a half-deleted one). ``fetch`` checks the manifest and every shard's
    size and opens them all (an open file outlives its collection), then maps
    and verifies each shard when the stream reaches it.

``nccl`` (GPU clusters with NCCL connectivity; ``gloo`` on CPU)
    A collective group of learner rank 0 (rank 0) and the actors (ranks
    ``1..n``) with its own rendezvous: a ``TCPStore`` hosted by the learner and
    a ``ProcessGroupNCCL``/``ProcessGroupGloo`` built directly from that store,
    so the learner's default process group is never touched. Actors learn the
    store's address and their rank from ``Welcome.weights_group``. A version
    is sent in a *round*: the learner writes ``WeightsAnnounce`` under
    ``round/<r>`` in the store, waits until every actor has incremented
    ``ready/<r>`` (the last one sets ``go/<r>``), then broadcasts the version a
    bucket at a time: the bucket's header (a ``WeightsChunk``: tensor list and
    checksum) and then its tensors (small ones packed into ``BUCKET_BYTES``
    buffers), ending with an empty header. With ``transport.weights_window`` > 0
    the buckets are broadcast as they are gathered (rank 0 holds ``window`` of
    them) once every actor joined within ``weights_subscribe_s``; otherwise (and
    with window 0) the version is gathered whole and a publisher thread sends it
    when the actors are there, so ``publish`` does not wait for them. An actor
    receives one bucket per step of its stream (the first before ``fetch``
    returns) and, in host memory (gloo), checks its checksum; a stream abandoned
    early still receives the rest of the round. A round not yet started is
    replaced by a newer version. Every actor joins every round, in order; the
    set of actors is fixed (``rollout.num_actors``).

In every case the actor learns that a new version exists from the control
channel (``WorkGrant``/``HeartbeatAck.learner_version``), which the learner
advances when ``publish`` calls ``announce``: as the zmq stream opens, or once
the version is complete for the other transports (and zmq with window 0). Version 0 is the model every actor
loads from disk: it is announced, never sent (``fetch(have_version=0)`` is
``None`` until the learner publishes a newer one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import mmap
import os
import re
import shutil
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import torch

from protocol import messages as m
from protocol.transport import CHECKSUM, ActorClient, LearnerServer, LearnerRefused, TransportTimeout, checksum

log = logging.getLogger(__name__)

NamedTensors = Iterable[tuple[str, Any]]
"""``(name, tensor)`` pairs, consumed once: publishers take torch tensors or numpy arrays (or
``Rows`` pieces of them); receivers yield torch tensors (CPU, or CUDA from an ``nccl`` receiver on
the GPU), and ``Rows`` for the pieces of a tensor larger than a bucket."""

KINDS = ("zmq", "filesystem", "nccl")

SERVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""``actor_rollout_ref.rollout.dtype`` settings and the dtype each puts on the wire."""

_TORCH_DTYPES = {
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
_NUMPY_NAMES = {"<f2": "float16", "<f4": "float32", "<f8": "float64", "<i8": "int64", "<i4": "int32",
                "<i2": "int16", "|i1": "int8", "|u1": "uint8", "|b1": "bool"}


class WeightsRejected(m.ProtocolError):
    """A published version failed verification (partial, truncated or corrupted); nothing was applied."""


def serve_dtype(setting: str, cuda: bool) -> torch.dtype:
    """The dtype actors serve (and the learner sends) for ``rollout.dtype``: ``auto`` is bf16 when
    the engines run on a GPU, fp32 on CPU (where the tiny demo model and the tests run)."""
    if setting == "auto":
        return torch.bfloat16 if cuda else torch.float32
    try:
        return SERVE_DTYPES[setting]
    except KeyError:
        raise ValueError(f"rollout.dtype must be auto or one of {sorted(SERVE_DTYPES)}, got {setting!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype (``torch.bfloat16`` -> ``bfloat16``)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _TORCH_DTYPES:
        raise TypeError(f"dtype {dtype} cannot be sent as weights (one of {sorted(_TORCH_DTYPES)})")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a wire name (torch names, or numpy ``dtype.str`` from older senders)."""
    dt = _TORCH_DTYPES.get(_NUMPY_NAMES.get(name, name))
    if dt is None:
        raise m.ProtocolError(f"unknown weight dtype {name[:32]!r}")
    return dt


def as_tensor(a) -> torch.Tensor:
    """A contiguous CPU tensor of ``a`` (a tensor or numpy array), sharing its memory when it can."""
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(np.ascontiguousarray(a))
    return a.detach().to("cpu").contiguous()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def tensor_from_buffer(buf, meta: m.TensorMeta) -> torch.Tensor:
    """A tensor viewing ``buf`` (no copy), as ``meta`` describes it."""
    mv = memoryview(buf).cast("B")
    if mv.nbytes != meta.nbytes:
        raise WeightsRejected(f"tensor {meta.name}: {mv.nbytes} bytes, header says {meta.nbytes}")
    dtype = torch_dtype(meta.dtype)
    if mv.nbytes == 0:
        return torch.empty(meta.shape, dtype=dtype)
    with warnings.catch_warnings():  # received frames are read-only; engines only read them
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(mv, dtype=torch.uint8)
    try:
        return flat.view(dtype).reshape(meta.shape)
    except RuntimeError as e:
        raise WeightsRejected(f"tensor {meta.name}: {meta.nbytes} bytes do not make a {meta.dtype}{meta.shape}: {e}") from e


# ----------------------------------------------------------------- buckets


@dataclass(frozen=True)
class Rows:
    """A piece of a tensor larger than a bucket: rows ``[start, stop)`` along dim 0 of the tensor
    of shape ``shape`` (the whole one's), i.e. a contiguous byte range of it.

    A stream item is ``(name, tensor)`` for a whole tensor or ``(name, Rows)`` for a piece; the
    pieces of one tensor come in row order, back to back, and cover it (``whole`` joins them,
    ``place`` copies one into the whole tensor's storage)."""

    data: torch.Tensor
    """``[stop - start, *shape[1:]]``."""
    start: int
    shape: tuple[int, ...]

    @property
    def stop(self) -> int:
        return self.start + self.data.shape[0]

    @property
    def last(self) -> bool:
        """This piece ends the tensor."""
        return self.stop == self.shape[0]


def item_bytes(a) -> int:
    """The byte size of a stream item's data (a tensor, an array or a ``Rows`` piece)."""
    t = a.data if isinstance(a, Rows) else a
    return t.nbytes if isinstance(t, np.ndarray) else t.numel() * t.element_size()


def _cpu_item(a):
    """A stream item as a contiguous CPU tensor, or a ``Rows`` of one."""
    if isinstance(a, Rows):
        return Rows(as_tensor(a.data), a.start, tuple(a.shape))
    return as_tensor(a)


def meta_of(name: str, item) -> m.TensorMeta:
    """The wire description of a stream item (a contiguous CPU tensor or a ``Rows`` of one)."""
    t = item.data if isinstance(item, Rows) else item
    meta = m.TensorMeta(name=name, dtype=dtype_name(t.dtype), shape=list(t.shape), nbytes=t.numel() * t.element_size())
    if isinstance(item, Rows):
        meta = m.TensorMeta(name=meta.name, dtype=meta.dtype, shape=meta.shape, nbytes=meta.nbytes,
                            full_shape=list(item.shape), row_start=item.start)
    return meta


def item_of(meta: m.TensorMeta, t: torch.Tensor):
    """The stream item ``meta`` describes, over the received tensor ``t``: ``t`` itself or its ``Rows``."""
    return t if meta.full_shape is None else Rows(t, meta.row_start, tuple(meta.full_shape))


def split_rows(item, rows: int) -> tuple[Rows, Rows]:
    """The first ``rows`` rows of a tensor or piece, and the rest (views: no copy).

    >>> a, b = split_rows(torch.zeros(10, 4), 3)   # a: rows [0, 3), b: rows [3, 10) of [10, 4]"""
    if isinstance(item, Rows):
        t, start, shape = item.data, item.start, item.shape
    else:
        t, start, shape = item, 0, tuple(item.shape)
    return Rows(t[:rows], start, shape), Rows(t[rows:], start + rows, shape)


def _splittable(item) -> bool:
    t = item.data if isinstance(item, Rows) else item
    return t.dim() >= 1 and t.shape[0] > 1


@dataclass
class Bucket:
    """Consecutive tensors of one version (whole, or pieces of ones larger than a bucket) and the
    checksum of their bytes."""

    metas: list[m.TensorMeta]
    tensors: list[torch.Tensor]
    """Contiguous CPU tensors (the gathered ones themselves, or row views of them: not copies);
    a piece's data for a ``Rows`` item."""
    checksum: int
    nbytes: int

    def buffers(self) -> list[memoryview]:
        return [tensor_bytes(t) for t in self.tensors]

    def named(self) -> list[tuple[str, Any]]:
        """The stream items: ``(name, tensor)``, or ``(name, Rows)`` for a piece."""
        return [(mt.name, item_of(mt, t)) for mt, t in zip(self.metas, self.tensors)]


def buckets_of(named: NamedTensors, bucket_bytes: int, split: bool = True) -> Iterator[Bucket]:
    """Group a stream of tensors (and ``Rows`` pieces) into buckets of at most ``bucket_bytes``,
    each yielded, hashed, as soon as it is full or the next item would not fit.

    ``split``: a tensor larger than a bucket, and any piece that does not fit the room left, is cut
    along dim 0 (row views, no copy): its first rows fill the current bucket and the rest go on in
    the next ones, each piece described by its own ``TensorMeta`` (full shape, first row) and
    covered by its bucket's checksum. So every bucket holds at most ``bucket_bytes`` (a single
    row larger than that goes alone). A whole tensor that fits a bucket is never cut; one that does
    not fit the room left starts the next bucket. ``split=False``: a larger tensor goes alone,
    whole (checkpoint files, which readers load as whole tensors).

    Example: 10 x 4 fp32 rows (160 bytes) with ``bucket_bytes=48`` (3 rows) -> buckets of rows
    [0, 3), [3, 6), [6, 9), and [9, 10) followed by whatever comes next.

    A consumer holds one bucket plus the item being produced; when the producer itself yields
    pieces (``learner/model.py:stream_full_tensors(piece_bytes=...)``) that is about two buckets,
    whatever the largest tensor."""
    pending: list[tuple[str, Any]] = []
    size = 0
    for name, a in named:
        item = _cpu_item(a)
        del a
        while True:
            n = item_bytes(item)
            if pending and size + n > bucket_bytes:
                room = bucket_bytes - size
                t = item.data if isinstance(item, Rows) else item
                row = t[0].numel() * t.element_size() if t.dim() else n
                cut = split and (isinstance(item, Rows) or n > bucket_bytes) and _splittable(item) and row and room // row > 0
                if not cut:
                    yield seal(pending)
                    pending, size = [], 0
                    continue
                head, item = split_rows(item, room // row)
                pending.append((name, head))
                yield seal(pending)
                pending, size = [], 0
                continue
            if split and n > bucket_bytes and _splittable(item):  # an empty bucket: fill it with the first rows
                t = item.data if isinstance(item, Rows) else item
                rows = max(1, bucket_bytes // (t[0].numel() * t.element_size() or 1))
                if rows < t.shape[0]:
                    head, item = split_rows(item, rows)
                    yield seal([(name, head)])
                    continue
            pending.append((name, item))
            size += n
            if size >= bucket_bytes:
                yield seal(pending)
                pending, size = [], 0
            break
        del item
    if pending:
        yield seal(pending)


def seal(named: list[tuple[str, Any]]) -> Bucket:
    """A bucket of these items (contiguous CPU tensors, or ``Rows`` of them), hashed."""
    metas = [meta_of(name, t) for name, t in named]
    tensors = [t.data if isinstance(t, Rows) else t for _, t in named]
    bucket = Bucket(metas, tensors, 0, sum(mt.nbytes for mt in metas))
    bucket.checksum = checksum(bucket.buffers())
    return bucket


def whole(named: NamedTensors, only: Callable[[str], bool] | None = None) -> Iterator[tuple[str, Any]]:
    """The stream with each run of ``Rows`` pieces joined into its whole tensor (one new tensor,
    yielded once its last piece arrived; whole tensors pass through). For consumers that need
    whole tensors (safetensors checkpoints, the LoRA merge): they hold one assembled tensor.
    ``only``: join the pieces of the names it accepts, pass the others' pieces on as they are.
    A run of pieces that skips, repeats or leaves out rows, or is interrupted by another tensor,
    raises ``WeightsRejected``."""
    name_, buf, nxt = None, None, 0
    for name, a in named:
        if buf is not None and (not isinstance(a, Rows) or name != name_):
            raise WeightsRejected(f"tensor {name_}: rows [{nxt}, {buf.shape[0]}) never arrived (next came {name}); refusing it")
        if not isinstance(a, Rows) or (only is not None and not only(name)):
            yield name, a
            continue
        if buf is None:
            if a.start != 0:
                raise WeightsRejected(f"tensor {name}: first piece starts at row {a.start}; refusing it")
            name_, buf, nxt = name, torch.empty(a.shape, dtype=a.data.dtype, device=a.data.device), 0
        place(buf, a, name, nxt)
        nxt = a.stop
        if a.last:
            yield name, buf
            name_, buf = None, None
    if buf is not None:
        raise WeightsRejected(f"tensor {name_}: the stream ended after row {nxt} of {buf.shape[0]}; refusing it")


def place(dst: torch.Tensor, piece: Rows, name: str, expect_start: int) -> None:
    """Copy ``piece`` into its rows of ``dst`` (the whole tensor), after checking it is the piece
    that comes next (``expect_start``) and fits ``dst`` (``ValueError``/``WeightsRejected`` if not)."""
    if tuple(piece.shape) != tuple(dst.shape):
        raise ValueError(f"tensor {name}: a piece of shape {list(piece.shape)}, the tensor's is {list(dst.shape)}")
    if piece.start != expect_start:
        raise WeightsRejected(f"tensor {name}: piece at row {piece.start}, expected row {expect_start}; refusing it")
    dst[piece.start : piece.stop].copy_(piece.data)


def verified_tensors(header: m.WeightsChunk, bufs: list, where: str) -> list[tuple[str, Any]]:
    """The items of one received bucket (tensors, ``Rows`` for pieces), after its checksum
    matched (``WeightsRejected`` if not)."""
    if len(bufs) != len(header.tensors):
        raise WeightsRejected(f"{where}: {len(header.tensors)} tensors but {len(bufs)} buffers; refusing it")
    views = [memoryview(b) for b in bufs]
    if checksum(views, header.checksum_algo) != header.checksum:
        raise WeightsRejected(
            f"{where}: {header.checksum_algo} checksum mismatch (corrupted in transit or in memory); refusing it"
        )
    return [(mt.name, item_of(mt, tensor_from_buffer(v, mt))) for mt, v in zip(header.tensors, views)]


class WeightsPublisher(Protocol):
    """Learner rank 0's side."""

    def publish(self, version: int, named: NamedTensors, announce: Callable[[], None] = lambda: None, hold: bool = False) -> None:
        """Make ``version`` available to actors, consuming ``named`` once (lazily: a bucket is
        sent or written as soon as it is full). Calls ``announce()`` once actors may ask for the
        version (zmq streaming: when the stream opens, before the first bucket is gathered; the
        others: once it is complete), and returns once every bucket was handed on. ``hold``:
        keep the whole version for actors that have not registered yet (zmq streams otherwise;
        the other transports keep what they keep anyway)."""

    def weights_group_for(self, actor_id: str) -> m.WeightsGroup | None:
        """What ``Welcome.weights_group`` tells ``actor_id`` (``None`` unless collective)."""

    def close(self) -> None: ...


class WeightsReceiver(Protocol):
    """One actor's side."""

    private_buffers: bool
    """True when fetched tensors live in memory only this process holds and nothing reuses;
    False for file-backed ones."""

    async def fetch(self, have_version: int, timeout_s: float) -> tuple[int, NamedTensors] | None:
        """The newest version if newer than ``have_version``, as a stream of tensors to consume
        once, from a worker thread (``asyncio.to_thread``), not the event loop; else ``None``.

        The stream verifies each bucket before yielding its tensors and raises
        ``WeightsRejected`` for a bucket that fails its checksum or a version
        that ends early; ``fetch`` itself raises ``TransportTimeout`` (saying
        what it waited for) or ``ProtocolError``."""

    def close(self) -> None: ...


# ----------------------------------------------------------------- zmq


class BucketSnapshot:
    """One complete version's buckets as the ``LearnerServer`` serves them to any later request
    (``WeightsSnapshot``'s interface; ``transport.weights_window=0``): chunk ``i`` is bucket ``i``,
    its tensors sent zero-copy."""

    def __init__(self, version: int, buckets: list[Bucket]):
        self.version = version
        self.buckets = buckets
        self.nbytes = sum(b.nbytes for b in buckets)
        self._headers: list[bytes | None] = [None] * len(buckets)

    def __len__(self) -> int:
        return len(self.buckets)

    def chunk(self, i: int) -> tuple[bytes, list[memoryview]]:
        b = self.buckets[i]
        if self._headers[i] is None:
            self._headers[i] = m.encode(
                m.WeightsChunk(
                    version=self.version, chunk=i, num_chunks=len(self.buckets), tensors=b.metas,
                    checksum=b.checksum, checksum_algo=CHECKSUM,
                )
            )
        return self._headers[i], b.buffers()


class StreamingVersion:
    """One version while learner rank 0 gathers it: each bucket goes to every subscribed actor as
    soon as it is sealed and is released once every actor that needs it was sent it and ZeroMQ
    is done with its bytes, so rank 0 holds a window of buckets, not the version.

    Shared by the publisher (``add``, ``finish``, ``wait_room``: the trainer's thread) and the
    ``LearnerServer``'s IO thread (``subscribe``, ``sent``, ``drop``, ``collect``), under one
    condition variable. Chunks carry ``num_chunks=0`` (not known yet) except the last, an empty
    end-of-version chunk whose ``num_chunks`` is the total.

    Who must be sent a chunk before it is released: the actors the coordinator expects to update
    (``expect``, registered and behind this version) plus any actor that subscribed. An expected
    actor that has not asked within ``subscribe_s`` of the opening is streamed past (logged); it,
    and any actor that asks after chunk 0 was released, waits at the server for the next opening
    (``LearnerServer.weights_wanted``: the trainer re-publishes when it is idle). A subscriber
    that stops taking bytes for ``stall_s`` lifts the bound for the rest of this version (logged):
    the learner never blocks on one actor for longer than that."""

    streaming = True

    def __init__(self, version: int, window: int, expect: set[str], subscribe_s: float, stall_s: float):
        self.version = version
        self.window = max(1, window)
        self.subscribe_s, self.stall_s = subscribe_s, stall_s
        self.cond = threading.Condition()
        self.held: dict[int, tuple[bytes, list[memoryview], int]] = {}
        """chunk -> (header, buffers, bytes), until released."""
        self.n = 0
        """Chunks added so far (the end chunk included)."""
        self.complete = False
        self.released = 0
        """Chunks ``[0, released)`` were sent to everyone who needs them and freed."""
        self.expected = set(expect)
        self.progress: dict[str, int] = {}
        """Subscribed actor -> chunks handed to ZeroMQ for it."""
        self._trackers: dict[int, list] = {}
        self.opened = time.monotonic()
        self.peak_held_bytes = 0
        self.bounded = True

    # -- the publisher's side

    def add(self, bucket: Bucket) -> None:
        header = m.encode(
            m.WeightsChunk(version=self.version, chunk=self.n, num_chunks=0, tensors=bucket.metas,
                           checksum=bucket.checksum, checksum_algo=CHECKSUM)
        )
        with self.cond:
            self.held[self.n] = (header, bucket.buffers(), bucket.nbytes)
            self.n += 1
            self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes())

    def finish(self) -> None:
        """Add the end-of-version chunk (no tensors; ``num_chunks`` = the total)."""
        header = m.encode(
            m.WeightsChunk(version=self.version, chunk=self.n, num_chunks=self.n + 1, tensors=[],
                           checksum=checksum([]), checksum_algo=CHECKSUM)
        )
        with self.cond:
            self.held[self.n] = (header, [], 0)
            self.n += 1
            self.complete = True
            self._collect_locked()

    def wait_room(self) -> None:
        """Block until fewer than ``window`` buckets are held (the next may be gathered), or no
        subscriber has taken a chunk for ``stall_s`` (then stop bounding this version)."""
        last, released = time.monotonic(), -1
        with self.cond:
            while self.bounded and self._held_buckets() >= self.window:
                self._collect_locked()
                if self.released != released:
                    last, released = time.monotonic(), self.released
                elif time.monotonic() - last > self.stall_s:
                    behind = sorted(a for a in self.expected if self.progress.get(a, 0) <= self.released)
                    log.warning(
                        "weights v%d: %s took no chunk for %.0fs; rank 0 keeps the rest of this version for them "
                        "(memory no longer bounded by transport.weights_window until the next version)",
                        self.version, ", ".join(behind) or "ZeroMQ", self.stall_s,
                    )
                    self.bounded = False
                    break
                self.cond.wait(0.002)

    # -- the IO thread's side

    def chunk(self, i: int) -> tuple[bytes, list[memoryview]] | None:
        with self.cond:
            got = self.held.get(i)
        return None if got is None else (got[0], got[1])

    def can_start(self) -> bool:
        """Chunk 0 is still held: a new subscriber can be sent the whole version."""
        with self.cond:
            return self.released == 0

    def subscribe(self, actor: str) -> None:
        with self.cond:
            self.expected.add(actor)
            self.progress[actor] = 0

    def sent(self, actor: str, i: int, tracker) -> None:
        with self.cond:
            self.progress[actor] = i + 1
            if tracker is not None:
                self._trackers.setdefault(i, []).append(tracker)

    def drop(self, actor: str) -> None:
        """``actor`` is gone (its peer vanished): nothing waits for it."""
        with self.cond:
            self.expected.discard(actor)
            self.progress.pop(actor, None)
            self.cond.notify_all()

    def collect(self) -> None:
        with self.cond:
            self._collect_locked()

    def _collect_locked(self) -> None:
        if time.monotonic() - self.opened > self.subscribe_s:
            for a in sorted(self.expected - set(self.progress)):
                self.expected.discard(a)
                log.info("weights v%d: %s did not ask within %.0fs of the announcement; streaming past it "
                         "(it gets the version when it asks)", self.version, a, self.subscribe_s)
        before = self.released
        while self.released < self.n:
            i = self.released
            if any(self.progress.get(a, 0) <= i for a in self.expected):
                break
            if not all(t.done for t in self._trackers.get(i, ())):
                break
            self.held.pop(i, None)
            self._trackers.pop(i, None)
            self.released += 1
        if self.released != before:
            self.cond.notify_all()

    def _held_buckets(self) -> int:
        return sum(1 for _, _, nb in self.held.values() if nb)

    def held_bytes(self) -> int:
        return sum(nb for _, _, nb in self.held.values())

    def done(self) -> bool:
        """Every chunk was added and released (nothing more to send to anyone)."""
        with self.cond:
            return self.complete and self.released == self.n


class ZmqPublisher:
    """Streams each version's buckets on the learner's control socket as they are gathered.

    ``window`` > 0 (``transport.weights_window``): a ``StreamingVersion``; the version is
    announced when the stream opens, so actors receive bucket ``i`` while rank 0 gathers bucket
    ``i + 1``, and rank 0 holds at most ``window`` buckets. ``window`` = 0: the whole version is
    gathered into a ``BucketSnapshot`` first and kept until the next publish (one copy of the
    model in the serve dtype), announced once complete; actors may then fetch at any time."""

    def __init__(self, server: LearnerServer, bucket_bytes: int, window: int = 2, subscribe_s: float = 10.0,
                 stall_s: float = 60.0):
        self.server = server
        self.bucket_bytes = bucket_bytes
        self.window, self.subscribe_s, self.stall_s = window, subscribe_s, stall_s
        self.snapshot: BucketSnapshot | StreamingVersion | None = None

    def publish(self, version: int, named: NamedTensors, announce=lambda: None, hold: bool = False) -> None:
        self.server.publish(None)  # drop the previous version before gathering this one (one copy held, not two)
        self.snapshot = None
        if self.window <= 0 or hold:
            snap = BucketSnapshot(version, list(buckets_of(named, self.bucket_bytes)))
            self.snapshot = snap
            self.server.publish(snap)
            announce()
            return
        stream = StreamingVersion(version, self.window, self.server.actors_to_update(version), self.subscribe_s, self.stall_s)
        self.snapshot = stream
        self.server.publish(stream)
        announce()  # actors ask now and are sent each bucket as it is sealed
        for bucket in buckets_of(named, self.bucket_bytes):
            stream.add(bucket)
            del bucket
            self.server.wake()
            stream.wait_room()
        stream.finish()
        self.server.wake()

    def weights_group_for(self, actor_id: str) -> None:
        return None

    def close(self) -> None:
        pass  # the server owns the socket


class ZmqReceiver:
    """Pulls buckets over the actor's control DEALER, one per step of the returned stream.

    The client's request lock is held from the request until the stream is
    exhausted or closed (the DEALER carries one exchange at a time); a stream
    abandoned early resets the DEALER so the chunks still on their way are never
    read as the reply to a later request."""

    private_buffers = True  # each fetch receives into new ZeroMQ messages

    def __init__(self, client: ActorClient, actor_id: str):
        self.client = client
        self.actor_id = actor_id

    async def fetch(self, have_version: int, timeout_s: float) -> tuple[int, NamedTensors] | None:
        c = self.client
        try:
            await asyncio.wait_for(c._lock.acquire(), timeout_s)
        except asyncio.TimeoutError:
            raise TransportTimeout(
                f"the control connection to {c.control_ep} stayed busy for {timeout_s:.0f}s (an earlier request "
                f"or weights stream holds it)"
            ) from None
        try:
            sock = c._socket()
            # a version whose stream already passed its first bucket: the server holds the request
            # until the version (or a newer one) opens again
            wait_s = min(30.0, timeout_s / 2)
            await c._send(sock, m.WeightsRequest(actor_id=self.actor_id, have_version=have_version, wait_s=wait_s))
            frames = await c._recv(sock, timeout_s, "weights")
            first = m.decode(frames[0].bytes)
            if isinstance(first, m.NoWeights):
                c._lock.release()
                return None
            if isinstance(first, m.Error):
                raise LearnerRefused("WeightsRequest", first)
            if not isinstance(first, m.WeightsChunk) or first.chunk != 0:
                raise m.ProtocolError(f"expected weights chunk 0, got {type(first).__name__}")
        except BaseException:
            c._reset()
            c._lock.release()
            raise
        stream = _ZmqStream(c, sock, first, [f.buffer for f in frames[1:]], timeout_s, asyncio.get_running_loop(), self.actor_id)
        return first.version, stream

    def close(self) -> None:
        pass  # the client is the actor's


class _ZmqStream:
    """The tensors of one version, bucket by bucket, read off the DEALER as they are consumed."""

    def __init__(self, client: ActorClient, sock, first: m.WeightsChunk, bufs: list, timeout_s: float, loop, actor_id: str):
        self.client, self.sock, self.first, self.bufs, self.actor_id = client, sock, first, bufs, actor_id
        self.timeout_s, self.loop = timeout_s, loop
        self.buckets_received = 0
        self._released = False

    def _release(self, complete: bool) -> None:
        """Give the DEALER back (reset first unless every chunk was read), once."""
        if self._released:
            return
        self._released = True
        if self.loop.is_closed():
            return
        if not complete:  # chunks may still be on their way: never read them as a later reply
            self.loop.call_soon_threadsafe(self.client._reset)
        self.loop.call_soon_threadsafe(self.client._lock.release)

    def __del__(self):  # a stream dropped without being read (its consumer failed first)
        self._release(complete=False)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        done = False
        try:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is self.loop:
                raise RuntimeError("consume a zmq weights stream from a worker thread (asyncio.to_thread), not its event loop")
            header, bufs = self.first, self.bufs
            self.first = self.bufs = None  # each bucket's frames are released once consumed
            v, n = header.version, header.num_chunks  # n = 0: streamed, the total comes with the end chunk
            i = 0
            while True:
                if i > 0:
                    what = f"weights v{v} chunk {i}/{n or '?'}"
                    fut = asyncio.run_coroutine_threadsafe(self.client._recv(self.sock, self.timeout_s, what), self.loop)
                    try:
                        frames = fut.result(self.timeout_s + 30)
                    except TransportTimeout as e:
                        raise WeightsRejected(f"weights v{v} incomplete: {e}; refusing it") from e
                    header = m.decode(frames[0].bytes)
                    if not isinstance(header, m.WeightsChunk) or header.version != v or header.chunk != i:
                        raise WeightsRejected(f"weights chunks out of order: got {header!r:.80}, want v{v}#{i}; refusing it")
                    bufs = [f.buffer for f in frames[1:]]
                    frames = fut = None  # only ``bufs`` keeps this bucket: it is freed once its tensors are applied
                    if n and header.num_chunks != n:
                        raise WeightsRejected(f"weights v{v} chunk {i}: says {header.num_chunks} chunks, chunk 0 said {n}; refusing it")
                    n = n or header.num_chunks
                tensors = verified_tensors(header, bufs, f"weights v{v} chunk {i}/{n or '?'}")
                bufs = None
                if not n:  # streamed: ask for the next bucket while this one is applied
                    ack = m.WeightsAck(actor_id=self.actor_id, version=v, chunk=i)
                    asyncio.run_coroutine_threadsafe(self.client._send(self.sock, ack), self.loop).result(self.timeout_s)
                if tensors:
                    self.buckets_received += 1
                yield from tensors
                del tensors
                i += 1
                if n and i >= n:
                    break
            done = True
        finally:
            self._release(complete=done)


# ----------------------------------------------------------------- filesystem

_ST_DTYPES = {
    "bfloat16": "BF16", "float32": "F32", "float16": "F16", "float64": "F64", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_VERSION_DIR = re.compile(r"v(\d+)")
MANIFEST = "manifest.json"


PIECES_KEY = "relay_pieces"
"""``__metadata__`` entry of a transport shard that holds pieces: JSON ``{key: [name, first row,
whole shape]}`` (a file cannot hold one name twice, so a piece is stored as ``name[start:stop]``)."""


def write_safetensors(path: Path, named: list[tuple[str, Any]], metadata: dict[str, str]) -> tuple[int, int]:
    """Write a safetensors file from contiguous CPU tensors (or ``Rows`` pieces of them, listed in
    ``metadata[PIECES_KEY]``) without an intermediate blob; return (bytes, checksum of the whole file)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    pieces: dict[str, list] = {}
    offset = 0
    bufs = []
    for name, a in named:
        key = name
        if isinstance(a, Rows):
            key = f"{name}[{a.start}:{a.stop}]"
            pieces[key] = [name, a.start, list(a.shape)]
            a = a.data
        t = as_tensor(a)
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_DTYPES[dtype_name(t.dtype)], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        bufs.append(tensor_bytes(t))
    if pieces:
        header["__metadata__"][PIECES_KEY] = json.dumps(pieces, separators=(",", ":"))
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # data starts 8-byte aligned
    prefix = len(head).to_bytes(8, "little") + head
    with open(path, "wb") as f:
        f.write(prefix)
        for buf in bufs:
            f.write(buf)
    return len(prefix) + offset, checksum([prefix, *bufs])


def parse_safetensors(buf, where: str) -> list[tuple[str, Any]]:
    """Zero-copy views of the tensors of one safetensors file held in ``buf``, in file order
    (``Rows`` for the pieces ``write_safetensors`` listed)."""
    mv = memoryview(buf).cast("B")
    try:
        n = int.from_bytes(mv[:8], "little")
        header = json.loads(bytes(mv[8 : 8 + n]))
        pieces = json.loads(header.get("__metadata__", {}).get(PIECES_KEY, "{}"))
        data = mv[8 + n :]
        out = []
        for key, meta in sorted(
            ((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0]
        ):
            start, end = meta["data_offsets"]
            name, row_start, full = pieces.get(key, (key, 0, None))
            tm = m.TensorMeta(name=name, dtype=_ST_NAMES[meta["dtype"]], shape=list(meta["shape"]), nbytes=end - start,
                              full_shape=full, row_start=row_start)
            out.append((name, item_of(tm, tensor_from_buffer(data[start:end], tm))))
        return out
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsRejected(f"{where}: not a readable safetensors file: {e}") from e


class FilesystemPublisher:
    """Writes each version to ``weights_dir/v<N>/`` atomically, one shard per bucket as it fills,
    and keeps the newest ``keep``."""

    def __init__(self, weights_dir: str | Path, bucket_bytes: int, keep: int = 2):
        self.dir = Path(weights_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bucket_bytes = bucket_bytes
        self.keep = max(1, keep)
        for stale in self.dir.glob(".tmp-*"):  # left by a crashed learner: never visible to readers
            shutil.rmtree(stale, ignore_errors=True)

    def publish(self, version: int, named: NamedTensors, announce: Callable[[], None] = lambda: None, hold: bool = False) -> None:
        tmp = self.dir / f".tmp-v{version}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files = []
        for i, bucket in enumerate(buckets_of(named, self.bucket_bytes)):
            fname = f"shard-{i + 1:05d}.safetensors"
            nbytes, digest = write_safetensors(tmp / fname, bucket.named(), {"format": "pt", "relay_version": str(version)})
            files.append({"name": fname, "nbytes": nbytes, "checksum": digest, "checksum_algo": CHECKSUM})
            del bucket  # written: the next bucket reuses the memory
        (tmp / MANIFEST).write_text(json.dumps({"version": version, "files": files}, indent=1))
        final = self.dir / f"v{version}"
        if final.exists():  # republishing a version (a resumed run): move the old copy aside first
            final.rename(self.dir / f".gc-v{version}-{time.monotonic_ns()}")
        tmp.rename(final)
        self._collect()
        announce()

    def _collect(self) -> None:
        versions = sorted(int(mt.group(1)) for p in self.dir.iterdir() if (mt := _VERSION_DIR.fullmatch(p.name)))
        for v in versions[: -self.keep]:
            aside = self.dir / f".gc-v{v}-{time.monotonic_ns()}"
            (self.dir / f"v{v}").rename(aside)
        for p in self.dir.glob(".gc-*"):
            shutil.rmtree(p, ignore_errors=True)

    def weights_group_for(self, actor_id: str) -> None:
        return None

    def close(self) -> None:
        pass


class FilesystemReceiver:
    """Reads the newest complete version from ``weights_dir``, verifying each shard as it is read."""

    private_buffers = False  # mapped from files the publisher later deletes (unsafe to serve from on NFS)

    def __init__(self, weights_dir: str | Path):
        self.dir = Path(weights_dir)

    def newest(self) -> int:
        """The newest version directory present (-1 if none)."""
        try:
            names = [p.name for p in self.dir.iterdir()]
        except FileNotFoundError:
            return -1
        return max((int(mt.group(1)) for n in names if (mt := _VERSION_DIR.fullmatch(n))), default=-1)

    async def fetch(self, have_version: int, timeout_s: float) -> tuple[int, NamedTensors] | None:
        return await asyncio.to_thread(self.fetch_blocking, have_version, timeout_s)

    def fetch_blocking(self, have_version: int, timeout_s: float) -> tuple[int, NamedTensors] | None:
        deadline = time.monotonic() + timeout_s
        while True:
            version = self.newest()
            if version <= have_version:
                return None
            try:
                return version, self.open(version)
            except FileNotFoundError as e:  # collected while we opened it: a newer one exists, read that
                if time.monotonic() > deadline:
                    raise TransportTimeout(
                        f"no weights version newer than v{have_version} stayed in {self.dir} long enough to be "
                        f"read within {timeout_s:.0f}s (last: v{version}, {e})"
                    ) from e
                log.info("weights v%d was garbage-collected while being opened; retrying", version)

    def open(self, version: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Check ``v<version>``'s manifest and shard sizes and open every shard (``WeightsRejected``
        if it is incomplete); the returned stream maps and verifies each shard when it gets there."""
        vdir = self.dir / f"v{version}"
        if not vdir.is_dir():
            raise FileNotFoundError(vdir)
        try:
            manifest = json.loads((vdir / MANIFEST).read_text())
        except FileNotFoundError:
            if not vdir.is_dir():
                raise
            raise WeightsRejected(f"weights v{version} at {vdir} is incomplete: no {MANIFEST}; refusing it") from None
        except ValueError as e:
            raise WeightsRejected(f"weights v{version} at {vdir}: unreadable {MANIFEST} ({e}); refusing it") from e
        if manifest.get("version") != version:
            raise WeightsRejected(f"weights at {vdir}: manifest says v{manifest.get('version')}; refusing it")
        opened = []
        try:
            for entry in manifest["files"]:
                path = vdir / entry["name"]
                f = open(path, "rb")  # open now: the shard stays readable if the version is collected meanwhile
                opened.append((entry, path, f))
                size = os.fstat(f.fileno()).st_size
                if size != entry["nbytes"]:
                    raise WeightsRejected(
                        f"weights v{version}: {path} has {size} bytes, the manifest says {entry['nbytes']} "
                        f"(partial or truncated); refusing it"
                    )
        except BaseException:
            for _, _, f in opened:
                f.close()
            raise
        return self._stream(version, opened)

    def _stream(self, version: int, opened) -> Iterator[tuple[str, torch.Tensor]]:
        try:
            for entry, path, f in opened:
                # a private mapping: valid after the file is collected, and tensors may view it
                buf = mmap.mmap(f.fileno(), entry["nbytes"], access=mmap.ACCESS_COPY) if entry["nbytes"] else b""
                algo = entry.get("checksum_algo", "crc32")
                if checksum([buf], algo) != entry["checksum"]:
                    raise WeightsRejected(f"weights v{version}: {path} fails its {algo} checksum (corrupted); refusing it")
                tensors = parse_safetensors(buf, str(path))
                del buf
                yield from tensors
                del tensors
        finally:
            for _, _, f in opened:
                f.close()

    def read(self, version: int) -> list[tuple[str, torch.Tensor]]:
        """Every tensor of ``v<version>``, verified (``WeightsRejected`` if incomplete or corrupt)."""
        return list(self.open(version))

    def close(self) -> None:
        pass
# ----------------------------------------------------------------- nccl / gloo


def _new_group(store, rank: int, world_size: int, backend: str, timeout: timedelta):
    """A process group over ``store`` that is not registered with torch.distributed's
    global state (the learner's default group is left alone)."""
    from torch.distributed import PrefixStore

    store = PrefixStore("pg", store)
    if backend == "gloo":
        from torch.distributed import ProcessGroupGloo

        return ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        from torch.distributed import ProcessGroupNCCL

        opts = ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return ProcessGroupNCCL(store, rank, world_size, opts)
    raise ValueError(f"weights group backend must be nccl or gloo, got {backend!r}")


BUCKET_BYTES = 4 << 20
"""Consecutive tensors smaller than this share one broadcast (a flat byte buffer): gloo and
NCCL pay a fixed cost per collective, and a model has many small norms and biases."""


def plan_buckets(sizes: list[int], bucket_bytes: int = BUCKET_BYTES) -> list[tuple[list[int], list[int], int]]:
    """Group tensors (by byte size, in order) into broadcasts: ``[(indices, offsets, total bytes)]``.

    A tensor of ``bucket_bytes`` or more goes alone; smaller consecutive ones are
    packed at 16-byte-aligned offsets into buckets of at most ``bucket_bytes``.
    Both ends compute the same plan from the announced tensor list."""
    out: list[tuple[list[int], list[int], int]] = []
    idx: list[int] = []
    offs: list[int] = []
    end = 0
    for i, n in enumerate(sizes):
        if n >= bucket_bytes:
            if idx:
                out.append((idx, offs, end))
                idx, offs, end = [], [], 0
            out.append(([i], [0], n))
            continue
        start = -(-end // 16) * 16
        if idx and start + n > bucket_bytes:
            out.append((idx, offs, end))
            idx, offs, end, start = [], [], 0, 0
        idx.append(i)
        offs.append(start)
        end = start + n
    if idx:
        out.append((idx, offs, end))
    return out


def _wait_works(works: list, timeout: timedelta, what: str) -> None:
    for i, w, _ in works:
        try:
            w.wait(timeout)
        except RuntimeError as e:
            raise TransportTimeout(f"{what}: broadcast #{i} failed or timed out after {timeout}: {e}") from e


def _broadcast(group, t: torch.Tensor):
    """Start a broadcast of ``t`` from rank 0 of ``group``; the work to wait on."""
    from torch.distributed import BroadcastOptions

    opts = BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    return group.broadcast([t], opts)


class CollectivePublisher:
    """Learner rank 0 of the weights group: hosts the store and broadcasts each version in a round.

    A round on the wire is self-describing, a bucket at a time: per bucket one broadcast of its
    header's length (int64), one of the header (a ``WeightsChunk``: the bucket's ``TensorMeta``,
    checksum), then its tensors (small ones packed into ``BUCKET_BYTES`` buffers, ``plan_buckets``);
    the end is a header with no tensors whose ``num_chunks`` is the total. So the learner need not
    know the tensor list before it gathers them.

    ``window`` > 0 (``transport.weights_window``): ``publish`` announces the round, waits up to
    ``subscribe_s`` for every actor to join, then broadcasts each bucket as it is gathered while it
    gathers the next, holding at most ``window`` buckets: rank 0's memory is bounded whatever the
    model size, and ``publish`` returns once the actors have it. If the actors do not all join in
    time (one is busy draining its episodes, or dead), the version is gathered whole and handed to
    the broadcast thread, which waits for them up to ``timeout_s`` (then fails the next publish),
    and training goes on. ``window`` = 0, or ``hold``: always that second way (one copy of the
    version in the serve dtype, kept until it is sent). A version not yet on the wire is replaced
    by a newer one."""

    def __init__(self, host: str, n_actors: int, backend: str, timeout_s: float, bucket_bytes: int = 64 << 20,
                 window: int = 2, subscribe_s: float = 10.0):
        from torch.distributed import TCPStore

        if n_actors < 1:
            raise ValueError("a collective weights group needs at least one actor")
        self.host = host
        self.world_size = n_actors + 1
        self.backend = backend
        self.timeout = timedelta(seconds=timeout_s)
        self.bucket_bytes, self.window, self.subscribe_s = bucket_bytes, window, subscribe_s
        self.store = TCPStore(host, 0, None, True, self.timeout, wait_for_workers=False)
        self.port = self.store.port
        self.store.set("latest", "-1")
        # the broadcast thread's own connection: its long wait on go/<r> must not block publish/close
        self._tstore = TCPStore(host, self.port, None, False, self.timeout)
        self._gstore = TCPStore(host, self.port, None, False, self.timeout)  # the process group's
        self.ranks: dict[str, int] = {}
        self.group = None
        self.round = 0
        self.rounds_sent = 0
        self.rounds_streamed = 0
        self.held_bytes = 0
        """The most bytes of gathered buckets rank 0 held at once for the last round it sent
        (streamed: the window; otherwise the whole version)."""
        self.error: BaseException | None = None
        self._pending: tuple[int, list[Bucket]] | None = None
        self._closing = False
        self._waiting_round: int | None = None
        self._cond = threading.Condition()
        self._wire = threading.Lock()  # one round on the wire at a time, rounds in order
        self._device = None
        if backend == "nccl":
            self._device = torch.device("cuda", torch.cuda.current_device())
        self._thread = threading.Thread(target=self._run, name="relay-weights-broadcast", daemon=True)
        self._thread.start()
        log.info("weights group store at %s:%d (%s, %d actors)", host, self.port, backend, n_actors)

    def weights_group_for(self, actor_id: str) -> m.WeightsGroup:
        with self._cond:
            if actor_id not in self.ranks:
                if len(self.ranks) >= self.world_size - 1:
                    raise ValueError(
                        f"the weights group is full ({self.world_size - 1} actors: {sorted(self.ranks)}); "
                        f"{actor_id} cannot join (transport.weights=nccl needs a fixed set of actors)"
                    )
                self.ranks[actor_id] = len(self.ranks) + 1
            return m.WeightsGroup(host=self.host, port=self.port, rank=self.ranks[actor_id], world_size=self.world_size, backend=self.backend)

    def publish(self, version: int, named: NamedTensors, announce: Callable[[], None] = lambda: None, hold: bool = False) -> None:
        self.check()
        if version == 0:  # what actors loaded from disk: announced, never sent
            self.store.set("latest", "0")
            announce()
            return
        with self._cond:
            self._pending = None  # a version not yet on the wire is replaced by this one
        announced = False
        # streamed unless the thread still has a round on the wire (then wait for it as long as for actors)
        if self.window > 0 and not hold and self._wire.acquire(timeout=self.subscribe_s):
            try:
                r = self.round
                self._announce(self.store, r, version)
                announce()
                announced = True
                if self._joined(self.store, r, timedelta(seconds=self.subscribe_s)):
                    self._send(self.store, r, version, buckets_of(named, self.bucket_bytes))
                    self.rounds_streamed += 1
                    return
                log.info("weights v%d: not every actor joined round %d within %.0fs; the whole version goes "
                         "to the broadcast thread, which waits for them", version, r, self.subscribe_s)
            finally:
                self._wire.release()
        buckets = list(buckets_of(named, self.bucket_bytes))  # gathered now, sent by the thread
        with self._cond:
            self._pending = (version, buckets)
            self._cond.notify_all()
        if not announced:
            self.store.set("latest", str(version))
            announce()

    def check(self) -> None:
        """Raise if the broadcast thread failed."""
        if self.error is not None:
            raise RuntimeError("the weights broadcast thread failed") from self.error

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._pending is None and not self._closing:
                        self._cond.wait()
                    if self._closing:
                        return
                    version, buckets = self._pending
                    self._pending = None
                with self._wire:
                    r = self.round
                    self._announce(self._tstore, r, version)
                    if not self._wait_ready(r, version):
                        return
                    self._send(self._tstore, r, version, iter(buckets))
                    self.held_bytes = sum(b.nbytes for b in buckets)
                del buckets
        except BaseException as e:  # the broadcast thread must not die silently
            self.error = e
            log.exception("weights broadcast thread failed")

    def _announce(self, store, r: int, version: int) -> None:
        store.set(f"round/{r}", m.encode(m.WeightsAnnounce(version=version, round=r)))
        store.set("latest", str(version))

    def _joined(self, store, r: int, timeout: timedelta) -> bool:
        try:
            store.wait([f"go/{r}"], timeout)
        except RuntimeError:  # DistStoreError: the timeout
            return False
        return True

    def _send(self, store, r: int, version: int, buckets: Iterator[Bucket]) -> None:
        """Broadcast round ``r``: each bucket (header length, header, tensors), then the end header,
        keeping at most ``window`` buckets (1 at least) gathered or on the wire (holding with the thread)."""
        what = f"weights round {r} (v{version})"
        if self.group is None:
            if self._device is not None:
                torch.cuda.set_device(self._device)
            self.group = _new_group(self._gstore, 0, self.world_size, self.backend, self.timeout)
        in_flight: list[tuple[int, list]] = []  # (bytes, works holding their tensors)
        n, held = 0, 0
        for bucket in buckets:
            in_flight.append((bucket.nbytes, self._send_bucket(version, n, 0, bucket.metas, bucket.tensors, bucket.checksum)))
            n += 1
            del bucket
            held = max(held, sum(b for b, _ in in_flight))
            while len(in_flight) >= max(1, self.window):
                _wait_works(in_flight.pop(0)[1], self.timeout, what)
        in_flight.append((0, self._send_bucket(version, n, n + 1, [], [], checksum([]))))
        for _, works in in_flight:
            _wait_works(works, self.timeout, what)
        self.held_bytes = held
        if r > 0:
            store.delete_key(f"round/{r - 1}")
            store.delete_key(f"ready/{r - 1}")
            store.delete_key(f"go/{r - 1}")
        self.round += 1
        self.rounds_sent += 1

    def _send_bucket(self, version: int, chunk: int, num_chunks: int, metas: list, tensors: list, digest: int) -> list:
        """Start the broadcasts of one bucket; the works, each with the tensor it sends."""
        header = m.encode(m.WeightsChunk(version=version, chunk=chunk, num_chunks=num_chunks, tensors=metas,
                                         checksum=digest, checksum_algo=CHECKSUM))
        blob = torch.frombuffer(bytearray(header), dtype=torch.uint8)
        parts = [torch.tensor([blob.numel()], dtype=torch.int64), blob]
        for idx, offs, total in plan_buckets([mt.nbytes for mt in metas]):
            if len(idx) == 1 and offs == [0]:
                parts.append(tensors[idx[0]].reshape(-1).view(torch.uint8))
                continue
            flat = torch.empty(total, dtype=torch.uint8)
            for i, off in zip(idx, offs):
                flat[off : off + metas[i].nbytes] = tensors[i].reshape(-1).view(torch.uint8)
            parts.append(flat)
        works = []
        for i, t in enumerate(parts):
            if self._device is not None:
                t = t.to(self._device, non_blocking=True)
            works.append((i, _broadcast(self.group, t), t))
        return works

    def _wait_ready(self, r: int, version: int) -> bool:
        """Wait for ``go/<r>``, set by the last actor to join (or by ``close``: then False)."""
        with self._cond:
            self._waiting_round = r
            if self._closing:
                return False
        try:
            self._tstore.wait([f"go/{r}"], self.timeout)
        except RuntimeError as e:  # DistStoreError: the timeout
            raise TransportTimeout(
                f"timed out after {self.timeout.total_seconds():.0f}s waiting for {self.world_size - 1} actors to "
                f"join weights round {r} (v{version}) at {self.host}:{self.port}; "
                f"{self._tstore.add(f'ready/{r}', 0)} joined"
            ) from e
        with self._cond:
            self._waiting_round = None
            return not self._closing

    def close(self) -> None:
        """Stop broadcasting; a round still waiting for actors is abandoned."""
        try:  # actors already in an abandoned round read this and take it as 'no update'
            self.store.set("closing", "1")
        except Exception:  # the store may already be gone; closing proceeds
            pass
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            waiting = self._waiting_round
        if waiting is not None:  # wake the thread's wait on go/<r>
            self.store.set(f"go/{waiting}", "closed")
        self._thread.join(timeout=self.timeout.total_seconds())


class CollectiveReceiver:
    """An actor's membership of the weights group: joins each round and receives its buckets."""

    private_buffers = True  # each round receives into new buffers

    def __init__(self, group: m.WeightsGroup, timeout_s: float):
        from torch.distributed import TCPStore

        self.spec = group
        self.timeout = timedelta(seconds=timeout_s)
        try:
            self.store = TCPStore(group.host, group.port, None, False, self.timeout)
        except RuntimeError as e:
            raise TransportTimeout(
                f"could not reach the weights group store at {group.host}:{group.port} within {timeout_s:.0f}s: {e}"
            ) from e
        self.group = None
        self.round = 0
        self.device = None
        if group.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    async def fetch(self, have_version: int, timeout_s: float) -> tuple[int, NamedTensors] | None:
        return await asyncio.to_thread(self.fetch_blocking, have_version, timeout_s)

    def fetch_blocking(self, have_version: int, timeout_s: float) -> tuple[int, NamedTensors] | None:
        latest = int(self.store.get("latest"))
        if latest <= have_version:
            return None
        r, where = self.round, f"{self.spec.host}:{self.spec.port}"
        try:
            self.store.wait([f"round/{r}"], timedelta(seconds=timeout_s))
        except RuntimeError as e:  # DistStoreError (timeout) is a RuntimeError
            raise TransportTimeout(
                f"timed out after {timeout_s:.0f}s waiting for weights round {r} to be announced at {where} "
                f"(learner is at v{latest}, this actor serves v{have_version})"
            ) from e
        ann = m.decode(self.store.get(f"round/{r}"))
        if not isinstance(ann, m.WeightsAnnounce) or ann.round != r:
            raise m.ProtocolError(f"weights group store at {where}: round/{r} holds {ann!r}, not its announcement")
        if self.store.add(f"ready/{r}", 1) == self.spec.world_size - 1:
            self.store.set(f"go/{r}", "1")  # the last actor in: the learner may start broadcasting
        if self.group is None:
            if self.device is not None:
                torch.cuda.set_device(self.device)
            self.group = _new_group(self.store, self.spec.rank, self.spec.world_size, self.spec.backend, self.timeout)
        # a bucket at a time, received when the stream reaches it: the actor holds one bucket, not the
        # version. The first is received here, so a round the learner abandons at shutdown is 'no update'.
        what = f"weights round {r} from {where}"
        try:
            first = self._receive(what)
        except (TransportTimeout, RuntimeError):
            if self._learner_closing():
                log.info("the learner closed the weights group during round %d: no update", r)
                return None
            raise
        self.round += 1
        return first[0].version, self._stream(first, what)

    def _receive(self, what: str) -> tuple[m.WeightsChunk, list[tuple[str, Any]]]:
        """One bucket of the round: its header and items (views of the buffers it came in), its
        checksum verified when it arrived in host memory (``WeightsRejected`` if it fails)."""
        n = torch.empty(1, dtype=torch.int64, device=self.device or "cpu")
        _wait_works([(0, _broadcast(self.group, n), n)], self.timeout, what)
        size = int(n.item())
        if not 0 < size <= MAX_HEADER_BYTES:
            raise m.ProtocolError(f"{what}: a bucket header of {size} bytes (at most {MAX_HEADER_BYTES})")
        blob = torch.empty(size, dtype=torch.uint8, device=self.device or "cpu")
        _wait_works([(1, _broadcast(self.group, blob), blob)], self.timeout, what)
        header = m.decode(blob.cpu().numpy().tobytes())
        if not isinstance(header, m.WeightsChunk):
            raise m.ProtocolError(f"{what}: a bucket header holds {type(header).__name__}, not a WeightsChunk")
        metas = header.tensors
        works, bufs = [], []
        for k, (idx, offs, total) in enumerate(plan_buckets([mt.nbytes for mt in metas])):
            flat = torch.empty(total, dtype=torch.uint8, device=self.device or "cpu")
            works.append((k, _broadcast(self.group, flat), flat))
            bufs.extend(flat[off : off + metas[i].nbytes] for i, off in zip(idx, offs))
        _wait_works(works, self.timeout, what)
        if self.device is None:  # host memory: check the bytes as the other transports do
            return header, verified_tensors(header, [tensor_bytes(b) for b in bufs], f"{what} bucket {header.chunk}")
        torch.cuda.current_stream().synchronize()
        items = [(mt.name, item_of(mt, b.view(torch_dtype(mt.dtype)).reshape(mt.shape))) for mt, b in zip(metas, bufs)]
        return header, items

    def _stream(self, first, what: str) -> Iterator[tuple[str, torch.Tensor]]:
        header, items = first
        version, ended, k = header.version, False, 0
        try:
            while True:
                if (header.version, header.chunk) != (version, k):
                    raise m.ProtocolError(f"{what}: bucket {header.chunk} of v{header.version} where bucket {k} of v{version} was due")
                if not header.tensors:  # the end of the round
                    ended = True
                    return
                yield from items
                del items
                header, items = self._receive(what)
                k += 1
        finally:  # abandoned early: still take part in the round's remaining broadcasts (the group stays in step)
            while not ended:
                header, _ = self._receive(what)
                ended = not header.tensors

    def _learner_closing(self) -> bool:
        """True when the learner is shutting the group down (or its store is already gone)."""
        try:
            return self.store.check(["closing"])
        except Exception:
            return True

    def close(self) -> None:
        self.group = None


MAX_HEADER_BYTES = 64 << 20
"""The largest bucket header a receiver accepts (a bucket's ``TensorMeta`` list)."""


# ----------------------------------------------------------------- choosing one


def make_publisher(
    kind: str,
    *,
    server: LearnerServer,
    bucket_bytes: int,
    weights_dir: str | Path | None,
    host: str,
    n_actors: int,
    backend: str,
    timeout_s: float,
    window: int = 2,
    subscribe_s: float = 10.0,
    stall_s: float = 60.0,
) -> WeightsPublisher:
    """The learner's publisher for ``transport.weights=kind``; collective ones hook ``server``'s Welcome.
    ``window``, ``subscribe_s``, ``stall_s``: the zmq stream's (``StreamingVersion``)."""
    if kind == "zmq":
        return ZmqPublisher(server, bucket_bytes, window, subscribe_s, stall_s)
    if kind == "filesystem":
        if weights_dir is None:
            raise ValueError("transport.weights=filesystem needs transport.weights_dir")
        return FilesystemPublisher(weights_dir, bucket_bytes)
    if kind == "nccl":
        pub = CollectivePublisher(host, n_actors, backend, timeout_s, bucket_bytes, window, subscribe_s)
        server.weights_group_for = pub.weights_group_for
        return pub
    raise ValueError(f"transport.weights must be one of {KINDS}, got {kind!r}")


def make_receiver(
    kind: str, welcome: m.Welcome, *, client: ActorClient, actor_id: str, weights_dir: str | Path | None, timeout_s: float
) -> WeightsReceiver:
    """An actor's receiver for ``transport.weights=kind``, given the learner's ``Welcome``."""
    if kind == "zmq":
        return ZmqReceiver(client, actor_id)
    if kind == "filesystem":
        if weights_dir is None:
            raise ValueError("transport.weights=filesystem needs transport.weights_dir")
        return FilesystemReceiver(weights_dir)
    if kind == "nccl":
        if welcome.weights_group is None:
            raise m.ProtocolError(
                "transport.weights=nccl but the learner's Welcome has no weights_group: "
                "do the learner and this actor use the same config?"
            )
        return CollectiveReceiver(welcome.weights_group, timeout_s)
    raise ValueError(f"transport.weights must be one of {KINDS}, got {kind!r}")
