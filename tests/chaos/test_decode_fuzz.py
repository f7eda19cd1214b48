"""Decoding is total: any byte string gives a message or a ProtocolError, never anything else."""

import collections

import pytest

from protocol import messages as m
from tests.chaos.frames import BAD_DTYPES, fuzz_frames, real_messages


def test_every_real_message_round_trips():
    for msg in real_messages():
        assert m.decode(m.encode(msg)) == msg


def test_ten_thousand_mutated_frames_raise_only_protocol_errors():
    outcomes = collections.Counter()
    others = []
    for frame in fuzz_frames(seed=1234, n=12_000):
        try:
            m.decode(frame)
            outcomes["decoded"] += 1
        except m.ProtocolError:
            outcomes["protocol_error"] += 1
        except BaseException as e:  # noqa: BLE001 - this is what the test counts
            others.append(f"{type(e).__name__}: {e}"[:200])
    assert others == [], others[:10]
    assert sum(outcomes.values()) == 12_000
    assert outcomes["protocol_error"] > 9_000  # nearly every mutation is caught, not silently accepted


@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_packed_arrays_with_dtypes_outside_the_allow_list_are_refused(dtype):
    import msgspec

    t = real_messages()[-1]
    obj = msgspec.to_builtins(t, builtin_types=(bytes,))
    obj["logprobs"]["dtype"] = dtype
    with pytest.raises(m.ProtocolError):
        m.decode(msgspec.msgpack.encode(obj))


def test_tensor_meta_must_fit_its_bytes():
    import msgspec

    chunk = next(x for x in real_messages() if isinstance(x, m.WeightsChunk))
    for change in ({"nbytes": 255}, {"shape": [16, -8]}, {"dtype": "V0"}, {"shape": [1] * 9}):
        obj = msgspec.to_builtins(chunk, builtin_types=(bytes,))
        obj["tensors"][0].update(change)
        with pytest.raises(m.ProtocolError):
            m.decode(msgspec.msgpack.encode(obj))


def test_trajectory_ids_outside_the_vocabulary_and_unpublished_versions_are_refused():
    t = real_messages()[-1]
    m.check_trajectory_bounds(t, vocab_size=100, max_version=4)
    with pytest.raises(m.ProtocolError, match="outside the vocabulary"):
        m.check_trajectory_bounds(t, vocab_size=89, max_version=4)  # prompt holds id 89
    with pytest.raises(m.ProtocolError, match="newer than"):
        m.check_trajectory_bounds(t, vocab_size=100, max_version=3)


def test_sampled_tokens_need_a_version_and_rewards_must_be_finite():
    import msgspec

    t = real_messages()[-1]
    bad_version = msgspec.structs.replace(t, versions=m.pack([3, -1, -1, -1, 4, 4], "int32"))
    with pytest.raises(m.ProtocolError, match="version"):
        m.decode(m.encode(bad_version))
    bad_reward = msgspec.structs.replace(t, reward=float("nan"))
    with pytest.raises(m.ProtocolError, match="finite"):
        m.decode(m.encode(bad_reward))


def test_deeply_nested_frames_are_protocol_errors():
    frame = b"\x83\xa4kind\xaawork_grant\xa5items\x91\x83\xa9sample_id\xa10\xa3row" + b"\x81\xa1a" * 50_000 + b"\x80"
    with pytest.raises(m.ProtocolError, match="nested"):
        m.decode(frame)
