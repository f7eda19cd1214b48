"""The transformers engine in a process of its own, beside the actor's (as vLLM runs its engine core).

Why: in one process the engine's steps and the episodes' Python (rendering, tool calls, rewards,
trajectories) share one interpreter lock, so they run one after the other: on this 2-core machine the
actor loop's ~25 ms of Python per ~315 ms batch of two-turn episodes ran on the engine's core
(``bench/bench_actor.py``). Here the engine (``HFEngine``, its own event loop and driver) runs in a
child process, so the episodes' Python runs on another core while the engine steps. Measured, it does
not pay on this machine: ``bench/bench_actor.py`` multi-turn (the demo's RL'd model, 2 turns per
episode), 8 runs each interleaved with the in-process engine on the loop driver, ``ratio_turns`` median
0.74 (0.66-1.01) against 0.97 (0.79-1.24) (2026-12-03, ``rollout.hf_engine_process``, off by default).

The actor side (``HFProcessEngine``) is an ``Engine`` like any other. Two ZeroMQ ``PAIR`` sockets over
``ipc://`` in a private (0700) temporary directory join the two processes; the child binds, the actor
connects:

- *requests*: the ``generate`` calls made in one event-loop tick go as one message
  ``[(id, prompt ids, sampling settings), ...]``; the child submits each to its engine and sends, after
  every step, one message with the results that step finished ``[(id, ok, payload), ...]``. A turn that
  finished is back in the actor's loop one step after it finished, and its next turn joins the child's
  next step after it arrives.
- *control*, used from the weight-loading thread and ``close``: ``ready`` once the child serves; a weight
  update as ``load`` + one ``[header, bytes]`` message per streamed tensor (whole, or one ``Rows``
  piece) + ``end`` (or ``abort`` when the actor's own stream failed), answered with ``loaded`` or
  ``failed``; ``close``. The child stages the tensors as they come, in its engine's standby copy, while its
  requests keep running; a stream that fails changes nothing (``HFEngine.load_weights``).

Failures: the child's death (a crash, the OOM killer) fails every request waiting on it and every later
one with an error naming its exit code (looked at every ``WATCH_S`` while requests wait, and at each
call); a child that does not start within ``start_timeout_s`` is killed and the constructor says so; a
child whose actor died exits within ``WATCH_S`` (it watches its parent). An engine error (a prompt id
out of range) comes back as the same exception type (``ValueError``, else ``RuntimeError``) with the
child's message.

Costs: every request and result crosses a local socket (msgpack, tens of µs per tick's message), and
weights cross it once more (a memory copy through the socket: ~0.8 GB/s here, 2.5 s for a 0.5B model in
fp32). The child starts in the time of its imports and model load (3-5 s here), in parallel with the
actor's own start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import faulthandler
import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Iterable

import msgpack
import torch
import zmq

from actors.engines.base import Engine, Generation, SamplingSettings
from protocol.weights import Rows

log = logging.getLogger(__name__)

WATCH_S = 0.5
"""How often the actor looks whether the child lives while requests wait on it, and the child whether its
actor does."""

LOOK_S = 0.02
"""How often each side reads its socket without a signal: measured, a message now and then comes in
without the socket's descriptor turning readable (the child saw requests wait for a look ~8 times in a
demo run, and without the look one such wait hung the run). The child also reads after every step."""



_SETTINGS = tuple(f.name for f in dataclasses.fields(SamplingSettings))


def _pack_settings(s: SamplingSettings) -> list:
    """Every field of ``s``, in field order (a field added to ``SamplingSettings`` travels too)."""
    return [getattr(s, name) for name in _SETTINGS]


def _unpack_settings(v: list) -> SamplingSettings:
    fields = dict(zip(_SETTINGS, v, strict=True))
    fields["stop_token_ids"] = tuple(fields["stop_token_ids"])  # msgpack returns lists
    return SamplingSettings(**fields)


def _error(kind: str, text: str) -> Exception:
    """The child's exception, on the actor's side: a ``ValueError`` stays one, anything else a ``RuntimeError``."""
    return ValueError(text) if kind == "ValueError" else RuntimeError(f"HF engine process: {kind}: {text}")


class HFProcessEngine(Engine):
    """``HFEngine`` served from a child process (module doc); takes ``HFEngine``'s arguments."""

    def __init__(
        self, model_path: str, device: str = "cpu", max_batch: int = 256, seed: int = 0, dtype: torch.dtype | None = None,
        lora: tuple[int, int, list[str] | str] | None = None, parked_rows: int = 64, swap_timeout_s: float = 600.0,
        driver: str | None = None, start_timeout_s: float = 300.0,
    ):
        """``start_timeout_s``: how long to wait for the child to load the model and serve."""
        self.swap_timeout_s = swap_timeout_s
        self._dir = tempfile.mkdtemp(prefix="relay-hf-")  # 0700: no other user reaches the sockets
        req_ep, ctl_ep = f"ipc://{self._dir}/req", f"ipc://{self._dir}/ctl"
        if len(req_ep) > 100:  # the kernel's limit on a socket path is ~107 bytes
            shutil.rmtree(self._dir, ignore_errors=True)
            raise ValueError(f"HF engine process: the temporary directory {self._dir} makes socket paths too long; set TMPDIR shorter")
        spec = {
            "model_path": str(model_path), "device": device, "max_batch": max_batch, "seed": seed,
            "dtype": None if dtype is None else str(dtype).removeprefix("torch."), "lora": list(lora) if lora else None,
            "parked_rows": parked_rows, "swap_timeout_s": swap_timeout_s, "driver": driver,
            "threads": torch.get_num_threads(), "req": req_ep, "ctl": ctl_ep,
        }
        self._ctx = zmq.Context()
        self._req = self._ctx.socket(zmq.PAIR)
        self._ctl = self._ctx.socket(zmq.PAIR)
        for sock, ep in ((self._req, req_ep), (self._ctl, ctl_ep)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)  # requests and weights are bounded by the caller, never dropped
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.connect(ep)
        root = str(Path(__file__).resolve().parents[2])  # the child imports this package wherever the actor runs
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self.proc = subprocess.Popen([sys.executable, "-m", "actors.engines.hf_process", json.dumps(spec)], env=env)
        """The child process serving the engine."""
        self._ctl_lock = threading.Lock()  # one control exchange (a weight update, close) at a time
        self._reaper = weakref.finalize(self, _reap, self.proc, self._ctx, self._ctl, self._ctl_lock, self._dir)
        self.version = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = 0
        self._outbox: list = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watching = False
        self._looking = False
        self._dead: str | None = None  # why no request is served any more
        self._load_seq = 0
        self.loading = threading.Lock()
        try:
            ready = self._ctl_reply(start_timeout_s, "to start and load the model")
        except BaseException:
            self._reaper()
            raise
        if ready[0] != "ready":
            self._reaper()
            raise RuntimeError(f"HF engine process: expected ready, got {ready[0]!r}")
        _, self.vocab_size, self.driver, self.device = ready
        log.info("HF engine process %d serves %s (%s driver, %s)", self.proc.pid, model_path, self.driver, self.device)

    # -- requests (the actor's event loop) -----------------------------------------------------

    async def generate(self, prompt_ids: list[int], settings: SamplingSettings) -> Generation:
        return await self.submit(prompt_ids, settings)

    def submit(self, prompt_ids: list[int], settings: SamplingSettings) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        if self._dead is None and self.proc.poll() is not None:
            self._die(f"HF engine process {self.proc.pid} exited with code {self.proc.returncode}")
        if self._dead is not None:
            raise RuntimeError(self._dead)
        if loop is not self._loop:
            self._attach(loop)
        fut = loop.create_future()
        rid = self._next_id
        self._next_id += 1
        self._pending[rid] = fut
        if not self._outbox:
            loop.call_soon(self._send_requests)
        self._outbox.append((rid, list(prompt_ids), _pack_settings(settings)))
        if not self._watching:
            self._watching = True
            loop.call_later(WATCH_S, self._watch)
        if not self._looking:
            self._looking = True
            loop.call_later(LOOK_S, self._look)
        return fut

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve the requests of ``loop`` from now on; one event loop at a time (a stopped one's requests fail)."""
        old = self._loop
        if old is not None and old.is_running():
            raise RuntimeError("HF engine process: another event loop is running requests on this engine")
        if old is not None and not old.is_closed():
            old.remove_reader(self._req.FD)
        self._fail_pending(RuntimeError("HF engine process: the event loop that made this request stopped"))
        self._outbox = []
        self._loop = loop
        self._watching = self._looking = False
        loop.add_reader(self._req.FD, self._receive)

    def _send_requests(self) -> None:
        batch, self._outbox = self._outbox, []
        if batch and self._dead is None:
            self._req.send(msgpack.packb(batch), zmq.NOBLOCK)  # no high-water mark: never blocks
            if self._req.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # a send can take the descriptor's signal of a result
                self._loop.call_soon(self._receive)

    def _receive(self) -> None:
        """The results that arrived: drained until none is left (the socket's descriptor signals that
        something changed, once, and is reset by any operation on the socket, a send included)."""
        while True:
            try:
                body = self._req.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            for rid, ok, payload in msgpack.unpackb(body):
                fut = self._pending.pop(rid, None)
                if fut is None or fut.done():  # cancelled by its caller meanwhile
                    continue
                if ok:
                    ids, lps, finish, version, extra = payload
                    fut.set_result(Generation(ids, lps, finish, version, extra))
                else:
                    fut.set_exception(_error(*payload))

    def _look(self) -> None:
        """While requests wait: a result that came without a signal is read within ``LOOK_S``."""
        if self._pending and self._dead is None and self._loop is not None:
            if self._req.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._receive()
            self._loop.call_later(LOOK_S, self._look)
        else:
            self._looking = False

    def _watch(self) -> None:
        """While requests wait: does the child still live?"""
        if self._dead is None and self.proc.poll() is not None:
            self._die(f"HF engine process {self.proc.pid} exited with code {self.proc.returncode} "
                      f"with {len(self._pending)} request(s) waiting (its log is above)")
        if self._pending and self._dead is None and self._loop is not None:
            self._loop.call_later(WATCH_S, self._watch)
        else:
            self._watching = False

    def _die(self, why: str) -> None:
        self._dead = why
        log.error("%s", why)
        self._fail_pending(RuntimeError(why))

    def _fail_pending(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done() and not fut.get_loop().is_closed():
                fut.set_exception(exc)

    # -- control (any thread) ------------------------------------------------------------------

    def _ctl_reply(self, timeout_s: float, what: str) -> list:
        """The child's next control reply; raises when it dies or says nothing within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self._ctl.poll(int(WATCH_S * 1000)):
            rc = self.proc.poll()
            if rc is not None:
                self._dead = f"HF engine process {self.proc.pid} exited with code {rc} (its log is above)"
                raise RuntimeError(f"{self._dead} while waiting for it {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"HF engine process {self.proc.pid}: nothing within {timeout_s:.0f}s while waiting for it {what}")
        return msgpack.unpackb(self._ctl.recv())

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, adopt: bool = False) -> None:
        """Stream the tensors to the child, which stages them and swaps at the end (``HFEngine.load_weights``);
        raises what the child's engine raised (the served weights unchanged), or what the stream raised."""
        with self.loading, self._ctl_lock:
            if self._dead is not None:
                raise RuntimeError(self._dead)
            self._load_seq += 1
            seq = self._load_seq
            self._ctl.send(msgpack.packb(["load", seq, version]))
            try:
                for name, t in named_tensors:
                    piece = t if isinstance(t, Rows) else None
                    data = (piece.data if piece is not None else t).detach().cpu().contiguous()
                    head = ["t", seq, name, str(data.dtype).removeprefix("torch."), list(data.shape),
                            piece.start if piece is not None else None, list(piece.shape) if piece is not None else None]
                    self._ctl.send_multipart([msgpack.packb(head), data.reshape(-1).view(torch.uint8).numpy()], copy=False)
            except BaseException as e:
                self._ctl.send(msgpack.packb(["abort", seq, f"{type(e).__name__}: {e}"]))
                self._ctl_reply(self.swap_timeout_s + 60, f"to drop weights v{version}")
                raise
            self._ctl.send(msgpack.packb(["end", seq]))
            reply = self._ctl_reply(self.swap_timeout_s + 60, f"to swap in weights v{version}")
        if reply[0] == "failed":
            raise _error(reply[2], reply[3])
        self.version = reply[2]

    async def close(self) -> None:
        """Stop the child; requests still waiting fail with ``RuntimeError``."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._req.FD)
        self._loop = None
        self._fail_pending(RuntimeError("HF engine closed"))
        if self._dead is None:
            self._dead = "HF engine closed"
        await asyncio.to_thread(self._reaper)


def _reap(proc: subprocess.Popen, ctx: zmq.Context, ctl: zmq.Socket, ctl_lock: threading.Lock, where: str) -> None:
    """Ask the child to stop (``close``), terminate it after 10 s, kill it after 10 more; free the sockets
    and their directory. Also what runs when an engine is dropped without ``close``."""
    if proc.poll() is None:
        if ctl_lock.acquire(timeout=1.0):  # a weight update still streaming: no close over its socket
            try:
                ctl.send(msgpack.packb(["close"]), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            finally:
                ctl_lock.release()
        for stop in (None, proc.terminate, proc.kill):
            if stop is not None:
                stop()
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
    ctx.destroy(linger=0)
    shutil.rmtree(where, ignore_errors=True)


# ------------------------------------------------------------------------------- the child


def _serve(spec: dict) -> int:
    from actors.engines.hf_engine import HFEngine

    torch.set_num_threads(spec["threads"])
    parent = os.getppid()
    dtype = getattr(torch, spec["dtype"]) if spec["dtype"] else None
    lora = tuple(spec["lora"]) if spec["lora"] else None
    ctx = zmq.Context()
    req, ctl = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    for sock, ep in ((req, spec["req"]), (ctl, spec["ctl"])):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.bind(ep)
    engine = HFEngine(spec["model_path"], device=spec["device"], max_batch=spec["max_batch"], seed=spec["seed"], dtype=dtype,
                      lora=lora, parked_rows=spec["parked_rows"], swap_timeout_s=spec["swap_timeout_s"], driver=spec["driver"])
    gc.collect()  # torch's, transformers' and the model's objects live as long as the process: not scanned again
    gc.freeze()
    ctl.send(msgpack.packb(["ready", engine.vocab_size, engine.driver, str(engine.device)]))
    ctl_lock = threading.Lock()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        outbox: list = []

        def flush() -> None:
            if outbox:
                req.send(msgpack.packb(outbox), zmq.NOBLOCK)
                outbox.clear()
                if req.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # a send can take the descriptor's signal of a request
                    loop.call_soon(receive)

        def finished(rid: int, fut: asyncio.Future) -> None:
            if not outbox:
                loop.call_soon(flush)  # the thread driver (the loop driver flushes after each step)
            if fut.cancelled():
                outbox.append((rid, False, ["RuntimeError", "cancelled"]))
            elif fut.exception() is not None:
                e = fut.exception()
                outbox.append((rid, False, [type(e).__name__, str(e)]))
            else:
                g = fut.result()
                outbox.append((rid, True, [g.token_ids, g.logprobs, g.finish_reason, g.version, g.extra]))

        def receive() -> None:
            while True:
                try:
                    body = req.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return
                for rid, prompt, settings in msgpack.unpackb(body):
                    try:
                        fut = engine.submit(prompt, _unpack_settings(settings))
                    except Exception as e:  # a bad request fails alone
                        outbox.append((rid, False, [type(e).__name__, str(e)]))
                        loop.call_soon(flush)
                        continue
                    fut.add_done_callback(lambda f, rid=rid: finished(rid, f))

        def control() -> None:  # a thread: weight updates stage while the loop's requests run
            try:
                _control(engine, ctl, ctl_lock, parent, spec["swap_timeout_s"])
            finally:
                loop.call_soon_threadsafe(lambda: stop.done() or stop.set_result(None))

        def step_done() -> None:  # the step's results out, the requests that came in
            flush()
            if req.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                receive()

        def look() -> None:  # idle: what came without a signal is read within LOOK_S
            if req.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                receive()
            loop.call_later(LOOK_S, look)

        engine.after_step = step_done
        loop.call_later(LOOK_S, look)

        loop.add_reader(req.FD, receive)
        receive()  # what came before the reader was added
        threading.Thread(target=control, name="hf-process-control", daemon=True).start()
        await stop
        await engine.close()
        flush()

    asyncio.run(serve())
    ctx.destroy(linger=0)
    return 0


def _control(engine, ctl: zmq.Socket, ctl_lock: threading.Lock, parent: int, stall_s: float) -> None:
    """The control socket, until ``close`` or the actor's death."""
    while True:
        if not ctl.poll(int(WATCH_S * 1000)):
            if os.getppid() != parent:
                log.error("HF engine process: its actor (pid %d) is gone; exiting", parent)
                return
            continue
        msg = msgpack.unpackb(ctl.recv())
        if msg[0] == "close":
            return
        if msg[0] != "load":
            continue  # a stray piece of an update already answered
        _, seq, version = msg
        try:
            engine.load_weights(_tensors(ctl, seq, parent, stall_s), version)
            reply = ["loaded", seq, engine.version]
        except Exception as e:
            reply = ["failed", seq, type(e).__name__, str(e)]
        ctl.send(msgpack.packb(reply))


class _Aborted(Exception):
    pass


def _tensors(ctl: zmq.Socket, seq: int, parent: int, stall_s: float):
    """The streamed tensors of update ``seq``, as they arrive, until ``end`` (``abort`` raises)."""
    last = time.monotonic()
    while True:
        if not ctl.poll(int(WATCH_S * 1000)):
            if os.getppid() != parent:
                raise _Aborted("the actor is gone")
            if time.monotonic() - last > stall_s:
                raise ValueError(f"weights stream stalled: nothing for {stall_s:.0f}s")
            continue
        last = time.monotonic()
        frames = ctl.recv_multipart(copy=False)
        head = msgpack.unpackb(frames[0].bytes)
        if head[1] != seq:
            continue
        if head[0] == "end":
            return
        if head[0] == "abort":
            raise ValueError(f"the actor's weight stream failed: {head[2]}")
        _, _, name, dtype, shape, start, whole = head
        dt = getattr(torch, dtype)
        buf = frames[1].buffer
        if buf.nbytes == 0:
            t = torch.empty(shape, dtype=dt)
        else:
            with warnings.catch_warnings():  # read-only: the engine copies it into its standby parameters
                warnings.simplefilter("ignore", UserWarning)
                t = torch.frombuffer(buf, dtype=torch.uint8).view(dt).reshape(shape)
        yield name, (Rows(t, start, tuple(whole)) if whole is not None else t)


def main() -> int:
    ap = argparse.ArgumentParser(description="Serve an HF engine for the actor that started this process.")
    ap.add_argument("spec", help="the engine's arguments and socket addresses, as JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s hf-engine %(levelname)s %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the launcher's stall watchdog asks for our stacks
    return _serve(json.loads(args.spec))


if __name__ == "__main__":
    sys.exit(main())
