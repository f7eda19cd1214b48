"""A transformers engine: continuous batching over a slot KV cache.

For tests and tiny models (on 2 CPU cores it beats vLLM-CPU on a 0.5M-param
model). Steps run back to back while requests run; between two steps the
engine admits whatever arrived and retires every row that finished, so a turn
that arrives while others decode starts at the next step instead of waiting
for the batch's longest member (continuous, not static, batching). A step is
one forward of every running row's uncached tokens packed into one sequence:
one token per decoding row plus the new part of each newcomer's prompt (its
prefill), so admitting costs no forward of its own; a registered attention
(``slot_attention``) attends each row to its own slot. Requests asking for
the same prompt in one round share one prefill.

Who runs the steps (``driver``):
- ``loop`` (the default on a CPU for a model of at most ``LOOP_MAX_PARAMS``
  parameters, whose step takes milliseconds): the event loop of the requests,
  one step per loop iteration. A finished row's future is resolved in place, so the
  episode's next turn (its tool call, its tokens) runs before the next step
  and is admitted at it. Nothing runs in parallel with a step; nothing competes
  with it either: with a worker thread, the episode loop's Python and the
  engine's take turns on the GIL at every op the engine releases it for: on
  this machine, traced in ``bench/bench_actor.py``, steps with few rows took
  1.5 ms in the bare engine and 3.0 ms beside the actor loop (1.6 ms on the
  loop), and 0.1 ms of busy work per turn added to a replay of the same turns
  cost it 2.5 times that. Tool calls and sockets are served between steps.
  One event loop at a time serves requests.
- ``thread`` (the default on a GPU, where a step's kernels run while the loop
  works, and for a larger model on a CPU, whose steps are long enough to delay
  heartbeats and tool calls and whose Python is a small share of a step):
  ``generate`` calls made in one event-loop tick are handed together to
  a worker thread that runs the steps; the event loop keeps serving tool calls
  meanwhile.

Models: decoder-only transformers whose attention goes through transformers'
``AttentionInterface`` and ``Cache.update`` (the Llama/Qwen families, with or
without GQA); sliding-window layers are refused.

The KV cache is static: one ``[2 * layers, slots, kv_heads, length, head_dim]``
buffer, never freed; on a CPU it reserves room for ``max_batch + parked_rows``
rows of the model's context at once, and the OS commits only the pages that are
used (``_zeros``), so it never grows by copying (where that room would exceed a
quarter of the memory, and on a GPU, it grows when a request needs more). A row that finishes stays
*parked* in its slot until a new row needs the slot (least recently used
first): a later request whose prompt starts with that row's tokens (the next
turn of the same episode) continues in that slot, where it is, and prefills
only the new tokens. New rows take the lowest free slots, and at each step the
running rows in the highest slots move down into slots whose parked row's next
turn has not come within two steps (``_compact``), so a decode step reads the
running rows as one view of the first slots; rows between two turns, back
sooner, never move. Parked rows are dropped when the weights change.

Log-probs are ``log_softmax(logits / T)`` of the sampled token (``T = 1`` for
greedy), before top-k/top-p truncation: what the learner recomputes. A
request's tokens do not depend on what else runs with it beyond float rounding
(~1e-6 in the log-probs): a request with ``SamplingSettings.seed`` samples
from its own generator, so it draws the same tokens alone or in a batch;
requests without one share the engine's generator.

Weight updates are staged. ``load_weights`` consumes a stream of tensors
(bucket by bucket, as the receiver verifies them) and copies each into a
*standby* copy of the parameters (a tensor larger than a bucket arrives as row
pieces, ``protocol.weights.Rows``: each is copied into its rows, in order, and
the tensor counts as received once its last row did) while requests keep running on the served
copy; only when the stream ended, complete, does it swap the two under the
batch lock (a pointer swap per parameter, microseconds). The worker holds that
lock while any request runs; a swap that waits for it stops admission, the
running rows finish, the swap happens, admission resumes: every request is
sampled by one version. A stream that fails (a bucket with a bad checksum, a
truncated version, a tensor that does not fit) raises before the swap: the
served weights and version are untouched. The standby copy (one model in the
serve dtype) is allocated at the first update and reused, so an update adds
only the receive window to the process.

LoRA: built with ``lora=(rank, alpha, target_modules)`` (the learner's
settings), the engine wraps its model with peft's adapters (B = 0, so version
0 is the base model) and takes updates that hold only the adapter tensors
(``lora_A``/``lora_B``, peft names): only they are staged and swapped.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from transformers.cache_utils import Cache

from actors.engines.base import Engine, Generation, SamplingSettings
from protocol.weights import Rows, place

DRIVERS = ("loop", "thread")
"""Who runs the steps: the requests' event loop, or a worker thread (module doc)."""

LOOP_MAX_PARAMS = 50_000_000
"""The largest model whose steps run on the event loop by default on a CPU: the tiny demo model
(0.5M parameters) steps in 1.5-100 ms here; a 0.5B model's steps take seconds, too long to hold the loop
(heartbeats, tool calls), and its Python is a small share of each."""

SWAP_POLL_S = 0.001
"""How often the loop driver looks again while a weight swap holds or wants the batch lock."""

IDLE_EXIT_S = 10.0
"""A worker thread with nothing queued, running or to stop for this long exits (the next request
starts another): an engine dropped without ``close`` is then freed, its KV cache with it."""


class HFEngine(Engine):
    def __init__(
        self, model_path: str, device: str = "cpu", max_batch: int = 256, seed: int = 0, dtype: torch.dtype | None = None,
        lora: tuple[int, int, list[str] | str] | None = None, parked_rows: int = 64, swap_timeout_s: float = 600.0,
        driver: str | None = None,
    ):
        """``dtype``: what the engine serves (None = bf16 on a GPU, fp32 on CPU); ``lora``:
        ``(rank, alpha, target_modules)`` to serve LoRA adapters on top of the base model;
        ``max_batch``: most rows decoded together; ``parked_rows``: slots beyond ``max_batch`` for
        finished rows kept for their prefix (a finished row stays parked until a new row needs its
        slot: all of an actor's episodes between two turns keep theirs, however many there are; 0: none
        kept); ``swap_timeout_s``: how long a weight swap waits for the running requests; ``driver``:
        ``loop`` | ``thread``, who runs the steps (module doc; None: ``loop`` on a CPU for a model of at most
        ``LOOP_MAX_PARAMS`` parameters, else ``thread``)."""
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        if driver not in (None, *DRIVERS):
            raise ValueError(f"HF engine: driver must be one of {DRIVERS}, got {driver!r}")
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=_register_slot_attention())
        if "sliding_attention" in (model.config.layer_types or []):
            raise ValueError(f"{model_path}: sliding-window attention layers are not supported by the HF engine (use vLLM)")
        if lora is not None and lora[0] > 0:
            from peft import LoraConfig, get_peft_model

            rank, alpha, targets = lora
            model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none"))
        self.lora = lora if lora is not None and lora[0] > 0 else None
        self.model = model.to(self.device).eval()
        if driver is None:
            small = sum(p.numel() for p in self.model.parameters()) <= LOOP_MAX_PARAMS
            driver = "loop" if self.device.type == "cpu" and small else "thread"
        self.driver = driver
        self.pad_id = self.model.config.pad_token_id or 0
        self.vocab_size = self.model.config.vocab_size
        self.max_batch = max_batch
        self.parked_rows = parked_rows
        self.version = 0
        self._gen = torch.Generator(device=self.device).manual_seed(seed)
        self._lock = _SwapGate(swap_timeout_s)  # a running request and a weight swap never overlap
        self.batches = 0
        """Admission rounds: requests made in one event-loop tick are admitted in one."""
        self.steps = 0
        """Steps: one forward each over every running row's uncached tokens. A ``Generation``'s
        ``extra`` says which steps sampled its first and last token (``first_step``, ``last_step``)."""
        self.prefix_hits = 0
        """Requests that took over a parked row's cached prefix."""
        self._ticks: dict[asyncio.AbstractEventLoop, list[_Request]] = {}
        self._cond = threading.Condition()  # guards _queue and _stopping
        self._queue: list[_Request] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._held = False  # the loop driver holds the swap gate (the worker thread keeps its own)
        self._driver_loop: asyncio.AbstractEventLoop | None = None  # the loop a ``_drive`` round is due on
        self._kv = SlotCache(self.device, self.model.config.num_hidden_layers, max_batch + parked_rows,
                             getattr(self.model.config, "max_position_embeddings", None))
        self._kv_version = 0  # the weights the parked rows' KV was computed with
        self._rows: list[_Row] = []  # running rows, each in its own slot
        self._parked: OrderedDict[int, _Parked] = OrderedDict()  # by id, least recently used first
        self._owner: list[_Row | _Parked | None] = []  # what each slot holds
        self._standby: dict[frozenset, dict[str, torch.Tensor]] = {}
        self.loading = threading.Lock()  # one update at a time
        self.after_step: Callable[[], None] | None = None
        """The loop driver calls this on the event loop after each step, once the callbacks of the
        requests that step finished have run and before the next step (``hf_process`` sends the
        step's results there)."""

    async def generate(self, prompt_ids: list[int], settings: SamplingSettings) -> Generation:
        return await self.submit(prompt_ids, settings)

    def submit(self, prompt_ids: list[int], settings: SamplingSettings) -> asyncio.Future:
        """``generate`` without the coroutine: the future of its ``Generation``, on the running event
        loop (a process serving the engine submits many requests at once, without a task for each)."""
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("generate: the prompt holds no token ids")
        if settings.max_tokens < 1:
            raise ValueError(f"generate: max_tokens must be >= 1, got {settings.max_tokens}")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"generate: prompt ids must lie in [0, {self.vocab_size}), got {min(prompt)}..{max(prompt)}")
        loop = asyncio.get_running_loop()
        req = _Request(prompt, settings, loop.create_future())
        if self.driver == "loop":
            if self._driver_loop is not loop:
                self._adopt(loop)  # refuses a second running loop before anything is queued
                self._driver_loop = loop
                loop.call_soon(self._drive, loop)
            self._queue.append(req)
            return req.fut
        tick = self._ticks.get(loop)
        if tick is None:  # the first request of this tick: hand the tick's requests over once it ends
            tick = self._ticks[loop] = []
            loop.call_soon(self._hand_over, loop)
        tick.append(req)
        return req.fut

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        reqs = self._ticks.pop(loop, [])
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._work, name="hf-engine", daemon=True)
                self._thread.start()
            self._queue.extend(reqs)
            self._cond.notify()

    async def close(self) -> None:
        """Stop the worker; requests still queued or running fail with ``RuntimeError``."""
        if self.driver == "loop":
            self._driver_loop = None
            self._shut(RuntimeError("HF engine closed"))
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, 60.0)
            if thread.is_alive():
                raise RuntimeError("HF engine: the worker did not stop within 60 s of close()")
        self._thread = None

    # -- the loop driver -----------------------------------------------------------------------

    def _drive(self, loop: asyncio.AbstractEventLoop) -> None:
        """One round on the event loop: admit what is queued (unless a weight swap waits), one step; the
        next round is scheduled behind the callbacks the step's finished rows woke, so their next turns
        are queued by then. Holds the swap gate while rows run; without rows it lets it go. Anything that
        escapes a round fails the requests with it and ends the rounds: never a request left unserved."""
        if self._driver_loop is not loop:  # superseded (closed, or another loop took over)
            return
        try:
            self._drive_round(loop)
        except BaseException as e:
            self._driver_loop = None
            self._shut(e if isinstance(e, Exception) else RuntimeError(f"HF engine: {type(e).__name__} in a step"))
            if not isinstance(e, Exception):
                raise

    def _drive_round(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._held and not self._rows and self._lock.swap_waiting:
            self._release()  # drained: let the swap happen
        if not self._held:
            if not self._lock.try_acquire_for_requests():  # a swap holds or wants the gate: a swap takes microseconds
                loop.call_later(SWAP_POLL_S, self._drive, loop)
                return
            self._held = True
            self._drop_stale_prefixes()
        room = 0 if self._lock.swap_waiting else self.max_batch - len(self._rows)
        newcomers, self._queue = self._queue[:room], self._queue[room:]  # from here on _round answers for them
        self._round(newcomers)
        if self.after_step is not None:  # behind the callbacks of the step's finished requests, before the next step
            loop.call_soon(self.after_step)
        if self._rows or self._queue:
            loop.call_soon(self._drive, loop)
        else:
            self._release()
            self._driver_loop = None

    def _adopt(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Before ``loop`` drives (or a swap, ``None``): requests left by an event loop that stopped with them
        running (closed before they were done or cancelled) are failed and their rows dropped; a loop still
        running elsewhere cannot share the engine (``RuntimeError``)."""
        old = self._driver_loop
        if old is None:
            return
        if old.is_running() and not old.is_closed():
            raise RuntimeError("HF engine (driver=loop): another event loop is running requests; "
                               "one loop at a time, or driver='thread'")
        self._shut(RuntimeError("HF engine: the event loop of this request stopped"), keep_queue_of=loop)

    def _release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()

    def _shut(self, exc: BaseException, keep_queue_of: asyncio.AbstractEventLoop | None = None) -> None:
        """Fail the queued requests (but those of ``keep_queue_of``) and the running ones with ``exc``; free
        their slots and the swap gate (the parked rows stay)."""
        queued = [r for r in self._queue if r.fut.get_loop() is not keep_queue_of]
        self._queue = [r for r in self._queue if r.fut.get_loop() is keep_queue_of]
        for r in queued + [row.req for row in self._rows]:
            _resolve(r, exc=exc)
        for row in self._rows:
            self._owner[row.slot] = None
        self._rows = []
        self._release()

    # -- the worker thread ---------------------------------------------------------------------

    def _work(self) -> None:
        held = False  # the worker holds the swap gate while it has running rows
        retired = False  # idle too long: exits without failing anything (the next request starts a worker)
        try:
            while True:
                with self._cond:
                    idle_since = time.monotonic()
                    while not self._queue and not self._rows and not self._stopping:
                        if held:
                            self._lock.release()
                            held = False
                        if time.monotonic() - idle_since > IDLE_EXIT_S and self._thread is threading.current_thread():
                            self._thread = None  # under the lock: _hand_over now starts a new worker
                            retired = True
                            return
                        self._cond.wait(timeout=1.0)
                    if self._stopping:
                        break
                    newcomers: list[_Request] = []
                    if not self._lock.swap_waiting:
                        room = self.max_batch - len(self._rows)
                        newcomers, self._queue = self._queue[:room], self._queue[room:]
                if held and not self._rows and self._lock.swap_waiting:
                    self._lock.release()  # drained: let the swap happen
                    held = False
                if not held:
                    if not self._lock.acquire_for_requests(lambda: self._stopping):
                        with self._cond:  # stopping: the finally below fails them with the rest of the queue
                            self._queue[:0] = newcomers
                        continue
                    held = True
                    self._drop_stale_prefixes()
                self._round(newcomers)
        finally:
            if held:
                self._lock.release()
            if retired:
                return  # nothing ran or waited on this worker
            with self._cond:
                self._shut(RuntimeError("HF engine closed"))

    # -- what both drivers run -----------------------------------------------------------------

    def _drop_stale_prefixes(self) -> None:
        """Just after taking the batch lock: new weights make the parked prefixes' KV stale."""
        if self.version != self._kv_version:
            for p in list(self._parked.values()):
                self._drop_parked(p)
            self._kv_version = self.version

    def _round(self, newcomers: list[_Request]) -> None:
        """One step, admitting ``newcomers`` (those still awaited)."""
        try:
            self._step([r for r in newcomers if not r.fut.done()])
        except Exception as e:  # not a forward's failure (those fail only their rows): fail everything, keep serving
            self._fail_all(e, newcomers)

    def _fail_all(self, e: BaseException, newcomers: list[_Request]) -> None:
        for r in newcomers + [row.req for row in self._rows]:
            _resolve(r, exc=e)
        self._rows, self._parked = [], OrderedDict()
        self._owner = [None] * len(self._owner)

    @torch.no_grad()
    def _step(self, newcomers: list[_Request]) -> None:
        """One forward over every running row's uncached tokens: one for each decoding row, the new part of
        each newcomer's prompt (its prefill); then one token sampled per row."""
        for row in [r for r in self._rows if r.req.fut.done()]:  # cancelled by the caller: stop sampling for it
            self._retire(row)
        self._compact()
        decoding = sorted(self._rows, key=lambda r: r.slot)  # each feeds the token it sampled last
        leaders, siblings = self._admit(newcomers) if newcomers else ([], [])
        rows = decoding + leaders
        if not rows:
            return
        try:
            logits = self._forward(decoding, leaders)
        except Exception as e:  # fail these requests, keep serving
            for row in rows + [row for row, _, _ in siblings]:
                self._retire(row, exc=e, park=False)
            return
        for row, j, start in siblings:  # same prompt as leader j: its KV is copied, its first token sampled apart
            self._kv.copy(leaders[j].slot, row.slot, row.cached, start)
        if siblings:
            pick = torch.tensor(list(range(len(rows))) + [len(decoding) + j for _, j, _ in siblings], device=logits.device)
            rows, logits = rows + [row for row, _, _ in siblings], logits[pick]
        self._sample_into(rows, logits)

    def _admit(self, reqs: list[_Request]) -> tuple[list[_Row], list[tuple[_Row, int, int]]]:
        """Give each request a slot: first the leaders, longest uncached part first (each takes over, in
        place, the parked row holding the longest prefix of its prompt, if one does; the others take free
        slots); then the siblings, requests whose prompt equals leader ``j``'s: each continues in a parked
        row holding a prefix of its prompt (a GRPO chain's own previous turn, when the chains called the
        same tool alike) or takes a free slot, and gets a copy of the leader's KV past that prefix instead
        of a prefill of its own. Returns the leaders and ``(sibling, j, first position copied)``."""
        firsts: list[tuple[_Request, _Parked | None]] = []
        by_prompt: dict[tuple[int, ...], _Request] = {}
        later: list[tuple[_Request, _Request]] = []
        for req in reqs:
            key = tuple(req.prompt)
            if key in by_prompt:
                later.append((req, by_prompt[key]))
                continue
            by_prompt[key] = req
            parked = self._longest_parked_prefix(req.prompt)
            if parked is not None:
                self._parked.pop(id(parked))  # claimed: no longer evictable, still the owner of its slot
            firsts.append((req, parked))
        firsts.sort(key=lambda rp: -(len(rp[0].prompt) - (rp[1].length if rp[1] else 0)))
        leaders: list[_Row] = []
        index: dict[int, int] = {}
        for req, parked in firsts:
            if parked is not None:
                self.prefix_hits += 1  # its KV stays where it is: the row continues in the parked row's slot
            index[id(req)] = len(leaders)
            leaders.append(self._new_row(req, parked.length if parked else 0, parked.slot if parked else self._free_slot()))
        siblings = []
        for req, first in later:  # one holding a prefix of its prompt parked (its own last turn) continues there
            parked = self._longest_parked_prefix(req.prompt)
            if parked is not None:
                self._parked.pop(id(parked))
                self.prefix_hits += 1
            slot = parked.slot if parked else self._free_slot()
            siblings.append((self._new_row(req, len(req.prompt), slot), index[id(first)], parked.length if parked else 0))
        self.batches += 1
        rows = leaders + [r for r, _, _ in siblings]
        need_len = max(max(len(r.tokens) + r.req.settings.max_tokens for r in rows),
                       max(r.cached for r in leaders) + max(len(r.tokens) - r.cached for r in leaders))
        self._kv.reserve(len(self._owner), need_len)
        return leaders, siblings

    def _new_row(self, req: _Request, cached: int, slot: int) -> _Row:
        row = _Row(req, tokens=list(req.prompt), cached=cached, slot=slot, gen=_generator(req.settings, self.device))
        self._owner[slot] = row
        self._rows.append(row)
        return row

    def _longest_parked_prefix(self, prompt: list[int]) -> _Parked | None:
        best = None
        for p in self._parked.values():
            n = p.length
            if n < len(prompt) and (best is None or n > best.length) and prompt[n - 1] == p.tokens[-1] and prompt[:n] == p.tokens:
                best = p
        return best

    def _compact(self, patience: int = 2) -> None:
        """Move the running rows in the highest slots down into the lowest slots that hold no running row:
        empty ones, or parked ones whose next turn has not come within ``patience`` steps (those move up
        in exchange; an episode between two turns is back sooner, so its row never moves). The decode step
        then reads the running rows' slots as one view."""
        if not self._rows:
            return
        running = sorted(self._rows, key=lambda r: r.slot)
        holes = (i for i, o in enumerate(self._owner[: running[-1].slot])
                 if o is None or isinstance(o, _Parked) and self.steps - o.since >= patience)
        for hole in holes:
            if hole >= running[-1].slot:
                break
            row = running.pop()
            self._swap_slots(row.slot, hole)
            running.insert(0, row)  # below every slot still to be filled

    def _swap_slots(self, a: int, b: int) -> None:
        """Exchange what slots ``a`` and ``b`` hold, KV included."""
        oa, ob = self._owner[a], self._owner[b]
        width = max(o.length if isinstance(o, _Parked) else o.cached if isinstance(o, _Row) else 0 for o in (oa, ob))
        self._kv.swap(a, b, width)
        self._owner[a], self._owner[b] = ob, oa
        for o, slot in ((ob, a), (oa, b)):
            if o is not None:
                o.slot = slot

    def _free_slot(self) -> int:
        """A slot for a new row: the lowest empty one; else a new one while there are fewer than
        ``max_batch + parked_rows``; else the least recently used parked row's (dropped). Nothing moves."""
        for i, o in enumerate(self._owner):
            if o is None:
                return i
        if self._parked and len(self._owner) >= self.max_batch + self.parked_rows:
            lru = next(iter(self._parked.values()))
            self._drop_parked(lru)
            return lru.slot
        self._owner.append(None)  # the buffer grows in _admit, once for all the round's new slots
        return len(self._owner) - 1

    def _drop_parked(self, p: _Parked) -> None:
        self._parked.pop(id(p), None)
        self._owner[p.slot] = None

    def _retire(self, row: _Row, exc: BaseException | None = None, park: bool = True) -> None:
        """Take a row out of the running set; its KV stays in its slot, parked."""
        self._rows.remove(row)
        park = park and exc is None and self.parked_rows > 0 and row.cached > 0
        self._owner[row.slot] = None
        if exc is not None:
            _resolve(row.req, exc=exc)
            return
        steps = {"first_step": row.first_step, "last_step": self.steps}  # the steps that sampled its first and last token
        _resolve(row.req, result=Generation(row.out_ids, row.out_lp, row.finish, self.version, extra=steps))
        if park:
            p = _Parked(tokens=row.tokens[: row.cached], slot=row.slot, since=self.steps)
            self._owner[row.slot] = p
            self._parked[id(p)] = p  # until a new row needs the slot (_free_slot)

    def _forward(self, decoding: list[_Row], leaders: list[_Row]) -> torch.Tensor:
        """Forward the uncached tokens of the ``decoding`` rows (in slot order, one token each) and of the
        newcomers ``leaders``, packed into one sequence. Returns logits[len(decoding) + len(leaders), V]
        at each row's last token."""
        self.steps += 1
        n_dec = len(decoding)
        rows = decoding + leaders
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        last: list[int] = []
        for r in rows:
            new = r.tokens[r.cached :]
            ids += new
            pos += range(r.cached, len(r.tokens))
            slots += [r.slot] * len(new)
            last.append(len(ids) - 1)
        dev = self.device
        pos_t = torch.tensor(pos, device=dev)
        plan = SlotPlan(slot_idx=torch.tensor(slots, device=dev), pos_idx=pos_t, n_dec=n_dec)
        if n_dec:
            plan.dec_width = max(pos[:n_dec]) + 1
            dec_pos = pos_t[:n_dec]
            span = decoding[-1].slot + 1
            if span > n_dec:  # rows in some slots are not decoding (parked, or newcomers)
                plan.dec_slots = torch.tensor([r.slot for r in decoding], device=dev)
                if 3 * n_dec >= span:  # attend over all slots 0..span, the others' queries zero and discarded
                    plan.dec_span = span
                    dec_pos = torch.zeros(span, dtype=pos_t.dtype, device=dev).index_copy_(0, plan.dec_slots, dec_pos)
            plan.dec_mask = (torch.arange(plan.dec_width, device=dev)[None, :] <= dec_pos[:, None])[:, None, None, :]
        offset = n_dec
        for group in _prefill_groups(leaders):
            q = [len(r.tokens) - r.cached for r in group]
            qmax = max(q)
            starts = torch.tensor([r.cached for r in group], device=dev)
            t = torch.arange(qmax, device=dev)
            width = int(starts.max()) + qmax
            # query t of row j sees keys 0 .. cached_j + t: its cached prefix and its own tokens so far
            mask = torch.arange(width, device=dev)[None, None, :] <= (starts[:, None] + t[None, :])[:, :, None]
            offs = torch.tensor([0] + q[:-1], device=dev).cumsum(0) + offset
            qlen = torch.tensor(q, device=dev)
            gather = (offs[:, None] + torch.minimum(t[None, :], qlen[:, None] - 1)).reshape(-1)
            valid = (torch.arange(len(group), device=dev)[:, None] * qmax + t[None, :])[t[None, :] < qlen[:, None]]
            first, k = group[0].slot, len(group)
            consecutive = all(r.slot == first + j for j, r in enumerate(group))
            sel = None if consecutive else torch.tensor([r.slot for r in group], device=dev)
            plan.groups.append((first, k, sel, qmax, width, mask[:, None], gather, valid))
            offset += sum(q)
        self._kv.plan = plan
        out = self.model(
            input_ids=torch.tensor([ids], device=dev), position_ids=pos_t[None], attention_mask={"full_attention": None},
            past_key_values=self._kv, use_cache=True, logits_to_keep=torch.tensor(last, device=dev), slot_plan=plan,
        )
        for r in rows:
            r.cached = len(r.tokens)
        return out.logits[0]

    def _sample_into(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample one token per row from logits[len(rows), V], append it, retire the rows that finished."""
        toks, lps = sample_tokens(logits, [r.req.settings for r in rows], [r.gen for r in rows], self._gen)
        for row, tok, lp in zip(rows, toks, lps):
            if not row.out_ids:
                row.first_step = self.steps
            row.tokens.append(tok)
            row.out_ids.append(tok)
            row.out_lp.append(lp)
            if tok in row.stops:
                row.finish = "stop"
                self._retire(row)
            elif len(row.out_ids) >= row.req.settings.max_tokens:
                self._retire(row)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, adopt: bool = False) -> None:
        """Stage the streamed tensors into the standby parameters, then swap them in and serve
        ``version``; anything wrong with the stream raises before the swap (nothing changes).
        ``adopt`` changes nothing: every tensor is copied into the standby copy as it arrives."""
        with self.loading:
            if self.driver == "loop" and self._driver_loop is not None and not self._driver_loop.is_running():
                self._adopt(None)  # its loop stopped with requests running: they hold the batch lock no more
                self._driver_loop = None
            slots = self._slots()
            standby = None
            seen: set[str] = set()
            rows_in: dict[str, int] = {}  # a tensor sent in row pieces -> rows staged so far
            for name, t in named_tensors:
                if standby is None:  # the first tensor says which update this is: the whole model or the adapters
                    adapters = self.lora is not None and _is_adapter(name)
                    standby = self._standby_copy(adapters)
                elif self.lora is not None and _is_adapter(name) != adapters:
                    raise ValueError(f"weights v{version}: {name} mixes adapter and base tensors in one update")
                canonical = slots.get(name)
                if canonical is None:
                    raise ValueError(f"weights v{version}: tensor {name!r} is not a parameter of the served model")
                dst = standby.get(canonical)
                if dst is None:
                    raise ValueError(f"weights v{version}: tensor {name!r} is not part of this update's parameters")
                if isinstance(t, Rows):  # a piece of a tensor larger than a bucket: into its rows of the standby copy
                    place(dst, t, name, rows_in.get(canonical, 0))
                    rows_in[canonical] = t.stop
                    if t.last:
                        seen.add(canonical)
                    continue
                if tuple(t.shape) != tuple(dst.shape):
                    raise ValueError(f"weights v{version}: {name} has shape {list(t.shape)}, the model's is {list(dst.shape)}")
                dst.copy_(t)
                seen.add(canonical)
            if standby is None:
                raise ValueError(f"weights v{version}: the update holds no tensors")
            missing = set(standby) - seen
            if missing:  # a tensor whose last piece never came counts as missing: never swapped in half-copied
                raise ValueError(f"weights v{version} are incomplete: missing {sorted(missing)[:5]} ({len(missing)} tensors)")
            params = self._params()
            with self._lock:  # no batch runs during the swap
                for canonical in standby:
                    p = params[canonical]
                    p.data, standby[canonical] = standby[canonical], p.data
                self.version = version

    def _params(self) -> dict[str, torch.Tensor]:
        """The served parameters and persistent buffers, one name each (tied ones once)."""
        out: dict[str, torch.Tensor] = {}
        ids: set[int] = set()
        for name, t in self.model.state_dict(keep_vars=True).items():
            if id(t) not in ids:
                ids.add(id(t))
                out[name] = t
        return out

    def _slots(self) -> dict[str, str]:
        """Every state-dict name -> the name its tensor is staged under (tied names share one)."""
        first: dict[int, str] = {}
        return {name: first.setdefault(id(t), name) for name, t in self.model.state_dict(keep_vars=True).items()}

    def _standby_copy(self, adapters: bool) -> dict[str, torch.Tensor]:
        """The standby tensors of an update of the whole model or (``adapters``) of the adapters."""
        params = {n: p for n, p in self._params().items() if not adapters or _is_adapter(n)}
        key = frozenset(params)
        if key not in self._standby:
            self._standby[key] = {name: torch.empty_like(p.data) for name, p in params.items()}
        return self._standby[key]


def _is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def _prefill_groups(rows: list[_Row], waste: float = 1.5) -> list[list[_Row]]:
    """Split rows (longest uncached part first) into runs prefilled together: a run grows while its
    padded size stays within ``waste`` x its real tokens (a forward costs ~one decode step)."""
    groups: list[list[_Row]] = []
    real = 0
    for r in rows:
        q = len(r.tokens) - r.cached
        if groups and (len(groups[-1]) + 1) * (len(groups[-1][0].tokens) - groups[-1][0].cached) <= waste * (real + q):
            groups[-1].append(r)
            real += q
        else:
            groups.append([r])
            real = q
    return groups


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits[N, V] outside the top-k / nucleus (only for choosing the token)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def sample_tokens(
    logits: torch.Tensor, settings: list[SamplingSettings], gens: list[torch.Generator | None], shared: torch.Generator,
) -> tuple[list[int], list[float]]:
    """One token per row of logits[N, V] and its log-prob ``log_softmax(logits / T)`` (T = 1 when greedy).

    Row i is greedy when ``settings[i].temperature <= 0``; otherwise it samples after its top-k/top-p
    filter by inverting the CDF at one uniform draw, from ``gens[i]`` when the request has a seed, else
    from ``shared`` (one draw per row: ``torch.multinomial`` costs ~5 ms for 64 rows on a CPU core).
    """
    logits = logits.float()
    greedy = [s.temperature <= 0 for s in settings]
    if all(greedy):
        logp = torch.log_softmax(logits, dim=-1)
        tok = logits.argmax(-1)
    else:
        temps = {s.temperature for s in settings}
        if len(temps) == 1:
            logits = logits / settings[0].temperature
        else:
            scale = torch.tensor([1.0 if g else s.temperature for s, g in zip(settings, greedy)], device=logits.device)
            logits = logits / scale[:, None]
        logp = torch.log_softmax(logits, dim=-1)
        filters = {(s.top_k, s.top_p) for s in settings}
        if filters == {(-1, 1.0)}:
            probs = logp.exp()
        else:
            if len(filters) == 1:
                choose = _filter_logits(logits, settings[0].top_k, settings[0].top_p)
            else:
                choose = torch.cat([_filter_logits(logits[i : i + 1], s.top_k, s.top_p) for i, s in enumerate(settings)])
            probs = torch.softmax(choose, dim=-1)
        u = torch.empty(len(settings), 1, dtype=torch.float64, device=logits.device)
        own = [i for i, g in enumerate(gens) if g is not None]
        if len(own) < len(settings):
            u.uniform_(generator=shared)
        for i in own:
            u[i].uniform_(generator=gens[i])
        cdf = probs.double().cumsum(-1)
        tok = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]  # never a token of probability 0
        tok = torch.where(tok >= probs.shape[-1], probs.argmax(-1), tok)  # u * total rounded up to total (~2^-53)
        if any(greedy):
            tok = torch.where(torch.tensor(greedy, device=logits.device), logits.argmax(-1), tok)
    tok_lp = logp.gather(1, tok[:, None])[:, 0]
    return tok.tolist(), tok_lp.tolist()


def _generator(settings: SamplingSettings, device: torch.device) -> torch.Generator | None:
    """A request's own generator when it asks for a seed."""
    if settings.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(settings.seed)


def _resolve(req: _Request, result: Generation | None = None, exc: BaseException | None = None) -> None:
    """Complete a request's future: at once when called on its own event loop (the loop driver), else
    on that loop (from the worker thread)."""

    def done() -> None:
        if not req.fut.done():
            if exc is not None:
                req.fut.set_exception(exc)
            else:
                req.fut.set_result(result)

    loop = req.fut.get_loop()
    if loop.is_closed():  # nobody waits for it any more
        return
    try:
        here = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    if here is loop:
        done()
        return
    try:
        loop.call_soon_threadsafe(done)
    except RuntimeError:  # closed meanwhile
        pass


@dataclass
class _Request:
    prompt: list[int]
    settings: SamplingSettings
    fut: asyncio.Future


@dataclass(eq=False)
class _Row:
    """A running request: ``tokens`` are the prompt and what it sampled; the first ``cached`` have KV in ``slot``."""

    req: _Request
    tokens: list[int]
    cached: int
    slot: int
    gen: torch.Generator | None
    out_ids: list[int] = field(default_factory=list)
    out_lp: list[float] = field(default_factory=list)
    finish: str = "length"
    first_step: int = -1

    def __post_init__(self):
        self.stops = set(self.req.settings.stop_token_ids)


@dataclass(eq=False)
class _Parked:
    """A finished row whose KV of ``tokens`` stays in ``slot`` for a request that continues it."""

    tokens: list[int]
    slot: int
    since: int = 0
    """The step it was parked at."""

    @property
    def length(self) -> int:
        return len(self.tokens)


class _SwapGate:
    """The batch lock: the worker holds it while requests run; a weight swap (``with gate:``) waits
    for it, and while one waits the worker admits nothing new, so the running rows drain."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._held = False
        self.swap_waiting = 0

    def __enter__(self) -> None:
        with self._cond:
            self.swap_waiting += 1
            try:
                if not self._cond.wait_for(lambda: not self._held, timeout=self.timeout_s):
                    raise TimeoutError(f"weight swap: waited {self.timeout_s:.0f} s for the engine's running requests to finish")
            finally:
                self.swap_waiting -= 1
            self._held = True

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire_for_requests(self, stopping) -> bool:
        """Take the lock once no swap holds or wants it; False if ``stopping()`` turned true first."""
        t0 = time.monotonic()
        with self._cond:
            while not self._cond.wait_for(lambda: (not self._held and self.swap_waiting == 0) or stopping(), timeout=1.0):
                if time.monotonic() - t0 > self.timeout_s:
                    raise TimeoutError(f"HF engine: waited {self.timeout_s:.0f} s for a weight swap to release the batch lock")
            if stopping():
                return False
            self._held = True
            return True

    def try_acquire_for_requests(self) -> bool:
        """Take the lock if no swap holds or wants it, without waiting."""
        with self._cond:
            if self._held or self.swap_waiting:
                return False
            self._held = True
            return True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()


@dataclass(eq=False)
class SlotPlan:
    """Where a packed forward's T tokens go: token i is written at ``slot_idx[i]``, position ``pos_idx[i]``.

    The first ``n_dec`` tokens are one per decoding row, in slot order, each attending to positions
    ``0..pos`` of its slot. The rows are in slots ``0..n_dec`` (``dec_slots`` None), or in the slots
    ``dec_slots[n_dec]``: then the attention runs over slots ``0..dec_span`` (views; the other slots'
    queries are zeros and their outputs dropped) or, where the rows are few (``dec_span`` 0), over a
    copy of their slots. ``dec_mask[n_dec or dec_span, 1, 1, dec_width]``. Then the newcomers, in groups
    ``(first_slot, k, sel, qmax, width, mask[k, 1, qmax, width], gather[k * qmax], valid)``: their tokens
    padded to ``qmax`` per row (``gather`` picks them from the packed order, ``valid`` puts them back),
    in slots ``first_slot..first_slot + k`` (``sel`` None) or in the slots ``sel[k]`` (read as a copy).
    """

    slot_idx: torch.Tensor
    pos_idx: torch.Tensor
    n_dec: int
    dec_width: int = 0
    dec_mask: torch.Tensor | None = None
    dec_slots: torch.Tensor | None = None
    dec_span: int = 0
    groups: list[tuple] = field(default_factory=list)


def slot_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, slot_plan=None, **kwargs):
    """Attention of a packed step over the slot cache (``query[1, heads, T, dim]``; ``key``/``value`` the
    whole ``[slots, kv_heads, length, dim]`` buffers); without a ``slot_plan`` (a plain forward of the
    served model), transformers' SDPA attention."""
    if slot_plan is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    import torch.nn.functional as F

    q = query[0].transpose(0, 1)  # [T, heads, dim]
    heads, dim = q.shape[1], q.shape[2]
    gqa = heads != key.shape[1]
    outs = []
    p = slot_plan
    if p.n_dec:
        w, qd = p.dec_width, q[: p.n_dec, :, None]
        if p.dec_slots is None:
            kd, vd = key[: p.n_dec, :, :w], value[: p.n_dec, :, :w]
        elif p.dec_span:
            qd = qd.new_zeros((p.dec_span, heads, 1, dim)).index_copy_(0, p.dec_slots, qd)
            kd, vd = key[: p.dec_span, :, :w], value[: p.dec_span, :, :w]
        else:
            kd, vd = key[:, :, :w].index_select(0, p.dec_slots), value[:, :, :w].index_select(0, p.dec_slots)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=p.dec_mask, scale=scaling, enable_gqa=gqa)
        if p.dec_span:
            o = o.index_select(0, p.dec_slots)
        outs.append(o[:, :, 0])
    for a, k, sel, qmax, w, mask, gather, valid in p.groups:
        qg = q[gather].view(k, qmax, heads, dim).transpose(1, 2)
        if sel is None:
            kg, vg = key[a : a + k, :, :w], value[a : a + k, :, :w]
        else:
            kg, vg = key[:, :, :w].index_select(0, sel), value[:, :, :w].index_select(0, sel)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        outs.append(o.transpose(1, 2).reshape(k * qmax, heads, dim)[valid])
    return torch.cat(outs)[None], None


def _register_slot_attention() -> str:
    """Register ``slot_attention`` with transformers (masks built as for SDPA); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("relay_slots", slot_attention)
    AttentionMaskInterface.register("relay_slots", sdpa_mask)
    return "relay_slots"


class SlotCache(Cache):
    """A static KV cache of fixed slots: one ``[2 * layers, slots, kv_heads, length, head_dim]`` buffer.

    The engine sets ``plan`` (a ``SlotPlan``) before each forward; ``update`` writes each packed token's
    keys/values at its slot and position and returns the buffers, which ``slot_attention`` reads as
    views (never copies) for the decoding rows. Buffers are allocated at the first forward (the shape
    comes from the keys) and grow on ``reserve``.
    """

    def __init__(self, device: torch.device, num_layers: int, max_slots: int = 0, max_length: int | None = None):
        """``max_slots`` x ``max_length`` (the engine's most rows, the model's context): what a CPU buffer
        reserves at its first allocation, where that fits in a quarter of the memory (``_zeros``)."""
        super().__init__(layers=[])
        self.device = device
        self.num_layers = num_layers
        self.capacity = (max_slots, max_length or 0)
        self.buf: torch.Tensor | None = None  # [2 * layers (k, v), slots, kv_heads, length, head_dim]
        self.slots = 0
        self.length = 0
        self.plan: SlotPlan | None = None

    def reserve(self, slots: int, length: int) -> None:
        """At least ``slots`` slots of ``length`` positions. A growth copies the buffer: each dimension that
        grows takes what is asked or 1.25x its size, whichever is more (lengths in steps of 64)."""
        if slots <= self.slots and length <= self.length:
            return
        new_s = self.slots if slots <= self.slots else max(slots, self.slots + self.slots // 4)
        new_l = self.length if length <= self.length else -(-max(length, self.length + self.length // 4) // 64) * 64
        if self.buf is not None:
            b = self.buf
            grown = _zeros((b.shape[0], new_s, b.shape[2], new_l, b.shape[4]), b.dtype, b.device)
            grown[:, : self.slots, :, : self.length] = b
            self.buf = grown
        self.slots, self.length = new_s, new_l

    def copy(self, src: int, dst: int, width: int, start: int = 0) -> None:
        """Slot ``dst``'s positions ``start..width`` become slot ``src``'s (every layer)."""
        if width > start and self.buf is not None:
            self.buf[:, dst, :, start:width] = self.buf[:, src, :, start:width]

    def swap(self, a: int, b: int, width: int) -> None:
        """Exchange the first ``width`` positions of slots ``a`` and ``b`` (every layer)."""
        if width and self.buf is not None:
            tmp = self.buf[:, a, :, :width].clone()
            self.buf[:, a, :, :width] = self.buf[:, b, :, :width]
            self.buf[:, b, :, :width] = tmp

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the step's keys/values ([1, kv_heads, T, head_dim], packed) at their slots and positions;
        return the layer's whole buffers (the slot attention reads the slots it needs)."""
        if self.buf is None:
            _, heads, _, dim = key_states.shape
            cap_s, cap_l = max(self.slots, self.capacity[0]), max(self.length, self.capacity[1])
            if self.device.type == "cpu" and 2 * self.num_layers * cap_s * heads * cap_l * dim * key_states.element_size() <= _memory() // 4:
                self.slots, self.length = cap_s, cap_l  # reserved, not committed: no growth copies later
            shape = (2 * self.num_layers, self.slots, heads, self.length, dim)
            self.buf = _zeros(shape, key_states.dtype, self.device)
        K, V = self.buf[2 * layer_idx], self.buf[2 * layer_idx + 1]
        K[self.plan.slot_idx, :, self.plan.pos_idx] = key_states[0].transpose(0, 1)
        V[self.plan.slot_idx, :, self.plan.pos_idx] = value_states[0].transpose(0, 1)
        return K, V

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # the engine passes position ids and masks itself


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. On a CPU its memory is an anonymous mapping: the OS commits each 4 KB page, zeroed,
    when it is first touched, so a large buffer costs only the part that is used (``torch.zeros`` writes
    every page up front; numpy's and glibc's large zeros may ask for 2 MB pages, which a sparse use
    commits whole)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import math
    import mmap

    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    # MAP_NORESERVE: the reserved but untouched part is not charged to the commit accounting. Without
    # it a process whose engines had reserved more than the machine's memory (adjacent reservations
    # merge into one mapping) could no longer fork: fork refused it with ENOMEM
    anonymous = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    return torch.frombuffer(anonymous, dtype=torch.uint8).view(dtype).view(shape)


def _map_noreserve() -> int:
    """``MAP_NORESERVE`` (Python's ``mmap`` exposes it from 3.13 on); 0 where its value is not known."""
    import mmap
    import platform

    known = {"x86_64": 0x4000, "aarch64": 0x4000, "arm64": 0x4000, "AMD64": 0x4000}
    return getattr(mmap, "MAP_NORESERVE", known.get(platform.machine(), 0))


_MAP_NORESERVE = _map_noreserve()


def _memory() -> int:
    """Physical memory in bytes."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
