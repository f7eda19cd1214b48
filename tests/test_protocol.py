"""Protocol: round trips, packed arrays, and garbage in -> one clear error type."""

import msgspec
import numpy as np
import pytest

from protocol import messages as m
from protocol.transport import make_snapshot, read_chunk


def make_traj(**kw):
    base = dict(
        actor_id="actor-0",
        sample_id="0:7",
        chain=1,
        prompt_ids=m.pack([1, 2, 3], "int32"),
        response_ids=m.pack([10, 11, 12, 13], "int32"),
        loss_mask=m.pack([1, 1, 0, 1], "uint8"),
        logprobs=m.pack([-0.5, -1.0, 0.0, -0.25], "float32"),
        versions=m.pack([3, 3, -1, 4], "int32"),
        reward=1.0,
        reward_components={"reward": 1.0},
        stats=m.EpisodeStats(num_turns=2, tool_calls={"calculator": 1}),
    )
    base.update(kw)
    return m.Trajectory(**base)


def test_trajectory_round_trip_is_exact():
    t = make_traj()
    back = m.decode(m.encode(t))
    assert back == t
    assert back.response_ids.tolist() == [10, 11, 12, 13]
    assert back.loss_mask.tolist() == [1, 1, 0, 1]
    assert back.logprobs.numpy().tolist() == [-0.5, -1.0, 0.0, -0.25]
    assert back.min_version == 3


@pytest.mark.parametrize("values, dtype", [
    ([1, 0, 1, True], "uint8"), ([], "uint8"), ([5, -3, 2**31 - 1], "int32"), ([1.7, -2.2], "int32"), ([2**40, -1], "int64"),
    ([0.1, -2.5, float("nan"), float("inf"), 1e40], "float32"), ([0.1, 1e300], "float64"), ([3, 4], "float32"),
])
def test_pack_of_a_list_holds_the_bytes_numpy_would(values, dtype):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 1e40 overflows float32 to inf, as numpy says
        expected = np.asarray(values, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
        assert m.pack(values, dtype).data == expected


def test_pack_refuses_a_value_its_type_cannot_hold_as_numpy_does():
    for values, dtype in (([300], "uint8"), ([-1], "uint8"), ([2**31], "int32")):
        with pytest.raises(OverflowError):
            m.pack(values, dtype)


def test_token_ids_travel_packed_not_as_int_lists():
    t = make_traj(response_ids=m.pack(list(range(1000)), "int32"), loss_mask=m.pack([1] * 1000, "uint8"),
                  logprobs=m.pack([-1.0] * 1000, "float32"), versions=m.pack([0] * 1000, "int32"))
    raw = msgspec.msgpack.decode(m.encode(t))
    assert isinstance(raw["response_ids"]["data"], bytes)
    assert len(raw["response_ids"]["data"]) == 4000


@pytest.mark.parametrize(
    "msg",
    [
        m.Register(actor_id="a", host="h", pid=1, engine="HFEngine"),
        m.Welcome(actor_id="a", learner_version=2, max_staleness=1),
        m.Heartbeat(actor_id="a", version=2, in_flight=3),
        m.WorkRequest(actor_id="a", version=2, max_groups=4),
        m.WorkGrant(items=[m.WorkItem(sample_id="0:1", row={"question": "q", "answer": "1"}, group_size=8)], learner_version=2),
        m.NoWeights(learner_version=2),
        m.WorkFailed(actor_id="a", sample_id="0:3", reason="prompt too long"),
        m.Stop(reason="done"),
    ],
)
def test_control_messages_round_trip(msg):
    assert m.decode(m.encode(msg)) == msg


@pytest.mark.parametrize("garbage", [b"", b"\x00\x01\x02", b"not msgpack at all", msgspec.msgpack.encode({"kind": "nope"}),
                                     msgspec.msgpack.encode({"kind": "heartbeat", "actor_id": 3})])
def test_garbage_raises_protocol_error(garbage):
    with pytest.raises(m.ProtocolError):
        m.decode(garbage)


def test_other_schema_version_is_refused():
    raw = msgspec.msgpack.decode(m.encode(m.Stop(reason="x")))
    raw["v"] = m.SCHEMA_VERSION + 1
    with pytest.raises(m.ProtocolError, match="schema version"):
        m.decode(msgspec.msgpack.encode(raw))


def test_misaligned_trajectory_is_refused():
    bad = make_traj(loss_mask=m.pack([1, 1, 0], "uint8"))
    with pytest.raises(m.ProtocolError, match="loss_mask has 3 entries"):
        m.decode(m.encode(bad))
    positive = make_traj(logprobs=m.pack([0.5, -1.0, 0.0, -0.25], "float32"))
    with pytest.raises(m.ProtocolError, match="log-probs"):
        m.decode(m.encode(positive))


def test_weight_chunks_round_trip_and_detect_corruption():
    arrays = [("a", np.arange(6, dtype=np.float32).reshape(2, 3)), ("b", np.ones(5, dtype=np.float32)), ("c", np.zeros(3, dtype=np.int64))]
    snap = make_snapshot(7, arrays, chunk_bytes=50)
    assert len(snap.chunks) == 2  # a (24 B) + b (20 B) fit in 50 B; c (24 B) starts a second chunk
    got = []
    for header, bufs in snap.chunks:
        h, tensors = read_chunk([header, *[bytes(b) for b in bufs]])
        assert h.version == 7 and h.num_chunks == 2
        got += tensors
    assert [n for n, _ in got] == ["a", "b", "c"]
    assert np.array_equal(got[0][1], arrays[0][1]) and got[2][1].dtype == np.int64
    header, bufs = snap.chunks[0]
    corrupted = bytearray(bytes(bufs[0]))
    corrupted[0] ^= 0xFF
    with pytest.raises(m.ProtocolError, match="checksum"):
        read_chunk([header, bytes(corrupted), *[bytes(b) for b in bufs[1:]]])
