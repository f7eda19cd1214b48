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

from typing import Union

import msgspec
import numpy as np

SCHEMA_VERSION = 1


class ProtocolError(ValueError):
    """A message could not be decoded or is not one this build speaks."""


class _Msg(msgspec.Struct, tag_field="kind", kw_only=True):
    v: int = SCHEMA_VERSION
    """Schema version of the sender."""


# ----------------------------------------------------------------- arrays


class Packed(msgspec.Struct, frozen=True):
    """A 1-D array as raw little-endian bytes."""

    dtype: str
    data: bytes

    def numpy(self) -> np.ndarray:
        try:
            return np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<"))
        except (TypeError, ValueError) as e:
            raise ProtocolError(f"bad packed array (dtype {self.dtype!r}, {len(self.data)} bytes): {e}") from e

    def tolist(self) -> list:
        return self.numpy().tolist()

    def __len__(self) -> int:
        return len(self.data) // np.dtype(self.dtype).itemsize


def pack(values, dtype: str) -> Packed:
    """Pack a sequence (list, numpy array or CPU tensor) as a 1-D array of ``dtype``."""
    arr = np.ascontiguousarray(np.asarray(values, dtype=np.dtype(dtype).newbyteorder("<"))).reshape(-1)
    return Packed(dtype=dtype, data=arr.tobytes())


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


class TensorMeta(msgspec.Struct, frozen=True):
    """Name, dtype and shape of one tensor whose bytes follow as a frame."""

    name: str
    dtype: str
    shape: list[int]
    nbytes: int


class WeightsChunk(_Msg, tag="weights_chunk"):
    """Learner -> actor: one chunk of a weights update; buffers follow as frames.

    An update is ``num_chunks`` chunks of the same ``version``; the actor
    applies it only once every chunk arrived and every checksum matched.
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

    Written to the weights group's store under ``round/<round>``; the tensors
    listed follow as one broadcast each, in this order, from rank 0. Every
    actor joins every round, in order.
    """

    version: int
    round: int
    tensors: list[TensorMeta]


class WorkFailed(_Msg, tag="work_failed"):
    """Actor -> learner: a work item cannot be rolled out (e.g. its prompt does not fit the
    model's context). The learner drops it, counted and logged, and does not grant it again."""

    actor_id: str
    sample_id: str
    reason: str


class NoWeights(_Msg, tag="no_weights"):
    """Learner -> actor: nothing newer than the version the actor has."""

    learner_version: int


class Stop(_Msg, tag="stop"):
    reason: str


class Error(_Msg, tag="error"):
    """Reply to a request the learner could not serve."""

    message: str


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
    """Optional per-assistant-turn rewards (placed on each turn's last sampled token)."""
    greedy: bool = False
    validation: bool = False
    final_answer: str = ""

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
    """Decode one message; any failure is a ``ProtocolError`` saying what was wrong."""
    try:
        msg = _decoder.decode(data)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"invalid message: {e}") from e
    except msgspec.DecodeError as e:
        raise ProtocolError(f"undecodable message ({len(data)} bytes): {e}") from e
    if msg.v != SCHEMA_VERSION:
        raise ProtocolError(
            f"{type(msg).__name__} has schema version {msg.v}; this build speaks {SCHEMA_VERSION}"
        )
    if isinstance(msg, Trajectory):
        check_trajectory(msg)
    return msg


def check_trajectory(t: Trajectory) -> None:
    """Cheap structural checks: the response arrays line up, the mask is 0/1, ids are valid."""
    n = len(t.response_ids)
    for name in ("loss_mask", "logprobs", "versions"):
        if len(getattr(t, name)) != n:
            raise ProtocolError(
                f"trajectory {t.sample_id}#{t.chain}: {name} has {len(getattr(t, name))} entries, "
                f"response_ids has {n}"
            )
    if len(t.prompt_ids) == 0:
        raise ProtocolError(f"trajectory {t.sample_id}#{t.chain}: empty prompt")
    mask = t.loss_mask.numpy()
    if mask.size and (mask.max() > 1):
        raise ProtocolError(f"trajectory {t.sample_id}#{t.chain}: loss_mask is not 0/1")
    ids = t.response_ids.numpy()
    if ids.size and ids.min() < 0:
        raise ProtocolError(f"trajectory {t.sample_id}#{t.chain}: negative token id")
    lp = t.logprobs.numpy()
    if lp.size and (not np.all(np.isfinite(lp)) or np.any(lp[mask == 1] > 1e-4)):
        raise ProtocolError(f"trajectory {t.sample_id}#{t.chain}: sampling log-probs must be finite and <= 0")
