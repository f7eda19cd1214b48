"""Every message that crosses a process boundary in Relay.

One file of tagged structs: each message carries a ``kind`` tag (msgspec's
tag field) and the schema version ``v``. ``decode`` accepts the union
``Message`` and raises ``ProtocolError`` for anything else: bad bytes, an
unknown kind, a wrong field type, or a schema version this build does not
speak. The wire format is msgpack; token ids, masks, log-probs and weights
travel as packed little-endian arrays (``bytes``), never as lists of ints.

Large tensors (weights) do not go inside the msgpack body: a
``WeightsChunk`` header lists ``TensorMeta`` entries and the raw buffers
follow as extra ZeroMQ frames (see ``protocol/transport.py``), so nothing is
copied into an intermediate blob.
"""

from __future__ import annotations

import array
import math
import sys
from typing import Any, Union

import msgspec
import numpy as np

SCHEMA_VERSION = 1


class ProtocolError(ValueError):
    """A message could not be decoded or is not one this build speaks."""


class _Msg(msgspec.Struct, tag_field="kind", kw_only=True):
    v: int = SCHEMA_VERSION
    """Schema version of the sender."""


# ----------------------------------------------------------------- arrays


PACKED_DTYPES: dict[str, int] = {"int32": 4, "int64": 8, "uint8": 1, "float32": 4, "float64": 8}
"""The element types a ``Packed`` array may have, with their sizes in bytes (an allow-list:
anything else, e.g. ``'V0'``, ``'S0'``, ``'<U10'``, ``'M8'``, is refused when decoded)."""

TENSOR_DTYPES: dict[str, int] = {
    "bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "int64": 8, "int32": 4, "int16": 2,
    "int8": 1, "uint8": 1, "bool": 1,
    "<f2": 2, "<f4": 4, "<f8": 8, "<i8": 8, "<i4": 4, "<i2": 2, "|i1": 1, "|u1": 1, "|b1": 1,
}
"""The element types a weight tensor may have on the wire (torch names, and the numpy ``dtype.str``
forms older senders use), with their sizes in bytes."""

MAX_DIMS = 8
"""Most dimensions a weight tensor's shape may have."""


class Packed(msgspec.Struct, frozen=True):
    """A 1-D array as raw little-endian bytes (``dtype`` from ``PACKED_DTYPES``)."""

    dtype: str
    data: bytes

    def __post_init__(self):
        size = PACKED_DTYPES.get(self.dtype)
        if size is None:
            raise ValueError(f"packed dtype {self.dtype[:32]!r} is not one of {sorted(PACKED_DTYPES)}")
        if len(self.data) % size:
            raise ValueError(f"packed {self.dtype} array of {len(self.data)} bytes is not a whole number of elements")

    def numpy(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<"))

    def tolist(self) -> list:
        return self.numpy().tolist()

    def __len__(self) -> int:
        return len(self.data) // PACKED_DTYPES[self.dtype]


def pack(values, dtype: str) -> Packed:
    """Pack a sequence (list, numpy array or CPU tensor) as a 1-D array of ``dtype``. A list goes through
    ``array.array`` (``bytes`` for ``uint8``) where that holds the same values: ~1 us sooner an array
    than numpy, five arrays a trajectory."""
    if isinstance(values, list):
        code = _ARRAY_CODES.get(dtype)
        if code is not None:
            try:
                data = bytes(values) if code == "B" else array.array(code, values).tobytes()
            except (TypeError, ValueError, OverflowError):  # a value the type cannot hold: numpy's casting says what becomes of it
                pass
            else:
                return Packed(dtype=dtype, data=data)
    arr = np.ascontiguousarray(np.asarray(values, dtype=np.dtype(dtype).newbyteorder("<"))).reshape(-1)
    return Packed(dtype=dtype, data=arr.tobytes())


_ARRAY_CODES = {
    dtype: code
    for dtype, code in {"uint8": "B", "int32": "i", "float32": "f", "int64": "q", "float64": "d"}.items()
    if sys.byteorder == "little" and array.array(code).itemsize == np.dtype(dtype).itemsize
}
"""``array.array`` type codes that pack exactly as numpy's little-endian dtypes (on a little-endian machine)."""


# ----------------------------------------------------------------- control


class Register(_Msg, tag="register"):
    """Actor -> learner: a new actor introduces itself."""

    actor_id: str
    host: str
    pid: int
    engine: str


class WeightsGroup(msgspec.Struct, frozen=True):
    """Where and as whom an actor joins the collective weights group (``transport.weights=nccl``).

    Rank 0 is learner rank 0; actors are ranks ``1 .. world_size - 1``. The
    group has its own ``torch.distributed.TCPStore`` at ``host:port`` and never
    touches the learner's default process group.
    """

    host: str
    port: int
    rank: int
    world_size: int
    backend: str
    """``nccl`` (GPU tensors) or ``gloo`` (CPU tensors)."""


class Welcome(_Msg, tag="welcome"):
    """Learner -> actor: registration accepted."""

    actor_id: str
    learner_version: int
    max_staleness: int
    weights_group: WeightsGroup | None = None
    """Set when weights travel by collective broadcast (``transport.weights=nccl``)."""


class Heartbeat(_Msg, tag="heartbeat"):
    """Actor -> learner: still alive, serving ``version``."""

    actor_id: str
    version: int
    in_flight: int


class HeartbeatAck(_Msg, tag="heartbeat_ack"):
    learner_version: int
    stop: bool = False


class WorkRequest(_Msg, tag="work_request"):
    """Actor -> learner: ask for up to ``max_groups`` prompts to roll out."""

    actor_id: str
    version: int
    """Policy version the actor serves now; admission is checked against it."""
    max_groups: int
    wait_s: float = 0.0
    """When nothing can be granted now, the learner may hold the reply up to this long and answers
    the moment work can be granted, a newer policy version exists, or training stops (a long poll:
    no polling interval between a new version and the actor hearing of it)."""


class WorkItem(msgspec.Struct, kw_only=True):
    """One prompt to roll out ``group_size`` times."""

    sample_id: str
    row: dict
    group_size: int
    greedy_baseline: bool = False
    """Also roll out one greedy episode (ReMax baseline)."""
    validation: bool = False
    """Sample at validation temperature; the result is scored, not trained on."""


class WorkGrant(_Msg, tag="work_grant"):
    """Learner -> actor: the work admitted now (possibly none)."""

    items: list[WorkItem]
    learner_version: int
    stop: bool = False
    """Training is over: finish nothing new and exit."""
    reason: str = ""
    """Why nothing was granted, for logs."""


class WeightsRequest(_Msg, tag="weights_request"):
    """Actor -> learner: send the newest weights if newer than ``have_version``."""

    actor_id: str
    have_version: int
    wait_s: float = 0.0
    """If the newest version cannot be sent from its start (its stream already released its
    first bucket), the learner may hold this request up to this long for the next opening
    instead of answering ``NoWeights`` at once."""


class TensorMeta(msgspec.Struct, frozen=True):
    """Name, dtype (from ``TENSOR_DTYPES``) and shape of one tensor whose bytes follow as a frame;
    ``nbytes`` is checked against the shape and dtype when decoded."""

    name: str
    dtype: str
    shape: list[int]
    """The shape of the bytes that follow: the whole tensor's, or a piece's (``full_shape``)."""
    nbytes: int
    full_shape: list[int] | None = None
    """Set for a *piece* of a tensor larger than a bucket: the whole tensor's shape. The piece is
    rows ``[row_start, row_start + shape[0])`` along dim 0 (a contiguous byte range of the whole);
    ``shape[1:] == full_shape[1:]``. ``None`` (senders that predate pieces): the whole tensor."""
    row_start: int = 0
    """A piece's first row in the whole tensor (0 for a whole tensor)."""

    def __post_init__(self):
        size = TENSOR_DTYPES.get(self.dtype)
        if size is None:
            raise ValueError(f"tensor {self.name[:64]!r}: dtype {self.dtype[:32]!r} is not one of {sorted(TENSOR_DTYPES)}")
        if len(self.shape) > MAX_DIMS or any(d < 0 for d in self.shape):
            raise ValueError(f"tensor {self.name[:64]!r}: bad shape {self.shape[:MAX_DIMS + 1]}")
        if math.prod(self.shape) * size != self.nbytes:
            raise ValueError(f"tensor {self.name[:64]!r}: {self.nbytes} bytes do not fit shape {self.shape} of {self.dtype}")
        full = self.full_shape
        if full is None:
            if self.row_start:
                raise ValueError(f"tensor {self.name[:64]!r}: row_start {self.row_start} without full_shape")
            return
        if (len(full) != len(self.shape) or not self.shape or any(d < 0 for d in full) or full[1:] != self.shape[1:]
                or self.row_start < 0 or self.row_start + self.shape[0] > full[0]):
            raise ValueError(
                f"tensor {self.name[:64]!r}: rows {self.row_start}+{self.shape[:1]} of shape {self.shape[:MAX_DIMS]} "
                f"are not a piece of {full[:MAX_DIMS + 1]}"
            )


class WeightsChunk(_Msg, tag="weights_chunk"):
    """Learner -> actor: one chunk of a weights update; buffers follow as frames.

    An update is ``num_chunks`` chunks of the same ``version``; the actor
    applies it only once every chunk arrived and every checksum matched. A
    streamed update (sent while the learner still gathers it) has ``num_chunks``
    0 until its last chunk, an empty one whose ``num_chunks`` is the total.
    """

    version: int
    chunk: int
    num_chunks: int
    tensors: list[TensorMeta]
    checksum: int
    """Checksum (``checksum_algo``) over the concatenated tensor buffers of this chunk."""
    checksum_algo: str = "crc32"
    """``xxh3_64`` (what this build sends) or ``crc32`` (senders that predate this field)."""


class WeightsAnnounce(_Msg, tag="weights_announce"):
    """Learner -> actors (``transport.weights=nccl``): the next broadcast round.

    Written to the weights group's store under ``round/<round>``; every actor
    joins every round, in order. The round's buckets follow from rank 0 as
    broadcasts, each described by a ``WeightsChunk`` header broadcast before
    its tensors (``protocol/weights.py:CollectivePublisher``); ``version`` is
    the version being sent (a bucket header's ``version`` is authoritative).
    """

    version: int
    round: int


class WorkFailed(_Msg, tag="work_failed"):
    """Actor -> learner: a work item cannot be rolled out (e.g. its prompt does not fit the
    model's context). The learner drops it, counted and logged, and does not grant it again."""

    actor_id: str
    sample_id: str
    reason: str


class WeightsAck(_Msg, tag="weights_ack"):
    """Actor -> learner, no reply: chunk ``chunk`` of a streamed ``version`` arrived and verified;
    the learner sends the next one (credit-based flow control: an actor holds the bucket it
    applies and the one arriving, whatever the model size)."""

    actor_id: str
    version: int
    chunk: int


class NoWeights(_Msg, tag="no_weights"):
    """Learner -> actor: nothing newer than the version the actor has."""

    learner_version: int


class Stop(_Msg, tag="stop"):
    reason: str


class Error(_Msg, tag="error"):
    """Reply to a request the learner could not serve."""

    message: str
    code: str = ""
    """Machine-readable reason: ``unregistered`` (the learner does not know this actor, e.g. it was
    declared dead while paused: register again and carry on), ``not_owner``, or empty."""


# ----------------------------------------------------------------- data


class EpisodeStats(msgspec.Struct, kw_only=True):
    num_turns: int
    tool_calls: dict[str, int]
    tool_errors: int = 0
    truncated: bool = False
    finish_reason: str = ""
    """``answer`` | ``max_turns`` | ``token_budget`` | ``length``."""
    gen_tokens: int = 0
    gen_time_s: float = 0.0
    tool_time_s: float = 0.0


class Trajectory(_Msg, tag="trajectory"):
    """Actor -> learner: one scored episode, token-exact.

    ``response_ids`` holds every token after the prompt: the ids the engine
    sampled (``loss_mask`` 1, with their sampling ``logprobs`` and the policy
    ``versions`` that produced them) and the observation ids the environment
    appended (``loss_mask`` 0, logprob 0, version -1). All four response arrays
    have the same length.
    """

    actor_id: str
    sample_id: str
    chain: int
    prompt_ids: Packed
    response_ids: Packed
    loss_mask: Packed
    logprobs: Packed
    versions: Packed
    reward: float
    reward_components: dict[str, float]
    stats: EpisodeStats
    turn_rewards: list[float] = []
    """Optional per-turn rewards, one per run of sampled tokens (``loss_mask`` 1: an assistant turn)
    of this trajectory in order, at most one per run (fewer: the rest are 0), each placed on its
    run's last sampled token; on top of ``reward``, the outcome (``actors.actor.to_trajectory``)."""
    greedy: bool = False
    validation: bool = False
    final_answer: str = ""
    segment: int = 0
    """Which training sequence of the chain's episode this is (0-based). An episode is split into
    several when an external agent's harness rewrote its history (``actors/endpoint.py``); each
    sequence is its own trajectory, carrying the chain's reward, reward components, stats and
    final answer. The learner lays a chain's sequences end to end for its advantages."""
    num_segments: int = 1
    """How many training sequences the chain's episode has; the chain is complete once all arrived."""

    @property
    def min_version(self) -> int:
        v = self.versions.numpy()
        v = v[v >= 0]
        return int(v.min()) if v.size else -1


Message = Union[
    Register,
    Welcome,
    Heartbeat,
    HeartbeatAck,
    WorkRequest,
    WorkGrant,
    WorkFailed,
    WeightsRequest,
    WeightsChunk,
    WeightsAnnounce,
    WeightsAck,
    NoWeights,
    Stop,
    Error,
    Trajectory,
]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: _Msg) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes | memoryview) -> Message:
    """Decode one message. Total: any byte string gives a message or a ``ProtocolError`` saying
    what was wrong, never another exception (deep nesting, bad dtypes and lengths included)."""
    try:
        msg = _decoder.decode(data)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"invalid message: {_short(e)}") from None
    except msgspec.DecodeError as e:
        raise ProtocolError(f"undecodable message ({len(data)} bytes): {_short(e)}") from None
    except RecursionError:
        raise ProtocolError(f"message nested too deeply ({len(data)} bytes)") from None
    except Exception as e:  # noqa: BLE001 - the guarantee is that nothing else escapes
        raise ProtocolError(f"undecodable message ({len(data)} bytes): {type(e).__name__}: {_short(e)}") from None
    if msg.v != SCHEMA_VERSION:
        raise ProtocolError(
            f"{type(msg).__name__} has schema version {msg.v}; this build speaks {SCHEMA_VERSION}"
        )
    if isinstance(msg, Trajectory):
        check_trajectory(msg)
    return msg


def _short(e: BaseException, limit: int = 300) -> str:
    """An exception's message cut to ``limit`` characters (a hostile frame must not flood the log)."""
    s = str(e)
    return s if len(s) <= limit else s[:limit] + f"... ({len(s)} chars)"


TRAJECTORY_DTYPES = {"prompt_ids": "int32", "response_ids": "int32", "loss_mask": "uint8", "logprobs": "float32", "versions": "int32"}
"""The element type of each of a ``Trajectory``'s arrays (what ``actors.actor.to_trajectory`` packs)."""


def sampled_run_ends(loss_mask: Any) -> list[int]:
    """Indices of the last token of each run of sampled tokens (1s) in ``loss_mask`` (a list or
    array of 0/1, shape ``[T]``): the turns of a ``Trajectory``, where ``turn_rewards`` sit.
    ``[1, 1, 0, 1, 0, 0, 1] -> [1, 3, 6]``."""
    mask = np.asarray(loss_mask)
    if mask.size == 0:
        return []
    ends = np.nonzero((mask[:-1] == 1) & (mask[1:] != 1))[0].tolist()
    if mask[-1] == 1:
        ends.append(int(mask.size - 1))
    return ends


def check_trajectory(t: Trajectory) -> None:
    """Structural checks of a trajectory (``decode`` runs them); a violation is a ``ProtocolError``
    naming it: each array has its dtype, the response arrays line up, the prompt is not empty, the
    mask is 0/1, ids are non-negative, sampled tokens carry a version >= 0 (others -1 or more),
    log-probs are finite and <= 0, rewards are finite, the segment index is within its count."""
    where = f"trajectory {t.sample_id[:64]}#{t.chain}"
    for name, dtype in TRAJECTORY_DTYPES.items():
        if getattr(t, name).dtype != dtype:
            raise ProtocolError(f"{where}: {name} must be {dtype}, got {getattr(t, name).dtype}")
    n = len(t.response_ids)
    for name in ("loss_mask", "logprobs", "versions"):
        if len(getattr(t, name)) != n:
            raise ProtocolError(f"{where}: {name} has {len(getattr(t, name))} entries, response_ids has {n}")
    if len(t.prompt_ids) == 0:
        raise ProtocolError(f"{where}: empty prompt")
    if t.chain < 0:
        raise ProtocolError(f"{where}: negative chain index")
    if not 0 <= t.segment < t.num_segments:
        raise ProtocolError(f"{where}: segment {t.segment} of {t.num_segments} (needs 0 <= segment < num_segments)")
    mask = t.loss_mask.numpy()
    if mask.size and (mask.max() > 1):
        raise ProtocolError(f"{where}: loss_mask is not 0/1")
    for name in ("prompt_ids", "response_ids"):
        ids = getattr(t, name).numpy()
        if ids.size and ids.min() < 0:
            raise ProtocolError(f"{where}: negative token id in {name}")
    versions = t.versions.numpy()
    sampled = mask == 1
    if versions.size and (versions.min() < -1 or np.any(versions[sampled] < 0)):
        raise ProtocolError(f"{where}: sampled tokens need a version >= 0, other tokens >= -1")
    lp = t.logprobs.numpy()
    if lp.size and (not np.all(np.isfinite(lp)) or np.any(lp[sampled] > 1e-4)):
        raise ProtocolError(f"{where}: sampling log-probs must be finite and <= 0")
    if not all(math.isfinite(x) for x in (t.reward, *t.reward_components.values(), *t.turn_rewards)):
        raise ProtocolError(f"{where}: rewards must be finite")
    if t.turn_rewards:
        runs = len(sampled_run_ends(mask))
        if len(t.turn_rewards) > runs:
            raise ProtocolError(f"{where}: {len(t.turn_rewards)} turn_rewards for {runs} run(s) of sampled tokens")


def check_trajectory_bounds(t: Trajectory, vocab_size: int | None, max_version: int) -> None:
    """The checks that need the run (after ``check_trajectory``): every id below ``vocab_size`` (an
    id past the embedding would crash training), no version newer than ``max_version`` (not yet
    published)."""
    where = f"trajectory {t.sample_id[:64]}#{t.chain}"
    for name in ("prompt_ids", "response_ids"):
        ids = getattr(t, name).numpy()
        if vocab_size is not None and ids.size and ids.max() >= vocab_size:
            raise ProtocolError(f"{where}: token id {int(ids.max())} in {name} is outside the vocabulary ({vocab_size})")
    versions = t.versions.numpy()
    if versions.size and versions.max() > max_version:
        raise ProtocolError(f"{where}: version {int(versions.max())} is newer than the learner's v{max_version}")
