"""Weight channels, learner -> actors: one small interface, three transports.

The learner (rank 0) holds a ``WeightsPublisher``; each actor holds a
``WeightsReceiver``. The kind is chosen once, from ``transport.weights``:

``zmq`` (default; one node or many)
    The chunked control-socket path of ``protocol/transport.py``: ``publish``
    splits the arrays into checksummed chunks (xxh3_64) and hands them to the
    ``LearnerServer``; ``fetch`` sends a ``WeightsRequest`` on the actor's
    DEALER and reads ``WeightsChunk`` messages until the last one.

``filesystem`` (nodes that share a disk)
    ``publish`` writes ``<weights_dir>/.tmp-v<N>-<pid>/`` (safetensors shards
    plus ``manifest.json`` with each shard's size and checksum, written last),
    renames it to ``v<N>`` (atomic on one filesystem) and then garbage-collects
    all but the newest ``keep`` versions (renamed aside first, so a reader
    never lists a half-deleted one). ``fetch`` maps the newest ``v<N>``'s
    shards (``mmap``, copy-on-write: tensors are views, nothing is copied
    until the engine loads them), checks every shard's size and checksum and
    refuses the version (``WeightsRejected``) if anything is missing or wrong.

``nccl`` (GPU clusters with NCCL connectivity; ``gloo`` on CPU)
    A collective group of learner rank 0 (rank 0) and the actors (ranks
    ``1..n``) with its own rendezvous: a ``TCPStore`` hosted by the learner and
    a ``ProcessGroupNCCL``/``ProcessGroupGloo`` built directly from that store,
    so the learner's default process group is never touched. Actors learn the
    store's address and their rank from ``Welcome.weights_group``. A version
    is sent in *rounds*: the learner writes ``WeightsAnnounce`` (version and
    tensor list) under ``round/<r>`` in the store, waits until every actor has
    incremented ``ready/<r>`` (the last one sets ``go/<r>``), then broadcasts
    the tensors (small ones packed into ``BUCKET_BYTES`` buffers). Broadcasts
    run on a publisher thread, so ``publish`` never blocks training; a round
    not yet started is replaced by a newer version. Every actor joins every
    round, in order; the set of actors is fixed (``rollout.num_actors``).

In every case the actor learns that a new version exists from the control
channel (``WorkGrant``/``HeartbeatAck.learner_version``), which the learner
advances only after ``publish`` returned, and ``fetch`` returns a version only
once every byte of it arrived and was verified; the caller then loads it into
the engine, so an engine never serves a half-applied update. Version 0 is the
model every actor loads from disk: ``fetch(have_version=0)`` is ``None`` until
the learner publishes a newer one.
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
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from protocol import messages as m
from protocol.transport import CHECKSUM, ActorClient, LearnerServer, TransportTimeout, checksum, make_snapshot

log = logging.getLogger(__name__)

NamedArrays = Sequence[tuple[str, Any]]
"""``(name, array)`` pairs: numpy arrays (publishers take these; receivers return them, except
an ``nccl`` receiver on the GPU, which returns CUDA tensors)."""

KINDS = ("zmq", "filesystem", "nccl")


class WeightsRejected(m.ProtocolError):
    """A published version failed verification (partial, truncated or corrupted); nothing was applied."""


class WeightsPublisher(Protocol):
    """Learner rank 0's side."""

    def publish(self, version: int, named_arrays: NamedArrays) -> None:
        """Make ``version`` available to actors. Returns once it may be announced."""

    def weights_group_for(self, actor_id: str) -> m.WeightsGroup | None:
        """What ``Welcome.weights_group`` tells ``actor_id`` (``None`` unless collective)."""

    def close(self) -> None: ...


class WeightsReceiver(Protocol):
    """One actor's side."""

    private_buffers: bool
    """True when fetched arrays live in memory only this process holds and nothing reuses (so an
    engine may serve them without a copy); False for file-backed arrays."""

    async def fetch(self, have_version: int, timeout_s: float) -> tuple[int, NamedArrays] | None:
        """The newest version if newer than ``have_version``, complete and verified; else ``None``.

        Raises ``TransportTimeout`` (saying what it waited for) or ``ProtocolError``
        (``WeightsRejected`` for a version that failed verification)."""

    def close(self) -> None: ...


# ----------------------------------------------------------------- zmq


class ZmqPublisher:
    """Serves the newest version as chunks on the learner's control socket."""

    def __init__(self, server: LearnerServer, chunk_bytes: int):
        self.server = server
        self.chunk_bytes = chunk_bytes

    def publish(self, version: int, named_arrays: NamedArrays) -> None:
        self.server.publish(make_snapshot(version, list(named_arrays), self.chunk_bytes))

    def weights_group_for(self, actor_id: str) -> None:
        return None

    def close(self) -> None:
        pass  # the server owns the socket


class ZmqReceiver:
    """Pulls chunks over the actor's control DEALER (``ActorClient.fetch_weights``)."""

    private_buffers = True  # each fetch receives into new ZeroMQ messages

    def __init__(self, client: ActorClient, actor_id: str):
        self.client = client
        self.actor_id = actor_id

    async def fetch(self, have_version: int, timeout_s: float) -> tuple[int, NamedArrays] | None:
        return await self.client.fetch_weights(self.actor_id, have_version, timeout_s)

    def close(self) -> None:
        pass  # the client is the actor's


# ----------------------------------------------------------------- filesystem

_ST_DTYPES = {
    "float32": "F32", "float16": "F16", "float64": "F64", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
}
_NP_DTYPES = {v: np.dtype(k) for k, v in _ST_DTYPES.items()}
_VERSION_DIR = re.compile(r"v(\d+)")
MANIFEST = "manifest.json"


def write_safetensors(path: Path, named_arrays: NamedArrays, metadata: dict[str, str]) -> tuple[int, int]:
    """Write a safetensors file from numpy arrays without an intermediate blob; return (bytes, checksum)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    arrays = []
    for name, arr in named_arrays:
        arr = np.ascontiguousarray(arr)
        if arr.dtype.name not in _ST_DTYPES or arr.dtype.byteorder == ">":
            raise TypeError(f"tensor {name}: dtype {arr.dtype} cannot be written as safetensors")
        header[name] = {"dtype": _ST_DTYPES[arr.dtype.name], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # data starts 8-byte aligned
    prefix = len(head).to_bytes(8, "little") + head
    bufs = [prefix, *(memoryview(arr.reshape(-1).view(np.uint8)) for arr in arrays)]
    with open(path, "wb") as f:
        for buf in bufs:
            f.write(buf)
    return len(prefix) + offset, checksum(bufs)


def parse_safetensors(buf: np.ndarray, where: str) -> list[tuple[str, np.ndarray]]:
    """Zero-copy views of the tensors in one safetensors file held in ``buf`` (uint8), in file order."""
    try:
        n = int.from_bytes(buf[:8].tobytes(), "little")
        header = json.loads(buf[8 : 8 + n].tobytes())
        data = buf[8 + n :]
        out = []
        for name, meta in sorted(
            ((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0]
        ):
            start, end = meta["data_offsets"]
            out.append((name, data[start:end].view(_NP_DTYPES[meta["dtype"]]).reshape(meta["shape"])))
        return out
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsRejected(f"{where}: not a readable safetensors file: {e}") from e


class FilesystemPublisher:
    """Writes each version to ``weights_dir/v<N>/`` atomically and keeps the newest ``keep``."""

    def __init__(self, weights_dir: str | Path, shard_bytes: int, keep: int = 2):
        self.dir = Path(weights_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = shard_bytes
        self.keep = max(1, keep)
        for stale in self.dir.glob(".tmp-*"):  # left by a crashed learner: never visible to readers
            shutil.rmtree(stale, ignore_errors=True)

    def publish(self, version: int, named_arrays: NamedArrays) -> None:
        tmp = self.dir / f".tmp-v{version}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        shards: list[list[tuple[str, np.ndarray]]] = [[]]
        size = 0
        for name, arr in named_arrays:
            if shards[-1] and size + arr.nbytes > self.shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, arr))
            size += arr.nbytes
        files = []
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            nbytes, digest = write_safetensors(tmp / fname, shard, {"format": "pt", "relay_version": str(version)})
            files.append({"name": fname, "nbytes": nbytes, "checksum": digest, "checksum_algo": CHECKSUM})
        (tmp / MANIFEST).write_text(json.dumps({"version": version, "files": files}, indent=1))
        final = self.dir / f"v{version}"
        if final.exists():  # republishing a version (a resumed run): move the old copy aside first
            final.rename(self.dir / f".gc-v{version}-{time.monotonic_ns()}")
        tmp.rename(final)
        self._collect()

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
    """Reads the newest complete version from ``weights_dir`` and verifies it."""

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

    async def fetch(self, have_version: int, timeout_s: float) -> tuple[int, NamedArrays] | None:
        return await asyncio.to_thread(self.fetch_blocking, have_version, timeout_s)

    def fetch_blocking(self, have_version: int, timeout_s: float) -> tuple[int, NamedArrays] | None:
        deadline = time.monotonic() + timeout_s
        while True:
            version = self.newest()
            if version <= have_version:
                return None
            try:
                return version, self.read(version)
            except FileNotFoundError as e:  # collected while we read it: a newer one exists, read that
                if time.monotonic() > deadline:
                    raise TransportTimeout(
                        f"no weights version newer than v{have_version} stayed in {self.dir} long enough to be "
                        f"read within {timeout_s:.0f}s (last: v{version}, {e})"
                    ) from e
                log.info("weights v%d was garbage-collected while being read; retrying", version)

    def read(self, version: int) -> list[tuple[str, np.ndarray]]:
        """Every tensor of ``v<version>``, verified; ``WeightsRejected`` if it is incomplete or corrupt."""
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
        out: list[tuple[str, np.ndarray]] = []
        for entry in manifest["files"]:
            path = vdir / entry["name"]
            size = path.stat().st_size
            if size != entry["nbytes"]:
                raise WeightsRejected(
                    f"weights v{version}: {path} has {size} bytes, the manifest says {entry['nbytes']} "
                    f"(partial or truncated); refusing it"
                )
            with open(path, "rb") as f:  # a private mapping: stays valid if the file is collected meanwhile
                buf = np.frombuffer(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY), dtype=np.uint8)
            algo = entry.get("checksum_algo", "crc32")
            if checksum([buf], algo) != entry["checksum"]:
                raise WeightsRejected(f"weights v{version}: {path} fails its {algo} checksum (corrupted); refusing it")
            out.extend(parse_safetensors(buf, str(path)))
        return out

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


def _broadcast_all(group, tensors: list, timeout: timedelta, what: str, window_bytes: int, prepare=None) -> None:
    """Broadcast ``tensors`` from rank 0 in order, keeping at most ~``window_bytes`` in flight
    (``prepare``, e.g. a host-to-GPU copy, is applied to each just before its broadcast)."""
    from torch.distributed import BroadcastOptions

    opts = BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    pending: list = []
    in_flight = 0
    for i, t in enumerate(tensors):
        if prepare is not None:
            t = prepare(t)
        pending.append((i, group.broadcast([t], opts), t))
        in_flight += t.numel() * t.element_size()
        if in_flight >= window_bytes:
            _wait_works(pending, timeout, what)
            pending, in_flight = [], 0
    _wait_works(pending, timeout, what)


def _wait_works(works: list, timeout: timedelta, what: str) -> None:
    for i, w, _ in works:
        try:
            w.wait(timeout)
        except RuntimeError as e:
            raise TransportTimeout(f"{what}: broadcast #{i} failed or timed out after {timeout}: {e}") from e


class CollectivePublisher:
    """Learner rank 0 of the weights group: hosts the store and broadcasts each round."""

    def __init__(self, host: str, n_actors: int, backend: str, timeout_s: float, window_bytes: int = 256 << 20):
        from torch.distributed import TCPStore

        if n_actors < 1:
            raise ValueError("a collective weights group needs at least one actor")
        self.host = host
        self.world_size = n_actors + 1
        self.backend = backend
        self.timeout = timedelta(seconds=timeout_s)
        self.window_bytes = window_bytes
        self.store = TCPStore(host, 0, None, True, self.timeout, wait_for_workers=False)
        self.port = self.store.port
        self.store.set("latest", "-1")
        # the broadcast thread's own connection: its long wait on go/<r> must not block publish/close
        self._tstore = TCPStore(host, self.port, None, False, self.timeout)
        self.ranks: dict[str, int] = {}
        self.group = None
        self.round = 0
        self.rounds_sent = 0
        self.error: BaseException | None = None
        self._pending: tuple[int, NamedArrays] | None = None
        self._closing = False
        self._waiting_round: int | None = None
        self._cond = threading.Condition()
        self._device = None
        if backend == "nccl":
            import torch

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

    def publish(self, version: int, named_arrays: NamedArrays) -> None:
        self.check()
        with self._cond:
            if version > 0:  # version 0 is what actors loaded from disk: announced, never sent
                self._pending = (version, named_arrays)
                self._cond.notify_all()
        self.store.set("latest", str(version))

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
                    version, arrays = self._pending
                    self._pending = None
                self._send(version, arrays)
        except BaseException as e:  # the broadcast thread must not die silently
            self.error = e
            log.exception("weights broadcast thread failed")

    def _send(self, version: int, arrays: NamedArrays) -> None:
        import torch

        r = self.round
        arrays = [(name, np.ascontiguousarray(a)) for name, a in arrays]
        metas = [m.TensorMeta(name=name, dtype=a.dtype.str, shape=list(a.shape), nbytes=a.nbytes) for name, a in arrays]
        payload = []
        for idx, offs, total in plan_buckets([mt.nbytes for mt in metas]):
            if len(idx) == 1 and offs == [0]:
                payload.append(torch.from_numpy(arrays[idx[0]][1]))
                continue
            flat = np.empty(total, dtype=np.uint8)
            for i, off in zip(idx, offs):
                flat[off : off + metas[i].nbytes] = arrays[i][1].reshape(-1).view(np.uint8)
            payload.append(torch.from_numpy(flat))
        self._tstore.set(f"round/{r}", m.encode(m.WeightsAnnounce(version=version, round=r, tensors=metas)))
        if not self._wait_ready(r, version):
            return
        if self.group is None:
            if self._device is not None:
                torch.cuda.set_device(self._device)
            self.group = _new_group(self._tstore, 0, self.world_size, self.backend, self.timeout)
        to_device = None if self._device is None else (lambda t: t.to(self._device, non_blocking=True))
        _broadcast_all(self.group, payload, self.timeout, f"weights round {r} (v{version})", self.window_bytes, to_device)
        if r > 0:
            self._tstore.delete_key(f"round/{r - 1}")
            self._tstore.delete_key(f"ready/{r - 1}")
            self._tstore.delete_key(f"go/{r - 1}")
        self.round += 1
        self.rounds_sent += 1

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
    """An actor's membership of the weights group: joins each round and receives its tensors."""

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
            import torch

            self.device = torch.device("cuda", torch.cuda.current_device())

    async def fetch(self, have_version: int, timeout_s: float) -> tuple[int, NamedArrays] | None:
        return await asyncio.to_thread(self.fetch_blocking, have_version, timeout_s)

    def fetch_blocking(self, have_version: int, timeout_s: float) -> tuple[int, NamedArrays] | None:
        import torch

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
        # receive buffers: numpy-backed on CPU (returned as numpy), torch on the GPU
        metas = ann.tensors
        arrays: list = [None] * len(metas)
        payload = []
        for idx, offs, total in plan_buckets([mt.nbytes for mt in metas]):
            flat = np.empty(total, dtype=np.uint8) if self.device is None else torch.empty(total, dtype=torch.uint8, device=self.device)
            for i, off in zip(idx, offs):
                mt = metas[i]
                view = flat[off : off + mt.nbytes]
                if self.device is None:
                    arrays[i] = view.view(np.dtype(mt.dtype)).reshape(mt.shape)
                else:
                    arrays[i] = view.view(torch.from_numpy(np.empty(0, np.dtype(mt.dtype))).dtype).reshape(mt.shape)
            payload.append(torch.from_numpy(flat) if self.device is None else flat)
        try:
            _broadcast_all(self.group, payload, self.timeout, f"weights round {r} (v{ann.version}) from {where}", 1 << 62)
        except (TransportTimeout, RuntimeError):
            if self._learner_closing():
                log.info("the learner closed the weights group during round %d (v%d): no update", r, ann.version)
                return None
            raise
        if self.device is not None:
            torch.cuda.current_stream().synchronize()
        self.round += 1
        return ann.version, [(t.name, a) for t, a in zip(ann.tensors, arrays)]

    def _learner_closing(self) -> bool:
        """True when the learner is shutting the group down (or its store is already gone)."""
        try:
            return self.store.check(["closing"])
        except Exception:
            return True

    def close(self) -> None:
        self.group = None


# ----------------------------------------------------------------- choosing one


def make_publisher(
    kind: str,
    *,
    server: LearnerServer,
    chunk_bytes: int,
    weights_dir: str | Path | None,
    host: str,
    n_actors: int,
    backend: str,
    timeout_s: float,
) -> WeightsPublisher:
    """The learner's publisher for ``transport.weights=kind``; collective ones hook ``server``'s Welcome."""
    if kind == "zmq":
        return ZmqPublisher(server, chunk_bytes)
    if kind == "filesystem":
        if weights_dir is None:
            raise ValueError("transport.weights=filesystem needs transport.weights_dir")
        return FilesystemPublisher(weights_dir, chunk_bytes)
    if kind == "nccl":
        pub = CollectivePublisher(host, n_actors, backend, timeout_s, window_bytes=max(chunk_bytes, 1 << 20) * 4)
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
