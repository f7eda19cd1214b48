"""Policy loading, FSDP2 sharding and the full-weight stream.

Any Hugging Face causal-LM directory loads (the embedded tiny model is one).
Each decoder layer is its own FSDP2 unit (``fully_shard``), then the root;
gloo on CPU, NCCL on GPU. Master weights are fp32; compute is bf16 with fp32
gradient reduction (FSDP2 ``MixedPrecisionPolicy``) when
``fsdp_config.mixed_precision`` says so: ``auto`` = bf16 on GPU, fp32 on CPU;
``bf16`` runs the bf16 path on CPU too.

Weights leave the learner as a stream (``stream_full_tensors``): one
state-dict entry at a time, cast to the requested dtype *on its shard* and
then gathered to rank 0 (``gather_rows_to_rank0``), so a gathered bf16 tensor
is never materialised in fp32 and rank 0 holds one gathered tensor beyond what
its consumer keeps (a publisher's bucket, a shard being written). Publishing
gathers an entry larger than a bucket in row pieces (``piece_bytes``), so then
rank 0 holds one piece, not the embedding. Publishing,
``export_hf`` (checkpoints and the final model) and the LoRA merge
(``learner/lora.py``) all consume this walk.
``fsdp_config.param_offload`` moves sharded parameters (and with them the
optimizer state) to CPU between uses (``CPUOffloadPolicy``, GPU only). The
policy, the critic (``learner.critic``) and the reference (``learner.reference``)
are all sharded by ``fsdp_shard``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

if TYPE_CHECKING:
    from learner.lora import LoraSettings


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks of an HF causal LM (each becomes an FSDP unit)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return list(base.layers)


def mp_policy(setting: str, device: torch.device):
    """FSDP2 ``MixedPrecisionPolicy`` for ``fsdp_config.mixed_precision`` (``None`` = plain fp32):
    ``auto`` is bf16 on GPU and fp32 on CPU; ``bf16`` computes in bf16 anywhere (fp32 master
    weights, optimizer state and gradient reduction); ``fp32`` never casts."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if setting == "auto":
        setting = "bf16" if device.type == "cuda" else "fp32"
    if setting == "fp32":
        return None
    if setting == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    raise ValueError(f"fsdp_config.mixed_precision must be auto, bf16 or fp32, got {setting!r}")


def load_policy(
    path: str,
    device: torch.device,
    *,
    gradient_checkpointing: bool = False,
    param_offload: bool = False,
    lora: "LoraSettings | None" = None,
    mixed_precision: str = "auto",
):
    """Load the HF causal LM at ``path``, optionally add LoRA adapters (only they train),
    shard it with FSDP2 and return it (train mode)."""
    from transformers import AutoModelForCausalLM

    from learner.lora import add_adapters

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = add_adapters(model, lora)
    return fsdp_shard(
        model, device, gradient_checkpointing=gradient_checkpointing, param_offload=param_offload, mixed_precision=mixed_precision
    )


def fsdp_shard(
    model, device: torch.device, *, gradient_checkpointing: bool = False, param_offload: bool = False,
    mixed_precision: str = "auto", plain_at_world_1: bool = True,
):
    """Shard an HF model with FSDP2 (one unit per decoder layer, then the root).

    Compute dtype from ``mixed_precision`` (``mp_policy``). ``param_offload``
    keeps the sharded parameters, their gradients and hence the optimizer state
    on CPU (``CPUOffloadPolicy``); it needs a GPU (no effect on CPU).

    At world size 1 with nothing for FSDP to do (fp32 compute, no offload: the
    CPU default) the model stays a plain module on ``device`` (``plain_at_world_1``;
    no per-layer hooks, parameters are plain tensors, ``stream_full_tensors``
    copies them); bf16 or offload at world size 1 still goes through FSDP2.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.to(device)
    kwargs = {}
    if (policy := mp_policy(mixed_precision, device)) is not None:
        kwargs["mp_policy"] = policy
    if device.type == "cuda" and param_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if plain_at_world_1 and not kwargs and (not dist.is_initialized() or dist.get_world_size() == 1):
        model.train()
        return model
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    model.train()
    return model


def _tied_lm_head(model, name: str) -> bool:
    """``name`` is the output embedding of a model that ties it to the input embedding."""
    config = model.config
    return bool(getattr(config, "tie_word_embeddings", False)) and name.removeprefix("base_model.model.") == "lm_head.weight"


PIECES_PER_BUCKET = 8
"""Publishing gathers any entry larger than ``bucket / PIECES_PER_BUCKET`` in row pieces of that size:
rank 0 then holds the transport's buckets (zmq: ``weights_window``, the one being filled among
them) plus one piece, about ``(window + 1/8) x bucket``, whatever the largest tensor (pieces as
large as a bucket would make it ``window + 1`` buckets)."""


def stream_full_tensors(model, dtype: torch.dtype, keep=None, piece_bytes: int | None = None) -> Iterator[tuple[str, Any]]:
    """The full state dict, one entry at a time (a collective: every rank iterates it to the end).

    Each floating-point entry is cast to ``dtype`` and gathered to rank 0
    (``gather_rows_to_rank0``: the other ranks cast their shard and send it, rank 0
    casts its own rows straight into the output); rank 0 gets ``(name, tensor)``
    pairs, contiguous on CPU and never aliasing a live parameter (so a consumer
    may keep them while training goes on); the other ranks get nothing. A tied
    ``lm_head.weight`` is skipped (it is the input embedding), and so is every
    entry whose name ``keep`` (if given) rejects: it is not gathered at all.

    ``piece_bytes``: an entry larger than this (in ``dtype``) is gathered and yielded as
    ``(name, protocol.weights.Rows)`` pieces of whole rows along dim 0, each at most
    ``piece_bytes`` (one row if a row is larger), in row order: rank 0 then never holds more
    than one piece of it (FSDP2 shards dim 0, so each rank sends the rows of the piece it
    owns). ``None``: every entry whole (checkpoints and exports)."""
    from protocol.weights import Rows

    rank0 = dist.get_rank() == 0
    gpu_group = dist.get_backend() == "nccl"
    for name, value in model.state_dict().items():
        if _tied_lm_head(model, name) or (keep is not None and not keep(name)):
            continue
        want = dtype if value.is_floating_point() else value.dtype
        shape = tuple(value.shape)
        if isinstance(value, DTensor) and gpu_group and value.to_local().device.type == "cpu":
            value = value.to(torch.device("cuda", torch.cuda.current_device()))  # offloaded shards: gather on the GPU
        for start, stop in row_pieces(shape, torch.empty((), dtype=want).element_size(), piece_bytes):
            if isinstance(value, DTensor):
                got = gather_rows_to_rank0(value, want, start, stop)
            else:  # not sharded (a buffer, or a plain model at world size 1): every rank has it
                got = (value.detach()[start:stop] if value.dim() else value.detach()).to(want, copy=True) if rank0 else None
            if not rank0:
                continue
            got = got.detach().to("cpu").contiguous()
            yield name, got if (start, stop) == (0, shape[0] if shape else 0) else Rows(got, start, shape)
            del got
        del value


def row_pieces(shape: tuple[int, ...], element_size: int, piece_bytes: int | None) -> list[tuple[int, int]]:
    """The row ranges ``[(start, stop)]`` along dim 0 that a tensor of ``shape`` is gathered in:
    one ``(0, rows)`` unless it is larger than ``piece_bytes`` (and has more than one row).

    >>> row_pieces((10, 4), 4, 48)   # 16-byte rows, 3 per piece
    [(0, 3), (3, 6), (6, 9), (9, 10)]"""
    rows = shape[0] if shape else 0
    row_bytes = math.prod(shape[1:]) * element_size if shape else element_size
    if piece_bytes is None or rows <= 1 or rows * row_bytes <= piece_bytes:
        return [(0, rows)]
    per = max(1, piece_bytes // max(1, row_bytes))
    return [(a, min(a + per, rows)) for a in range(0, rows, per)]


def gather_to_rank0(value: DTensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The full tensor of ``value`` cast to ``dtype`` on rank 0 (``None`` elsewhere), a new tensor
    (``gather_rows_to_rank0`` of all its rows)."""
    return gather_rows_to_rank0(value, dtype, 0, value.shape[0] if value.dim() else 0)


def gather_rows_to_rank0(value: DTensor, dtype: torch.dtype, start: int, stop: int) -> torch.Tensor | None:
    """Rows ``[start, stop)`` (dim 0) of ``value``'s full tensor, cast to ``dtype``, on rank 0
    (``None`` elsewhere): a new ``[stop - start, *shape[1:]]`` tensor.

    FSDP2's ``Shard(0)`` over a 1-D mesh: group rank r holds rows ``[r * chunk, (r + 1) * chunk)``
    (``chunk = ceil(rows / world)``, torch.chunk's split); every other rank casts the part of its
    rows inside the range and sends it (``dist.send``); rank 0 receives each straight into its
    slice of the output and casts its own part into it, so rank 0 holds the output and nothing
    else (no flat staging buffer as gloo's ``gather`` makes, no second copy as ``full_tensor``'s
    all-gather makes on every rank). Any other layout falls back to ``full_tensor`` (the whole
    tensor on every rank, then sliced)."""
    from torch.distributed.tensor import Shard

    mesh = value.device_mesh
    if mesh.ndim != 1 or tuple(value.placements) != (Shard(0),) or value.dim() == 0:
        full = value.full_tensor()
        if dist.get_rank() != 0:
            return None
        return (full[start:stop] if full.dim() else full).to(dtype, copy=True)
    group = mesh.get_group()
    world = dist.get_world_size(group)
    rows = value.shape[0]
    chunk = -(-rows // world)
    local = value.to_local()
    root = dist.get_global_rank(group, 0)
    me = dist.get_group_rank(group, dist.get_rank())

    def part(r: int, n_local: int) -> tuple[int, int]:
        """Group rank r's rows inside [start, stop), in its local indexing."""
        lo, hi = max(start, r * chunk), min(stop, r * chunk + n_local)
        return (lo - r * chunk, hi - r * chunk) if hi > lo else (0, 0)

    if me != 0:
        a, b = part(me, local.shape[0])
        if b > a:
            dist.send(local[a:b].to(dtype).contiguous(), dst=root, group=group)
        return None
    out = torch.empty((stop - start, *value.shape[1:]), dtype=dtype, device=local.device)
    works = []
    for r in range(1, world):  # posted first: the other ranks' rows arrive while rank 0 casts its own
        a, b = part(r, max(0, min(chunk, rows - r * chunk)))
        if b > a:
            at = r * chunk + a - start
            works.append(dist.irecv(out[at : at + b - a], src=dist.get_global_rank(group, r), group=group))
    a, b = part(0, local.shape[0])
    if b > a:
        out[a - start : b - start].copy_(local[a:b])  # the cast, straight into the output
    for w in works:
        w.wait()
    return out


def drain(stream: Iterable) -> None:
    """Run a collective stream to its end (ranks other than 0, which consume nothing)."""
    for _ in stream:
        pass


def full_state_arrays(model) -> list[tuple[str, np.ndarray]]:
    """The full weights as fp32 numpy on rank 0, in one piece (a collective). For tests: the
    reference the stream is checked against; publishing uses ``stream_full_tensors``."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return []
    return [
        (k, v.detach().to(torch.float32).numpy() if v.dtype == torch.bfloat16 else v.detach().numpy())
        for k, v in sd.items()
        if not _tied_lm_head(model, k)
    ]


def export_hf(named: Iterable[tuple[str, torch.Tensor]], base_path: str, out_dir: str, shard_bytes: int = 1 << 30) -> None:
    """Write a stream of full tensors (base-model names) as a plain HF directory loadable by
    transformers/vLLM: safetensors shards written as they fill (at most ``shard_bytes`` held),
    an index, the base model's config (its dtype set to the tensors') and tokenizer.
    Refuses (``ValueError``, nothing written at ``out_dir``) a stream that does not fit ``base_path``."""
    import json
    import shutil
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from protocol.weights import buckets_of, whole, write_safetensors

    config = AutoConfig.from_pretrained(base_path)
    with torch.device("meta"):
        expected = set(AutoModelForCausalLM.from_config(config).state_dict())
    if getattr(config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    files: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    dtypes: set[torch.dtype] = set()
    total = 0
    for i, bucket in enumerate(buckets_of(whole(named), shard_bytes, split=False)):  # HF loads whole tensors
        fname = f"model-{i + 1:05d}.safetensors"
        write_safetensors(tmp / fname, bucket.named(), {"format": "pt"})
        files.append((fname, [mt.name for mt in bucket.metas]))
        seen.update(mt.name for mt in bucket.metas)
        dtypes.update(t.dtype for t in bucket.tensors if t.is_floating_point())
        total += bucket.nbytes
        del bucket
    if seen != expected:
        shutil.rmtree(tmp)
        raise ValueError(
            f"exported weights do not fit {base_path}: missing {sorted(expected - seen)[:5]}, unexpected {sorted(seen - expected)[:5]}"
        )
    if len(files) == 1:
        (tmp / files[0][0]).rename(tmp / "model.safetensors")
    else:
        weight_map = {name: fname for fname, names in files for name in names}
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
    if len(dtypes) == 1:
        config.dtype = str(next(iter(dtypes))).removeprefix("torch.")
    config.save_pretrained(tmp)
    if (Path(base_path) / "generation_config.json").is_file():
        shutil.copy(Path(base_path) / "generation_config.json", tmp / "generation_config.json")
    AutoTokenizer.from_pretrained(base_path).save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
