"""Real messages of every kind, and seeded mutations of them, for fuzzing the protocol boundary."""

from __future__ import annotations

import random

import msgspec

from protocol import messages as m

BAD_DTYPES = ["foo", "V0", "S0", "<U10", "M8", "O", "f16", "", "int32\x00", ">i4", "complex64"]


def real_messages() -> list[m.Message]:
    """One or more realistic instances of every message kind."""
    traj = m.Trajectory(
        actor_id="actor-0", sample_id="0:17", chain=3,
        prompt_ids=m.pack(list(range(40, 90)), "int32"), response_ids=m.pack([5, 6, 7, 8, 9, 10], "int32"),
        loss_mask=m.pack([1, 1, 0, 0, 1, 1], "uint8"), logprobs=m.pack([-0.5, -1.0, 0, 0, -0.1, -2.0], "float32"),
        versions=m.pack([3, 3, -1, -1, 4, 4], "int32"), reward=1.0, reward_components={"reward": 1.0, "format": 0.5},
        stats=m.EpisodeStats(num_turns=2, tool_calls={"calculator": 1}, gen_tokens=4, gen_time_s=0.1),
        turn_rewards=[0.0, 1.0], final_answer="42",
    )
    metas = [m.TensorMeta(name="model.embed_tokens.weight", dtype="bfloat16", shape=[16, 8], nbytes=256),
             m.TensorMeta(name="lm_head.bias", dtype="<f4", shape=[16], nbytes=64)]
    return [
        m.Register(actor_id="actor-1", host="node7", pid=4242, engine="HFEngine"),
        m.Welcome(actor_id="actor-1", learner_version=3, max_staleness=1,
                  weights_group=m.WeightsGroup(host="10.0.0.1", port=29700, rank=1, world_size=3, backend="gloo")),
        m.Heartbeat(actor_id="actor-1", version=3, in_flight=2),
        m.HeartbeatAck(learner_version=4),
        m.WorkRequest(actor_id="actor-1", version=3, max_groups=8),
        m.WorkGrant(items=[m.WorkItem(sample_id="0:3", row={"question": "2+2?", "answer": "4", "meta": {"k": [1, 2]}}, group_size=8)],
                    learner_version=4),
        m.WorkFailed(actor_id="actor-1", sample_id="0:3", reason="prompt too long"),
        m.WeightsRequest(actor_id="actor-1", have_version=2),
        m.WeightsChunk(version=4, chunk=0, num_chunks=2, tensors=metas, checksum=123456789, checksum_algo="xxh3_64"),
        m.WeightsAnnounce(version=4, round=2),
        m.NoWeights(learner_version=4),
        m.Stop(reason="done"),
        m.Error(message="unknown actor", code="unregistered"),
        traj,
    ]


def _bad_dtype_variant(rng: random.Random, msg: m.Message) -> bytes:
    """The message as a plain msgpack map with one dtype (packed array or tensor) replaced."""
    obj = msgspec.to_builtins(msg, builtin_types=(bytes,))
    targets = []

    def walk(o):
        if isinstance(o, dict):
            if "dtype" in o:
                targets.append(o)
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(obj)
    if targets:
        rng.choice(targets)["dtype"] = rng.choice(BAD_DTYPES)
    return msgspec.msgpack.encode(obj)


def _deep(rng: random.Random) -> bytes:
    depth = rng.choice([100, 1000, 5000, 50_000])
    body = b"\x81\xa1a" * depth + b"\x80"
    return b"\x83\xa4kind\xaawork_grant\xa5items\x91\x83\xa9sample_id\xa10\xa3row" + body + b"\xaagroup_size\x01"


def mutate(rng: random.Random, frame: bytes, msgs: list[m.Message]) -> bytes:
    """One seeded mutation of ``frame``: byte flips, truncation, extension, splices, bad dtypes,
    wrong field types, deep nesting, or random bytes."""
    kind = rng.randrange(9)
    b = bytearray(frame)
    if kind == 0 and b:  # flip 1-4 bytes
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 1 and b:  # set random bytes to random values
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if kind == 2:  # truncate
        return bytes(b[: rng.randrange(max(1, len(b)))])
    if kind == 3:  # extend or insert junk
        i = rng.randrange(len(b) + 1)
        return bytes(b[:i] + rng.randbytes(rng.randint(1, 64)) + b[i:])
    if kind == 4:  # splice two messages
        other = m.encode(rng.choice(msgs))
        i, j = rng.randrange(len(b) + 1), rng.randrange(len(other) + 1)
        return bytes(b[:i] + other[j:])
    if kind == 5:
        return _bad_dtype_variant(rng, rng.choice(msgs))
    if kind == 6:  # a field of the wrong type or value
        obj = msgspec.to_builtins(rng.choice(msgs), builtin_types=(bytes,))
        key = rng.choice(sorted(obj))
        obj[key] = rng.choice([None, -1, 2**63, "x" * 10, [], {}, 1.5, True, b"\x00"])
        return msgspec.msgpack.encode(obj)
    if kind == 7:
        return _deep(rng)
    return rng.randbytes(rng.randint(0, 256))


def fuzz_frames(seed: int, n: int) -> list[bytes]:
    rng = random.Random(seed)
    msgs = real_messages()
    frames = [m.encode(x) for x in msgs]
    return [mutate(rng, rng.choice(frames), msgs) for _ in range(n)]
