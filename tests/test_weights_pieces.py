"""Tensors larger than a bucket travel as row pieces (``protocol/weights.py:buckets_of``, ``Rows``).

A 10 x 4 tensor with a bucket of 3 rows' bytes leaves as rows [0, 3), [3, 6),
[6, 9), [9, 10), each piece described by its own ``TensorMeta`` and covered by
its bucket's checksum; it reassembles bit for bit (bf16 and fp32) through the
wire encoding; a corrupted or missing piece is refused and the HF engine keeps
its weights; after a split update the HF engine holds exactly the learner's
tensors; the learner gathers such a tensor from 2 FSDP ranks piece by piece.
"""

import os

import pytest
import torch

from protocol import messages as m
from protocol.transport import CHECKSUM
from protocol.weights import (
    FilesystemPublisher,
    FilesystemReceiver,
    Rows,
    WeightsRejected,
    buckets_of,
    tensor_bytes,
    verified_tensors,
    whole,
)


def wire(named, bucket_bytes: int):
    """What a zmq receiver yields for ``named``: every bucket encoded as a ``WeightsChunk`` header
    plus its buffers' bytes, decoded and verified again (a lazy stream, like the receivers')."""
    for i, b in enumerate(buckets_of(named, bucket_bytes)):
        header = m.decode(m.encode(m.WeightsChunk(version=1, chunk=i, num_chunks=0, tensors=b.metas, checksum=b.checksum,
                                                  checksum_algo=CHECKSUM)))
        yield from verified_tensors(header, [bytearray(buf) for buf in b.buffers()], f"chunk {i}")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bytes(tensor_bytes(a.contiguous())) == bytes(tensor_bytes(b.contiguous()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_10_row_tensor_with_a_3_row_bucket_travels_as_4_pieces_and_reassembles_bit_exact(dtype):
    big = (torch.arange(40, dtype=torch.float32).reshape(10, 4) / 7 - 2).to(dtype)  # values bf16 must round
    small = torch.full((2, 4), -0.1).to(dtype)
    row = 4 * big.element_size()  # 8 bytes in bf16, 16 in fp32
    buckets = list(buckets_of([("big", big), ("small", small)], 3 * row))
    # each bucket: (name, shape of its bytes, whole shape or None, first row)
    assert [[(mt.name, mt.shape, mt.full_shape, mt.row_start) for mt in b.metas] for b in buckets] == [
        [("big", [3, 4], [10, 4], 0)],
        [("big", [3, 4], [10, 4], 3)],
        [("big", [3, 4], [10, 4], 6)],
        [("big", [1, 4], [10, 4], 9), ("small", [2, 4], None, 0)],  # the last row shares its bucket
    ]
    assert [b.nbytes for b in buckets] == [3 * row] * 4

    got = list(wire([("big", big), ("small", small)], 3 * row))
    assert [(n, type(t).__name__) for n, t in got] == [("big", "Rows")] * 4 + [("small", "Tensor")]
    assert [(t.start, t.stop) for _, t in got[:4]] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert same_bits(got[1][1].data, big[3:6])
    joined = list(whole(got))
    assert [n for n, _ in joined] == ["big", "small"]
    assert same_bits(joined[0][1], big) and same_bits(joined[1][1], small)


def test_a_smaller_tensor_that_does_not_fit_the_room_left_starts_the_next_bucket_whole():
    a, b = torch.zeros(5, 4), torch.ones(4, 4)  # 80 and 64 bytes, bucket 96 bytes
    assert [[(mt.name, mt.shape, mt.full_shape) for mt in bk.metas] for bk in buckets_of([("a", a), ("b", b)], 96)] == [
        [("a", [5, 4], None)],
        [("b", [4, 4], None)],
    ]
    # a piece fills the room another tensor left: 1 row of 'c' after 'a' (80 + 16 = 96), then 96 + 48
    c = torch.arange(40.0).reshape(10, 4)
    buckets = list(buckets_of([("a", a), ("c", c)], 96))
    assert [[(mt.name, mt.shape, mt.row_start) for mt in bk.metas] for bk in buckets] == [
        [("a", [5, 4], 0), ("c", [1, 4], 0)],
        [("c", [6, 4], 1)],
        [("c", [3, 4], 7)],
    ]
    assert torch.equal(dict(whole(it for bk in buckets for it in bk.named()))["c"], c)


def test_pieces_that_skip_rows_or_stop_early_are_refused():
    c = torch.arange(40.0).reshape(10, 4)
    pieces = [("c", Rows(c[0:3], 0, (10, 4))), ("c", Rows(c[3:6], 3, (10, 4))), ("c", Rows(c[6:10], 6, (10, 4)))]
    with pytest.raises(WeightsRejected, match=r"tensor c: piece at row 6, expected row 3"):
        list(whole([pieces[0], pieces[2]]))
    with pytest.raises(WeightsRejected, match=r"tensor c: the stream ended after row 6 of 10"):
        list(whole(pieces[:2]))
    with pytest.raises(WeightsRejected, match=r"tensor c: first piece starts at row 3"):
        list(whole(pieces[1:]))
    with pytest.raises(ValueError, match=r"are not a piece of \[10, 4\]"):  # a header that cannot be a piece
        m.TensorMeta(name="c", dtype="float32", shape=[3, 4], nbytes=48, full_shape=[10, 4], row_start=8)


def test_chunks_from_senders_that_predate_pieces_decode_as_whole_tensors():
    old = m.encode(m.WeightsChunk(version=1, chunk=0, num_chunks=1, checksum=0,
                                  tensors=[m.TensorMeta(name="a", dtype="float32", shape=[2], nbytes=8)]))
    header = m.decode(old)
    assert header.tensors[0].full_shape is None and header.tensors[0].row_start == 0


def test_filesystem_shards_carry_pieces_and_read_back_bit_exact(tmp_path):
    big = torch.randn(10, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    pub = FilesystemPublisher(tmp_path, bucket_bytes=3 * 8)
    pub.publish(1, [("big", big), ("bias", torch.ones(3))])
    assert len(list((tmp_path / "v1").glob("*.safetensors"))) == 4
    got = FilesystemReceiver(tmp_path).read(1)
    assert [(n, (t.start, t.stop) if isinstance(t, Rows) else None) for n, t in got] == [
        ("big", (0, 3)), ("big", (3, 6)), ("big", (6, 9)), ("big", (9, 10)), ("bias", None)]
    assert same_bits(dict(whole(got))["big"], big)


def served_state(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.model.state_dict().items() if k != "lm_head.weight"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hf_engine_ends_with_exactly_the_learners_tensors_after_a_split_update(tiny_model_dir, dtype):
    from actors.engines.hf_engine import HFEngine

    engine = HFEngine(tiny_model_dir, dtype=dtype)
    base = served_state(engine)
    gen = torch.Generator().manual_seed(1)
    learner = [(n, (t.float() + torch.randn(t.shape, generator=gen) * 1e-2).to(dtype) if t.is_floating_point() else t)
               for n, t in base.items()]
    bucket = 10 << 10  # 10 KiB: the 512 x 128 embedding and every 128 x 128 projection go in pieces
    items = list(wire(learner, bucket))
    split = {n for n, t in items if isinstance(t, Rows)}
    assert "model.embed_tokens.weight" in split and len(split) > 5
    assert max(t.data.numel() * t.data.element_size() for _, t in items if isinstance(t, Rows)) <= bucket
    engine.load_weights(iter(items), version=1)
    assert engine.version == 1
    state = engine.model.state_dict()
    for name, want in learner:
        assert same_bits(state[name].detach(), want), name
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()  # still tied


def test_a_corrupt_or_missing_piece_is_refused_and_the_hf_engine_keeps_its_weights(tiny_model_dir):
    from actors.engines.hf_engine import HFEngine

    engine = HFEngine(tiny_model_dir)
    base = served_state(engine)
    v2 = [(n, t + 0.5) for n, t in base.items()]
    bucket = 10 << 10

    def corrupted():
        for i, b in enumerate(buckets_of(v2, bucket)):
            bufs = [bytearray(buf) for buf in b.buffers()]
            if b.metas[0].name == "model.embed_tokens.weight" and b.metas[0].row_start > 0:
                bufs[0][5] ^= 0x01  # one bit of a middle piece of the embedding, after hashing
            yield from verified_tensors(m.WeightsChunk(version=2, chunk=i, num_chunks=0, tensors=b.metas, checksum=b.checksum,
                                                       checksum_algo=CHECKSUM), bufs, f"weights v2 chunk {i}")

    with pytest.raises(WeightsRejected, match=r"weights v2 chunk \d+: xxh3_64 checksum mismatch"):
        engine.load_weights(corrupted(), version=2)

    # the stream stops after the embedding's first piece: it never counts as received
    items = list(wire(v2, bucket))
    first = next(i for i, (n, t) in enumerate(items) if n == "model.embed_tokens.weight")
    with pytest.raises(ValueError, match=r"weights v3 are incomplete: missing .*model.embed_tokens.weight"):
        engine.load_weights(iter(items[: first + 1]), version=3)

    assert engine.version == 0
    state = engine.model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in base.items())  # nothing of v2 or v3 is served


def _pieces_rank(rank: int, model_dir: str, port: int, out: str) -> None:
    """One of 2 gloo ranks: the tiny model sharded by FSDP2, streamed whole and in 5 KiB pieces."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from learner.model import fsdp_shard, stream_full_tensors

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        model = fsdp_shard(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), torch.device("cpu"))
        full = list(stream_full_tensors(model, torch.bfloat16))
        pieces = list(stream_full_tensors(model, torch.bfloat16, piece_bytes=5 << 10))
        if rank == 0:
            torch.save({"full": full, "pieces": [(n, (t.data, t.start, t.shape) if isinstance(t, Rows) else t) for n, t in pieces]}, out)
    finally:
        dist.destroy_process_group()


def test_the_learner_gathers_a_tensor_larger_than_a_bucket_piece_by_piece_from_two_fsdp_ranks(tmp_path, tiny_model_dir):
    from launcher.local import free_port
    from tests.learner_support import run_ranks

    out = tmp_path / "pieces.pt"
    run_ranks(_pieces_rank, (tiny_model_dir, free_port(), str(out)), "2 FSDP ranks")
    res = torch.load(out)
    pieces = [(n, Rows(*t) if isinstance(t, tuple) else t) for n, t in res["pieces"]]
    emb = [t for n, t in pieces if n == "model.embed_tokens.weight"]
    # 512 x 128 bf16 = 128 KiB, rows of 256 bytes: 20 rows per 5 KiB piece, 26 pieces (the last 12 rows)
    assert [(t.start, t.stop) for t in emb] == [(a, min(a + 20, 512)) for a in range(0, 512, 20)]
    assert all(t.data.numel() * 2 <= 5 << 10 for _, t in pieces if isinstance(t, Rows))
    joined = list(whole(pieces))
    assert [n for n, _ in joined] == [n for n, _ in res["full"]]
    for (name, a), (_, b) in zip(joined, res["full"]):
        assert same_bits(a, b), name


def test_trainer_publish_sends_the_embedding_in_pieces_and_the_hf_actor_serves_the_learners_weights(tmp_path, tiny_model_dir):
    """``Trainer.publish`` at ``weights_bucket_mb=1``: tensors over 128 KiB (1 MiB / PIECES_PER_BUCKET)
    are gathered in row pieces (fp32: the 512 x 128 embedding, 256 KiB, in two of 256 rows; each
    layer's 384 x 128 gate/up projections, 192 KiB, in 256 + 128 rows; its 128 x 384 down
    projection, 1536-byte rows, in 85 + 43) and the HF engine that fetched them over zmq serves
    exactly the learner's weights."""
    from actors.engines.hf_engine import HFEngine
    from learner.model import PIECES_PER_BUCKET, stream_full_tensors
    from tests.learner_support import learner_config, make_trajs, sync_engine_over_zmq, trainer_world_1

    cfg = learner_config(tiny_model_dir, tmp_path, "transport.weights_bucket_mb=1", "transport.weights_window=0")
    engine = HFEngine(tiny_model_dir, seed=0)
    with trainer_world_1(cfg) as trainer:
        trainer.train_step(trainer.step_batch(make_trajs()).batch)
        trainer.version += 1
        trainer.publish()
        pieces = [(n, (t.start, t.stop)) for n, t in stream_full_tensors(trainer.model, torch.float32, None, (1 << 20) // PIECES_PER_BUCKET)
                  if isinstance(t, Rows)]
        mlp = [(f"model.layers.{i}.mlp.{proj}_proj.weight", rows) for i in range(2)
               for proj, cut in (("gate", 256), ("up", 256), ("down", 85)) for rows in ((0, cut), (cut, 384 if cut == 256 else 128))]
        assert pieces == [("model.embed_tokens.weight", (0, 256)), ("model.embed_tokens.weight", (256, 512)), *mlp]
        sync_engine_over_zmq(engine, cfg.transport.port, "actor-p")
        learner = list(stream_full_tensors(trainer.model, torch.float32))
    assert engine.version == 1
    state = engine.model.state_dict()
    for name, want in learner:
        assert same_bits(state[name].detach(), want), name
