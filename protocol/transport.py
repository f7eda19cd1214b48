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

Authentication and limits
-------------------------
Every message's first frame is a keyed MAC with the run secret
(``protocol/auth.py`` says why a MAC and not CURVE, and what it does and does
not protect): requests ``[tag, body]``, replies ``[tag, body]``, trajectories
``[tag, body]``, weights chunks ``[tag, header, buf_0, ...]`` (the tag covers
the header, which carries the buffers' checksum). A frame that does not
verify is dropped unanswered and counted (``unauthenticated``). Learner
sockets refuse frames over ``max_message_bytes`` (``ZMQ_MAXMSGSIZE``: the
peer is disconnected), derived from the model's context length. Decoding is
total (``messages.decode``), and both server loops survive anything a single
message does to a handler: it is counted (``bad_messages``), logged in one
bounded line (the first few in full, then one line per thousand), and the
loop carries on.

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
from protocol.auth import DATA, REPLY, REQUEST, FrameMac, require_secret

log = logging.getLogger(__name__)


class TransportTimeout(TimeoutError):
    """A blocking wait on the transport ran out; the message says what for."""


class LearnerRefused(m.ProtocolError):
    """The learner answered a request with an ``Error``; ``code`` says why (see ``messages.Error``)."""

    def __init__(self, request: str, error: m.Error):
        super().__init__(f"learner refused {request}: {error.message}")
        self.code = error.code


def endpoints(host: str, port: int) -> tuple[str, str]:
    """The control and data endpoints of a learner at ``host:port``."""
    return f"tcp://{host}:{port}", f"tcp://{host}:{port + 1}"


def message_size_limit(context_tokens: int) -> int:
    """Largest frame the learner accepts: a trajectory of ``context_tokens`` tokens (13 bytes of
    arrays per token, plus up to 51 bytes of decoded text each for its final answer) and 1 MiB
    for everything else (reward components, stats)."""
    return (1 << 20) + 64 * max(1, context_tokens)


class _BadFrameLog:
    """One bounded log line per bad frame for the first ``full`` of them, then one per ``every``."""

    def __init__(self, full: int = 20, every: int = 1000):
        self.full, self.every, self.n = full, every, 0

    def __call__(self, what: str, peer: str, err: BaseException | str) -> None:
        self.n += 1
        if self.n <= self.full or self.n % self.every == 0:
            text = str(err)
            text = text if len(text) <= 300 else text[:300] + "..."
            log.warning("%s from %s (%d so far): %s", what, peer, self.n, text)


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
        if meta.full_shape is not None:  # whole arrays only here: pieces are joined by protocol/weights.py's receivers
            raise m.ProtocolError(f"tensor {meta.name}: a row piece of {meta.full_shape}; read this stream with protocol.weights")
        mv = memoryview(buf)
        if mv.nbytes != meta.nbytes:
            raise m.ProtocolError(f"tensor {meta.name}: {mv.nbytes} bytes, header says {meta.nbytes}")
        views.append(mv)
        out.append((meta.name, np.frombuffer(mv, dtype=np.dtype(meta.dtype)).reshape(meta.shape)))
    if checksum(views, header.checksum_algo) != header.checksum:
        raise m.ProtocolError(f"weights v{header.version} chunk {header.chunk}: checksum mismatch")
    return header, out


# ----------------------------------------------------------------- learner side


def _worth_waiting(msg: m.WorkRequest, reply: m.Message) -> bool:
    """An empty grant that tells the actor nothing new: hold it (long poll) rather than send it."""
    return isinstance(reply, m.WorkGrant) and not reply.items and not reply.stop and reply.learner_version <= msg.version


class LearnerHandler(Protocol):
    """What the learner plugs into the server. Called on the IO thread: be quick."""

    def on_request(self, peer: str, msg: m.Message) -> m.Message | None:
        """Answer a control request; ``None`` means 'send the newest weights'."""

    def on_trajectory(self, traj: m.Trajectory) -> None: ...

    def on_tick(self, now: float) -> None: ...

    def actors_to_update(self, version: int) -> set[str]:
        """The live actors that serve a version older than ``version`` (a streamed version's
        buckets are kept until each of them was sent them)."""


class LearnerServer:
    """Rank 0's sockets, owned by one IO thread (ZeroMQ sockets are not thread-safe)."""

    def __init__(
        self, handler: LearnerHandler, bind_host: str, port: int, hwm: int = 1024, tick_s: float = 0.2, ready: bool = True,
        *, secret: bytes | None = None, max_message_bytes: int = 64 << 20,
    ):
        self.handler = handler
        self.mac = FrameMac(require_secret(secret))
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.control.setsockopt(zmq.SNDHWM, 0)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.data = self.ctx.socket(zmq.PULL)
        self.data.setsockopt(zmq.RCVHWM, hwm)
        self.data.setsockopt(zmq.LINGER, 0)
        self.data.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.max_message_bytes = max_message_bytes
        # other threads wake the IO thread (a new version, a validation round) through this pair
        self._wake_rx = self.ctx.socket(zmq.PULL)
        self._wake_rx.bind(f"inproc://relay-wake-{id(self)}")
        self._wake_tx = self.ctx.socket(zmq.PUSH)
        self._wake_tx.connect(f"inproc://relay-wake-{id(self)}")
        self._wake_lock = threading.Lock()
        self._parked: list[tuple[bytes, m.WorkRequest, float]] = []
        """Long-polling ``WorkRequest``s: (peer, request, deadline)."""
        self.port = self._bind(bind_host, port)
        control_ep, data_ep = endpoints(bind_host, self.port)
        self.tick_s = tick_s
        self._weights = None
        """The newest version: a complete ``WeightsSnapshot``/``BucketSnapshot`` served to any later
        request, or a ``StreamingVersion`` sent to its subscribers as it is gathered."""
        self._streaming = None  # the StreamingVersion the IO thread is sending (IO thread only)
        self._subs: dict[bytes, str] = {}
        """Peers subscribed to ``_streaming`` -> their actor id (IO thread only)."""
        self._acked: dict[bytes, int] = {}
        """Subscriber -> chunks it acknowledged (``WeightsAck``): it is sent chunk ``i`` once it
        acknowledged chunk ``i - 1``, so it never holds more than two buckets."""
        self._waiting: dict[bytes, tuple[str, int, float]] = {}
        """Weights requests held for the next opening: peer -> (actor id, have_version, deadline)."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.bad_messages = 0
        """Authenticated frames that were malformed or that a handler refused (each dropped)."""
        self.unauthenticated = 0
        """Frames without a valid run-secret tag (dropped unanswered)."""
        self.handler_errors = 0
        """Messages whose handler raised something unexpected (counted in ``bad_messages`` too)."""
        self._bad_log = _BadFrameLog()
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

    def _bind(self, host: str, port: int) -> int:
        """Bind control to ``port`` and data to ``port + 1``; ``port`` 0: a free pair chosen here,
        at bind time, so no other process can take it between choosing and binding."""
        if port:
            control_ep, data_ep = endpoints(host, port)
            self.control.bind(control_ep)
            self.data.bind(data_ep)
            return port
        for _ in range(100):
            p = self.control.bind_to_random_port(f"tcp://{host}", min_port=20000, max_port=64000)
            try:
                self.data.bind(endpoints(host, p)[1])
                return p
            except zmq.ZMQError:
                self.control.unbind(self.control.getsockopt_string(zmq.LAST_ENDPOINT))
        raise RuntimeError(f"no free pair of ports on {host} after 100 tries")

    def write_endpoint(self, path, host: str) -> None:
        """Write ``{"host", "port"}`` to ``path`` atomically (``ActorClient.from_endpoint_file`` reads it)."""
        import json
        from pathlib import Path

        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"host": host, "port": self.port}))
        tmp.replace(path)

    def wake(self) -> None:
        """Make the IO thread look at parked work requests now (any thread may call this)."""
        with self._wake_lock:
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # a wake-up is already queued

    def mark_ready(self) -> None:
        """Start answering registrations (held until now)."""
        self._ready.set()

    def publish(self, snapshot) -> None:
        """Make ``snapshot`` the weights served to every later ``WeightsRequest`` (``None``: none).
        A streaming one (``protocol.weights.StreamingVersion``) is sent to each subscriber as its
        buckets are added; requests held for the next opening subscribe to it at once."""
        with self._lock:
            self._weights = snapshot
        if getattr(snapshot, "streaming", False):
            self.wake()

    def actors_to_update(self, version: int) -> set[str]:
        """The handler's actors behind ``version`` (none if the handler cannot say), and the actors
        whose weights requests are held here for a version older than it."""
        ask = getattr(self.handler, "actors_to_update", None)
        held = {actor for actor, have, _ in list(self._waiting.values()) if have < version}
        return (set(ask(version)) if ask is not None else set()) | held

    def weights_wanted(self) -> bool:
        """An actor waits for the newest version, which can no longer be sent to it from its start
        (a streamed version released its first bucket): the learner should publish it again."""
        with self._lock:
            snap = self._weights
        return bool(self._waiting) and getattr(snap, "streaming", False) and not snap.can_start()

    @property
    def weights_version(self) -> int:
        with self._lock:
            return self._weights.version if self._weights else -1

    def _send_weights(self, ident: bytes, msg: m.WeightsRequest) -> None:
        with self._lock:
            snap = self._weights
        have_version = msg.have_version
        if snap is None or snap.version <= have_version:
            self._reply(ident, m.NoWeights(learner_version=snap.version if snap else -1))
            return
        if getattr(snap, "streaming", False):
            self._pump_weights()  # a newly opened stream: take it over before subscribing
            for other, actor in list(self._subs.items()):  # the same actor on a new connection
                if actor == msg.actor_id and other != ident:
                    del self._subs[other]
            if snap.can_start():
                self._subscribe(ident, msg.actor_id, snap)
                self._pump_weights()
            elif msg.wait_s > 0:
                self._waiting[ident] = (msg.actor_id, have_version, time.monotonic() + min(msg.wait_s, 30.0))
            else:
                self._reply(ident, m.NoWeights(learner_version=snap.version))
            return
        for i in range(len(snap)):
            header, bufs = snap.chunk(i)
            self.control.send_multipart([ident, self.mac.tag(REPLY, header), header, *bufs], copy=False)
        self.weights_bytes_sent += snap.nbytes

    def _pump_weights(self) -> None:
        """Send every subscriber the streamed chunks it has not had yet; release what everyone
        has; answer held requests whose wait is over (IO thread)."""
        with self._lock:
            snap = self._weights
        stream = snap if getattr(snap, "streaming", False) else None
        if stream is not self._streaming:  # a new version opened (or none): subscribers start over
            if self._streaming is not None:
                self._send_stream(self._streaming, flush=True)  # what the old one's subscribers still lack (it is complete)
            self._streaming, self._subs, self._acked = stream, {}, {}
            if stream is not None:
                for ident, (actor, have, _) in list(self._waiting.items()):
                    if have < stream.version and stream.can_start():
                        del self._waiting[ident]
                        self._subscribe(ident, actor, stream)
        if stream is not None:
            self._send_stream(stream)
        if self._waiting:
            now = time.monotonic()
            for ident, (actor, have, deadline) in list(self._waiting.items()):
                if now >= deadline:
                    del self._waiting[ident]
                    self._reply(ident, m.NoWeights(learner_version=snap.version if snap is not None else -1))

    def _subscribe(self, ident: bytes, actor: str, stream) -> None:
        """``actor`` (on peer ``ident``) is sent ``stream`` from its first chunk, one ahead of its acks."""
        self._subs[ident] = actor
        self._acked[ident] = 0
        stream.subscribe(actor)

    def _send_stream(self, stream, flush: bool = False) -> None:
        """Send each subscriber the chunks it may have: up to one past what it acknowledged (all
        of them when ``flush``: the stream is being replaced)."""
        for ident, actor in list(self._subs.items()):
            i = stream.progress.get(actor, 0)
            while i < stream.n and (flush or i <= self._acked.get(ident, 0)):
                got = stream.chunk(i)
                if got is None:  # cannot happen while it is subscribed; never send a gap
                    break
                header, bufs = got
                try:
                    tracker = self.control.send_multipart(
                        [ident, self.mac.tag(REPLY, header), header, *bufs], copy=False, track=bool(bufs)
                    )
                except zmq.ZMQError as e:  # peer gone (ROUTER_MANDATORY)
                    log.warning("could not send weights v%d to %s: %s", stream.version, actor, e)
                    del self._subs[ident]
                    stream.drop(actor)
                    break
                stream.sent(actor, i, tracker if bufs else None)
                self.weights_bytes_sent += sum(memoryview(b).nbytes for b in bufs)
                i += 1
            if stream.complete and stream.progress.get(actor, 0) >= stream.n:
                self._subs.pop(ident, None)
                self._acked.pop(ident, None)
        stream.collect()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.data, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                busy = self._streaming is not None and not self._streaming.done() or self._waiting
                events = dict(poller.poll(2 if busy else int(self.tick_s * 1000)))
                if self.data in events:
                    for _ in range(256):
                        try:
                            frames = self.data.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._take_trajectory(frames)
                if self.control in events:
                    for _ in range(256):
                        try:
                            ident, *frames = self.control.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._serve(ident, frames)
                if self._wake_rx in events:
                    while True:
                        try:
                            self._wake_rx.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                if self._parked:
                    self._revisit_parked()
                if self._weights is not self._streaming or busy:
                    self._pump_weights()
                if self._held and self._ready.is_set():
                    held, self._held = self._held, []
                    for ident, frames in held:
                        self._serve(ident, frames)
                try:
                    self.handler.on_tick(time.monotonic())
                except Exception as e:  # noqa: BLE001 - a bad tick must not end the IO thread
                    self.handler_errors += 1
                    self._bad_log("tick handler failed", "learner", f"{type(e).__name__}: {e}")
        except BaseException as e:  # the IO thread must not die silently
            self.error = e
            log.exception("learner IO thread failed")

    def _authentic(self, direction: bytes, frames: list[bytes], peer: str) -> bool:
        if len(frames) >= 2 and len(frames[0]) == 16 and self.mac.verify(direction, frames[0], frames[1]):
            return True
        self.unauthenticated += 1
        self._bad_log("dropped an unauthenticated frame", peer, f"{len(frames)} frame(s) without a valid run-secret tag")
        return False

    def _bad(self, what: str, peer: str, e: BaseException) -> None:
        self.bad_messages += 1
        if not isinstance(e, m.ProtocolError):
            self.handler_errors += 1
            e = f"{type(e).__name__}: {e}"
        self._bad_log(what, peer, e)

    def _take_trajectory(self, frames: list[bytes]) -> None:
        if not self._authentic(DATA, frames, "data socket"):
            return
        try:
            if len(frames) != 2:
                raise m.ProtocolError(f"trajectories are one tagged frame, got {len(frames) - 1}")
            msg = m.decode(frames[1])
            if not isinstance(msg, m.Trajectory):
                raise m.ProtocolError(f"data socket carries trajectories, got {type(msg).__name__}")
            self.handler.on_trajectory(msg)
        except Exception as e:  # noqa: BLE001 - one message never ends the loop
            self._bad("dropped a bad message on the data socket", "data socket", e)

    def _serve(self, ident: bytes, frames: list[bytes]) -> None:
        peer = ident.hex()
        if not self._authentic(REQUEST, frames, peer):
            return  # no reply: a peer without the secret learns nothing
        try:
            self._answer(ident, frames)
        except Exception as e:  # noqa: BLE001 - one message never ends the loop
            self._bad("control message failed", peer, e)
            self._reply(ident, m.Error(message=m._short(e)))

    def _answer(self, ident: bytes, frames: list[bytes]) -> None:
        peer = ident.hex()
        try:
            if len(frames) != 2:
                raise m.ProtocolError(f"control requests are one tagged frame, got {len(frames) - 1}")
            msg = m.decode(frames[1])
        except m.ProtocolError as e:
            self._bad("malformed control message", peer, e)
            self._reply(ident, m.Error(message=str(e)))
            return
        if isinstance(msg, m.WeightsAck):  # flow control of a weights stream: no reply
            if msg.actor_id == self._subs.get(ident) and msg.version == self._streaming.version:
                self._acked[ident] = max(self._acked.get(ident, 0), msg.chunk + 1)
                self._pump_weights()
            return
        if isinstance(msg, m.Register) and not self._ready.is_set():
            self._held.append((ident, frames))  # answered once the learner is ready (e.g. its weights group exists)
            return
        reply = self.handler.on_request(peer, msg)
        if isinstance(msg, m.WorkRequest) and msg.wait_s > 0 and _worth_waiting(msg, reply):
            self._parked.append((ident, msg, time.monotonic() + min(msg.wait_s, 30.0)))
            return
        if isinstance(reply, m.Welcome) and self.weights_group_for is not None:
            try:
                reply = msgspec.structs.replace(reply, weights_group=self.weights_group_for(reply.actor_id))
            except ValueError as e:
                reply = m.Error(message=str(e))
        if reply is None and isinstance(msg, m.WeightsRequest):
            try:
                self._send_weights(ident, msg)
            except zmq.ZMQError as e:
                log.warning("could not send weights to %s: %s", peer, e)
        elif reply is not None:
            self._reply(ident, reply)

    def _revisit_parked(self) -> None:
        """Answer each parked work request that can now be granted something, or whose wait is over."""
        now, keep = time.monotonic(), []
        for ident, msg, deadline in self._parked:
            try:
                reply = self.handler.on_request(ident.hex(), msg)
            except Exception as e:  # noqa: BLE001 - one message never ends the loop
                self._bad("parked work request failed", ident.hex(), e)
                self._reply(ident, m.Error(message=m._short(e)))
                continue
            if now < deadline and _worth_waiting(msg, reply):
                keep.append((ident, msg, deadline))
            else:
                self._reply(ident, reply)
        self._parked = keep

    def _reply(self, ident: bytes, msg: m.Message) -> None:
        body = m.encode(msg)
        try:
            self.control.send_multipart([ident, self.mac.tag(REPLY, body), body])
        except zmq.ZMQError as e:  # peer gone (ROUTER_MANDATORY): nothing to deliver to
            log.warning("reply to %s undeliverable: %s", ident.hex(), e)

    def counters(self) -> dict[str, int]:
        """What the sockets dropped so far, for the step metrics."""
        return {
            "transport/bad_messages": self.bad_messages,
            "transport/unauthenticated": self.unauthenticated,
            "transport/handler_errors": self.handler_errors,
        }

    def check(self) -> None:
        """Raise if the IO thread died."""
        if self.error is not None:
            raise RuntimeError("learner IO thread died") from self.error

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.control.close(0)
        self.data.close(0)
        self._wake_rx.close(0)
        self._wake_tx.close(0)
        self.ctx.term()


# ----------------------------------------------------------------- actor side


class ActorClient:
    """An actor's connection to the learner (asyncio; one request in flight at a time)."""

    def __init__(self, host: str, port: int, hwm: int = 1024, *, secret: bytes | None = None):
        self.mac = FrameMac(require_secret(secret))
        self.control_ep, self.data_ep = endpoints(host, port)
        self.ctx = zmq.asyncio.Context()
        self._dealer: zmq.asyncio.Socket | None = None
        self.push_sock = self.ctx.socket(zmq.PUSH)
        self.push_sock.setsockopt(zmq.SNDHWM, hwm)
        self.push_sock.setsockopt(zmq.LINGER, 30_000)  # flush queued trajectories on close
        self.push_sock.connect(self.data_ep)
        self._push_now = zmq.Socket.shadow(self.push_sock.underlying)
        """The same PUSH socket, blocking API (it does not own it): a send with room in the queue needs
        neither a poll nor the asyncio socket's futures (~4 us instead of ~75 us per trajectory)."""
        self._lock = asyncio.Lock()
        self.bytes_received = 0

    def _socket(self) -> zmq.asyncio.Socket:
        if self._dealer is None:
            self._dealer = self.ctx.socket(zmq.DEALER)
            self._dealer.setsockopt(zmq.LINGER, 0)
            self._dealer.setsockopt(zmq.RCVHWM, 0)  # a weights stream is flow-controlled by WeightsAck instead
            self._dealer.connect(self.control_ep)
        return self._dealer

    def _reset(self) -> None:
        if self._dealer is not None:
            self._dealer.close(0)
            self._dealer = None

    async def _recv(self, sock, timeout_s: float, what: str) -> list:
        """The frames of one reply, its tag checked and removed."""
        # the second, immediate poll catches a reply that arrived while this process was paused
        # (SIGSTOP, a swapped-out host): its timer and its reply are then due at the same moment
        # (100 ms: after a SIGCONT this process's ZeroMQ I/O thread first has to read what is waiting)
        if not await sock.poll(timeout_s * 1000, zmq.POLLIN) and not await sock.poll(100, zmq.POLLIN):
            self._reset()
            raise TransportTimeout(f"no {what} from the learner at {self.control_ep} within {timeout_s:.0f}s")
        frames = await sock.recv_multipart(copy=False)
        self.bytes_received += sum(f.buffer.nbytes for f in frames)
        if len(frames) < 2 or not self.mac.verify(REPLY, frames[0].buffer, frames[1].buffer):
            self._reset()
            raise m.ProtocolError(f"{what} from {self.control_ep} does not carry this run's secret (another job on that port?)")
        return frames[1:]

    async def _send(self, sock, msg: m.Message) -> None:
        body = m.encode(msg)
        await sock.send_multipart([self.mac.tag(REQUEST, body), body])

    async def call(self, msg: m.Message, timeout_s: float) -> m.Message:
        """Send one control request and return its reply (an ``Error`` reply raises ``LearnerRefused``)."""
        async with self._lock:
            sock = self._socket()
            await self._send(sock, msg)
            frames = await self._recv(sock, timeout_s, f"reply to {type(msg).__name__}")
        reply = m.decode(frames[0].bytes)
        if isinstance(reply, m.Error):
            raise LearnerRefused(type(msg).__name__, reply)
        return reply

    async def fetch_weights(
        self, actor_id: str, have_version: int, timeout_s: float
    ) -> tuple[int, list[tuple[str, np.ndarray]]] | None:
        """Fetch the newest weights if newer than ``have_version``; all chunks or an error."""
        async with self._lock:
            sock = self._socket()
            await self._send(sock, m.WeightsRequest(actor_id=actor_id, have_version=have_version))
            frames = await self._recv(sock, timeout_s, "weights")
            first = m.decode(frames[0].bytes)
            if isinstance(first, m.NoWeights):
                return None
            if isinstance(first, m.Error):
                raise LearnerRefused("WeightsRequest", first)
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
        body = m.encode(traj)
        frames = [self.mac.tag(DATA, body), body]
        try:
            self._push_now.send_multipart(frames, flags=zmq.NOBLOCK)  # all frames or none (ZeroMQ's multipart)
            return
        except zmq.Again:  # the queue is full (SNDHWM) or not connected yet: wait for room, bounded
            pass
        if not await self.push_sock.poll(timeout_s * 1000, zmq.POLLOUT):
            raise TransportTimeout(
                f"the learner at {self.data_ep} accepted no trajectory within {timeout_s:.0f}s (queue full)"
            )
        await self.push_sock.send_multipart(frames)

    def close(self) -> None:
        self._reset()
        self.push_sock.close()
        self.ctx.term()


def read_endpoint_file(path, timeout_s: float) -> tuple[str, int]:
    """The learner's ``(host, port)`` from the file ``LearnerServer.write_endpoint`` writes, waiting
    up to ``timeout_s`` for it to appear."""
    import json
    from pathlib import Path

    path = Path(path)
    wait_until(path.exists, timeout_s, f"the learner to write its address to {path}", poll_s=0.02)
    d = json.loads(path.read_text())
    return d["host"], int(d["port"])


def exit_closed(code: int) -> None:
    """End a learner or actor process whose main returned ``code`` with its sockets terminated and
    its files written: without the interpreter's teardown of torch's modules (~1 s per process, and
    triton's nanobind leak report), unless the process still has children (an engine's worker
    processes, which its atexit handlers stop)."""
    import logging
    import os
    import sys

    import psutil

    if psutil.Process().children():
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def wait_until(pred: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    """Block until ``pred()`` is true or raise ``TransportTimeout`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise TransportTimeout(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)
