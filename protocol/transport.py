"""ZeroMQ transport between the learner (rank 0) and its actors.

Socket pattern
--------------
- **control** (``tcp://host:port``): learner ``ROUTER`` (bind) <- actor ``DEALER``
  (connect). Strict request/reply per actor: ``Register -> Welcome``,
  ``Heartbeat -> HeartbeatAck``, ``WorkRequest -> WorkGrant``,
  ``WeightsRequest -> WeightsChunk * n | NoWeights``. Weights ride this socket
  as multipart messages ``[header, buf_0, buf_1, ...]`` (zero-copy on send), one
  message per chunk, so every actor receives every byte it asked for (a PUB
  socket would silently drop updates for slow or late subscribers).
- **data** (``tcp://host:port+1``): actor ``PUSH`` (connect) -> learner ``PULL``
  (bind). Trajectories only, one msgpack frame each.

High-water marks
----------------
The data path is bounded on both sides by ``hwm`` messages (``SNDHWM`` on each
PUSH, ``RCVHWM`` on the PULL); when full, ``ActorClient.push`` waits (up to its
timeout) instead of dropping, so back-pressure reaches the actors and no
trajectory is lost. The control ROUTER has no send HWM (replies are never
dropped) and ``ROUTER_MANDATORY`` so a reply to a vanished peer is an error we
see, not a silent drop.

Readiness handshake
-------------------
The learner binds before any actor starts. An actor connects (ZeroMQ queues
its first message until the connection exists) and sends ``Register``; it is
ready when ``Welcome`` comes back. Every blocking wait has a timeout and says
what it waited for. A request that times out closes and reopens the DEALER
(the "lazy pirate" pattern) so a late reply can never be mistaken for the
answer to the next request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import zlib
from typing import Callable, Iterable, Protocol

import msgspec
import numpy as np
import xxhash
import zmq
import zmq.asyncio

from protocol import messages as m

log = logging.getLogger(__name__)


class TransportTimeout(TimeoutError):
    """A blocking wait on the transport ran out; the message says what for."""


def endpoints(host: str, port: int) -> tuple[str, str]:
    """The control and data endpoints of a learner at ``host:port``."""
    return f"tcp://{host}:{port}", f"tcp://{host}:{port + 1}"


# ----------------------------------------------------------------- weights

CHECKSUM = "xxh3_64"
"""Checksum of weight buffers we send: xxh3 runs at memory speed (~16 GB/s here, crc32 ~3 GB/s),
so verifying costs a small fraction of moving the bytes."""


def checksum(buffers: Iterable, algo: str = CHECKSUM) -> int:
    """The ``algo`` checksum (``xxh3_64`` or ``crc32``) of the concatenation of ``buffers``."""
    if algo == "xxh3_64":
        h = xxhash.xxh3_64()
        for buf in buffers:
            h.update(buf)
        return h.intdigest()
    if algo == "crc32":
        value = 0
        for buf in buffers:
            value = zlib.crc32(buf, value)
        return value
    raise m.ProtocolError(f"unknown checksum algorithm {algo!r} (this build knows xxh3_64, crc32)")


class WeightsSnapshot:
    """One published policy version, split into chunks (views of the arrays, no copies).

    A chunk's header (with its checksum) is computed the first time the chunk
    is sent, then kept: the IO thread checksums chunk ``i + 1`` while ZeroMQ is
    still transmitting chunk ``i``, and ``publish`` costs no pass over the bytes.
    The arrays must not change after they were published.
    """

    def __init__(self, version: int, groups: list[tuple[list[m.TensorMeta], list[memoryview]]], nbytes: int):
        self.version = version
        self.nbytes = nbytes
        self._groups = groups
        self._headers: list[bytes | None] = [None] * len(groups)

    def __len__(self) -> int:
        return len(self._groups)

    def chunk(self, i: int) -> tuple[bytes, list[memoryview]]:
        """Header and buffers of chunk ``i``."""
        metas, bufs = self._groups[i]
        if self._headers[i] is None:
            self._headers[i] = m.encode(
                m.WeightsChunk(
                    version=self.version, chunk=i, num_chunks=len(self._groups), tensors=metas,
                    checksum=checksum(bufs), checksum_algo=CHECKSUM,
                )
            )
        return self._headers[i], bufs

    @property
    def chunks(self) -> list[tuple[bytes, list[memoryview]]]:
        return [self.chunk(i) for i in range(len(self._groups))]


def make_snapshot(version: int, named_arrays: list[tuple[str, np.ndarray]], chunk_bytes: int) -> WeightsSnapshot:
    """Split ``named_arrays`` into chunks of about ``chunk_bytes`` (checksummed when first sent)."""
    groups: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    for name, arr in named_arrays:
        if groups[-1] and size + arr.nbytes > chunk_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, np.ascontiguousarray(arr)))
        size += arr.nbytes
    chunks = []
    for group in groups:
        metas, bufs = [], []
        for name, arr in group:
            bufs.append(memoryview(arr.reshape(-1).view(np.uint8)))
            metas.append(m.TensorMeta(name=name, dtype=arr.dtype.str, shape=list(arr.shape), nbytes=arr.nbytes))
        chunks.append((metas, bufs))
    return WeightsSnapshot(version, chunks, sum(a.nbytes for _, a in named_arrays))


def read_chunk(frames: list) -> tuple[m.WeightsChunk, list[tuple[str, np.ndarray]]]:
    """Decode one weights chunk (header + buffers) and verify its checksum."""
    header = m.decode(frames[0])
    if not isinstance(header, m.WeightsChunk):
        raise m.ProtocolError(f"expected a weights chunk, got {type(header).__name__}")
    bufs = frames[1:]
    if len(bufs) != len(header.tensors):
        raise m.ProtocolError(f"weights chunk {header.chunk}: {len(header.tensors)} tensors but {len(bufs)} buffers")
    out, views = [], []
    for meta, buf in zip(header.tensors, bufs):
        mv = memoryview(buf)
        if mv.nbytes != meta.nbytes:
            raise m.ProtocolError(f"tensor {meta.name}: {mv.nbytes} bytes, header says {meta.nbytes}")
        views.append(mv)
        out.append((meta.name, np.frombuffer(mv, dtype=np.dtype(meta.dtype)).reshape(meta.shape)))
    if checksum(views, header.checksum_algo) != header.checksum:
        raise m.ProtocolError(f"weights v{header.version} chunk {header.chunk}: checksum mismatch")
    return header, out


# ----------------------------------------------------------------- learner side


class LearnerHandler(Protocol):
    """What the learner plugs into the server. Called on the IO thread: be quick."""

    def on_request(self, peer: str, msg: m.Message) -> m.Message | None:
        """Answer a control request; ``None`` means 'send the newest weights'."""

    def on_trajectory(self, traj: m.Trajectory) -> None: ...

    def on_tick(self, now: float) -> None: ...


class LearnerServer:
    """Rank 0's sockets, owned by one IO thread (ZeroMQ sockets are not thread-safe)."""

    def __init__(self, handler: LearnerHandler, bind_host: str, port: int, hwm: int = 1024, tick_s: float = 0.2, ready: bool = True):
        self.handler = handler
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.control.setsockopt(zmq.SNDHWM, 0)
        self.control.setsockopt(zmq.LINGER, 0)
        self.data = self.ctx.socket(zmq.PULL)
        self.data.setsockopt(zmq.RCVHWM, hwm)
        self.data.setsockopt(zmq.LINGER, 0)
        control_ep, data_ep = endpoints(bind_host, port)
        self.control.bind(control_ep)
        self.data.bind(data_ep)
        self.tick_s = tick_s
        self._weights: WeightsSnapshot | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.bad_messages = 0
        self.weights_bytes_sent = 0
        self.error: BaseException | None = None
        self.weights_group_for: Callable[[str], m.WeightsGroup | None] | None = None
        """Set by a collective weights publisher: fills ``Welcome.weights_group`` per actor
        (called on the IO thread; a ``ValueError`` becomes an ``Error`` reply)."""
        self._ready = threading.Event()
        if ready:
            self._ready.set()
        self._held: list[tuple[bytes, list[bytes]]] = []  # Registers that arrived before mark_ready()
        self._thread = threading.Thread(target=self._run, name="relay-learner-io", daemon=True)
        self._thread.start()
        log.info("learner listening: control %s, data %s", control_ep, data_ep)

    def mark_ready(self) -> None:
        """Start answering registrations (held until now)."""
        self._ready.set()

    def publish(self, snapshot: WeightsSnapshot) -> None:
        """Make ``snapshot`` the weights served to every later ``WeightsRequest``."""
        with self._lock:
            self._weights = snapshot

    @property
    def weights_version(self) -> int:
        with self._lock:
            return self._weights.version if self._weights else -1

    def _send_weights(self, ident: bytes, have_version: int) -> None:
        with self._lock:
            snap = self._weights
        if snap is None or snap.version <= have_version:
            self.control.send_multipart([ident, m.encode(m.NoWeights(learner_version=snap.version if snap else -1))])
            return
        for i in range(len(snap)):
            header, bufs = snap.chunk(i)
            self.control.send_multipart([ident, header, *bufs], copy=False)
        self.weights_bytes_sent += snap.nbytes

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.data, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(int(self.tick_s * 1000)))
                if self.data in events:
                    for _ in range(256):
                        try:
                            frame = self.data.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        try:
                            msg = m.decode(frame)
                            if not isinstance(msg, m.Trajectory):
                                raise m.ProtocolError(f"data socket carries trajectories, got {type(msg).__name__}")
                        except m.ProtocolError as e:
                            self.bad_messages += 1
                            log.warning("dropped a malformed message on the data socket: %s", e)
                            continue
                        self.handler.on_trajectory(msg)
                if self.control in events:
                    for _ in range(256):
                        try:
                            ident, *frames = self.control.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._serve(ident, frames)
                if self._held and self._ready.is_set():
                    held, self._held = self._held, []
                    for ident, frames in held:
                        self._serve(ident, frames)
                self.handler.on_tick(time.monotonic())
        except BaseException as e:  # the IO thread must not die silently
            self.error = e
            log.exception("learner IO thread failed")

    def _serve(self, ident: bytes, frames: list[bytes]) -> None:
        peer = ident.hex()
        try:
            if len(frames) != 1:
                raise m.ProtocolError(f"control requests are one frame, got {len(frames)}")
            msg = m.decode(frames[0])
        except m.ProtocolError as e:
            self.bad_messages += 1
            log.warning("malformed control message from %s: %s", peer, e)
            self._reply(ident, m.Error(message=str(e)))
            return
        if isinstance(msg, m.Register) and not self._ready.is_set():
            self._held.append((ident, frames))  # answered once the learner is ready (e.g. its weights group exists)
            return
        reply = self.handler.on_request(peer, msg)
        if isinstance(reply, m.Welcome) and self.weights_group_for is not None:
            try:
                reply = msgspec.structs.replace(reply, weights_group=self.weights_group_for(reply.actor_id))
            except ValueError as e:
                reply = m.Error(message=str(e))
        if reply is None and isinstance(msg, m.WeightsRequest):
            try:
                self._send_weights(ident, msg.have_version)
            except zmq.ZMQError as e:
                log.warning("could not send weights to %s: %s", peer, e)
        elif reply is not None:
            self._reply(ident, reply)

    def _reply(self, ident: bytes, msg: m.Message) -> None:
        try:
            self.control.send_multipart([ident, m.encode(msg)])
        except zmq.ZMQError as e:  # peer gone (ROUTER_MANDATORY): nothing to deliver to
            log.warning("reply to %s undeliverable: %s", ident.hex(), e)

    def check(self) -> None:
        """Raise if the IO thread died."""
        if self.error is not None:
            raise RuntimeError("learner IO thread died") from self.error

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.control.close(0)
        self.data.close(0)
        self.ctx.term()


# ----------------------------------------------------------------- actor side


class ActorClient:
    """An actor's connection to the learner (asyncio; one request in flight at a time)."""

    def __init__(self, host: str, port: int, hwm: int = 1024):
        self.control_ep, self.data_ep = endpoints(host, port)
        self.ctx = zmq.asyncio.Context()
        self._dealer: zmq.asyncio.Socket | None = None
        self.push_sock = self.ctx.socket(zmq.PUSH)
        self.push_sock.setsockopt(zmq.SNDHWM, hwm)
        self.push_sock.setsockopt(zmq.LINGER, 30_000)  # flush queued trajectories on close
        self.push_sock.connect(self.data_ep)
        self._lock = asyncio.Lock()
        self.bytes_received = 0

    def _socket(self) -> zmq.asyncio.Socket:
        if self._dealer is None:
            self._dealer = self.ctx.socket(zmq.DEALER)
            self._dealer.setsockopt(zmq.LINGER, 0)
            self._dealer.setsockopt(zmq.RCVHWM, 0)
            self._dealer.connect(self.control_ep)
        return self._dealer

    def _reset(self) -> None:
        if self._dealer is not None:
            self._dealer.close(0)
            self._dealer = None

    async def _recv(self, sock, timeout_s: float, what: str) -> list:
        if not await sock.poll(timeout_s * 1000, zmq.POLLIN):
            self._reset()
            raise TransportTimeout(f"no {what} from the learner at {self.control_ep} within {timeout_s:.0f}s")
        frames = await sock.recv_multipart(copy=False)
        self.bytes_received += sum(f.buffer.nbytes for f in frames)
        return frames

    async def call(self, msg: m.Message, timeout_s: float) -> m.Message:
        """Send one control request and return its reply (an ``Error`` reply raises)."""
        async with self._lock:
            sock = self._socket()
            await sock.send(m.encode(msg))
            frames = await self._recv(sock, timeout_s, f"reply to {type(msg).__name__}")
        reply = m.decode(frames[0].bytes)
        if isinstance(reply, m.Error):
            raise m.ProtocolError(f"learner refused {type(msg).__name__}: {reply.message}")
        return reply

    async def fetch_weights(
        self, actor_id: str, have_version: int, timeout_s: float
    ) -> tuple[int, list[tuple[str, np.ndarray]]] | None:
        """Fetch the newest weights if newer than ``have_version``; all chunks or an error."""
        async with self._lock:
            sock = self._socket()
            await sock.send(m.encode(m.WeightsRequest(actor_id=actor_id, have_version=have_version)))
            frames = await self._recv(sock, timeout_s, "weights")
            first = m.decode(frames[0].bytes)
            if isinstance(first, m.NoWeights):
                return None
            if isinstance(first, m.Error):
                raise m.ProtocolError(f"learner refused WeightsRequest: {first.message}")
            header, tensors = read_chunk([f.buffer for f in frames])
            out = list(tensors)
            for i in range(1, header.num_chunks):
                frames = await self._recv(sock, timeout_s, f"weights chunk {i}/{header.num_chunks}")
                h, tensors = read_chunk([f.buffer for f in frames])
                if h.version != header.version or h.chunk != i:
                    self._reset()
                    raise m.ProtocolError(f"weights chunks out of order: got v{h.version}#{h.chunk}, want v{header.version}#{i}")
                out.extend(tensors)
            return header.version, out

    async def push(self, traj: m.Trajectory, timeout_s: float) -> None:
        """Queue one trajectory for the learner, waiting (bounded) if the queue is full."""
        if not await self.push_sock.poll(timeout_s * 1000, zmq.POLLOUT):
            raise TransportTimeout(
                f"the learner at {self.data_ep} accepted no trajectory within {timeout_s:.0f}s (queue full)"
            )
        await self.push_sock.send(m.encode(traj))

    def close(self) -> None:
        self._reset()
        self.push_sock.close()
        self.ctx.term()


def wait_until(pred: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    """Block until ``pred()`` is true or raise ``TransportTimeout`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise TransportTimeout(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)
