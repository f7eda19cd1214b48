"""The transformers engine in its own process: the same tokens and log-probs as in the actor's process,
weights streamed into the child, and every way it can fail answered (a dead child, a bad request, a bad
stream, a dead actor)."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from actors.engines.base import SamplingSettings
from actors.engines.hf_engine import HFEngine
from actors.engines.hf_process import HFProcessEngine
from protocol.weights import Rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def child(tiny_model_dir):
    engine = HFProcessEngine(tiny_model_dir, seed=0)
    yield engine
    engine._reaper()


def gather(engine, prompts, settings):
    async def go():
        return await asyncio.gather(*(engine.generate(p, s) for p, s in zip(prompts, settings)), return_exceptions=True)

    return asyncio.run(go())


def test_the_config_key_serves_the_engine_from_a_process_of_its_own(tiny_model_dir):
    from actors.build import build_engine
    from configs.loader import load_config

    assert type(build_engine(load_config([], []), tiny_model_dir)) is HFEngine  # the default
    engine = build_engine(load_config([], ["actor_rollout_ref.rollout.hf_engine_process=true"]), tiny_model_dir)
    try:
        assert type(engine) is HFProcessEngine and engine.proc.poll() is None
    finally:
        engine._reaper()


def test_seeded_and_greedy_requests_give_the_in_process_engines_tokens_and_logprobs(tiny_model_dir, child):
    prompts = [[1, 5, 6, 7, 8], [1, 9], [1, 11, 12, 13, 14, 15, 16], [1, 9]]
    settings = [SamplingSettings(max_tokens=12, temperature=1.0, seed=7), SamplingSettings(max_tokens=7, temperature=0.0),
                SamplingSettings(max_tokens=9, temperature=0.7, top_k=5, seed=3),
                SamplingSettings(max_tokens=9, temperature=0.0, stop_token_ids=(4, 5))]
    ours = gather(child, prompts, settings)
    ref = gather(HFEngine(tiny_model_dir, seed=0), prompts, settings)
    for a, b in zip(ours, ref):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason and a.version == b.version == 0
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
        assert a.extra["last_step"] >= a.extra["first_step"]


def test_weights_stream_into_the_child_whole_and_in_row_pieces_and_a_failed_stream_changes_nothing(tiny_model_dir, child):
    ref = HFEngine(tiny_model_dir, seed=0)
    greedy = SamplingSettings(max_tokens=8, temperature=0.0)
    torch.manual_seed(0)
    new = {k: v + 0.5 * torch.randn_like(v) for k, v in ref.model.state_dict().items() if k != "lm_head.weight"}

    def stream():  # the embedding (the largest tensor) in three row pieces, as protocol.weights sends it
        for name, t in new.items():
            if name == "model.embed_tokens.weight":
                cuts = [0, 10, 100, t.shape[0]]
                for a, b in zip(cuts, cuts[1:]):
                    yield name, Rows(t[a:b].clone(), a, tuple(t.shape))
            else:
                yield name, t

    child.load_weights(stream(), version=3)
    ref.load_weights(new.items(), version=3)
    assert child.version == 3
    (a,), (b,) = gather(child, [[1, 5, 6]], [greedy]), gather(ref, [[1, 5, 6]], [greedy])
    assert a.token_ids == b.token_ids and a.version == 3
    assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)

    def broken():  # the actor's own stream fails midway (a bucket with a bad checksum)
        yield "model.norm.weight", torch.zeros_like(new["model.norm.weight"])
        raise ValueError("bucket 2: checksum mismatch")

    with pytest.raises(ValueError, match="checksum mismatch"):
        child.load_weights(broken(), version=4)
    with pytest.raises(ValueError, match="has shape"):  # the child's engine refuses it
        child.load_weights([("model.norm.weight", torch.zeros(3))], version=5)
    with pytest.raises(ValueError, match="incomplete"):
        child.load_weights([("model.norm.weight", torch.zeros_like(new["model.norm.weight"]))], version=6)
    (c,) = gather(child, [[1, 5, 6]], [greedy])
    assert child.version == 3 and c.version == 3 and c.token_ids == a.token_ids  # v3 still served, untouched


def test_a_bad_request_fails_alone_with_the_engines_error(child):
    ok, bad, empty = gather(child, [[1, 5], [1, 10**6], []], [SamplingSettings(max_tokens=3)] * 3)
    assert len(ok.token_ids) == 3
    assert isinstance(bad, ValueError) and "prompt ids must lie in" in str(bad)
    assert isinstance(empty, ValueError) and "no token ids" in str(empty)


def test_the_childs_death_fails_waiting_and_later_requests_with_its_exit_code(child):
    async def go():
        running = asyncio.ensure_future(child.generate([1, 5], SamplingSettings(max_tokens=100_000)))
        await asyncio.sleep(0.5)
        os.kill(child.proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="exited with code -9"):
            await asyncio.wait_for(running, 30)
        waited = time.monotonic() - t0
        with pytest.raises(RuntimeError, match="exited with code -9"):
            await child.generate([1, 5], SamplingSettings(max_tokens=2))
        return waited

    assert asyncio.run(go()) < 30
    with pytest.raises(RuntimeError, match="exited with code -9"):
        child.load_weights([("model.norm.weight", torch.zeros(8))], version=1)


def test_close_fails_waiting_requests_and_stops_the_child(child):
    async def go():
        running = asyncio.ensure_future(child.generate([1, 5], SamplingSettings(max_tokens=100_000)))
        await asyncio.sleep(0.3)
        await child.close()
        with pytest.raises(RuntimeError, match="closed"):
            await running
        with pytest.raises(RuntimeError, match="closed"):
            await child.generate([1, 5], SamplingSettings(max_tokens=2))

    asyncio.run(go())
    assert child.proc.poll() is not None
    assert not Path(child._dir).exists()


def test_a_child_whose_actor_was_killed_exits_by_itself(tiny_model_dir, tmp_path):
    pid_file = tmp_path / "child.pid"
    actor = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from actors.engines.hf_process import HFProcessEngine
        e = HFProcessEngine({str(tiny_model_dir)!r})
        open({str(pid_file)!r}, "w").write(str(e.proc.pid))
        time.sleep(600)
    """)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert actor.poll() is None and time.monotonic() < deadline, "the actor never started its engine"
            time.sleep(0.2)
        pid = int(pid_file.read_text())
        actor.kill()
        actor.wait(30)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
            assert time.monotonic() < deadline, "the engine process outlived its actor by 30 s"
            time.sleep(0.2)
    finally:
        actor.kill()


def test_a_model_the_child_cannot_load_fails_the_constructor_with_its_exit_code(tmp_path):
    with pytest.raises(RuntimeError, match="exited with code 1 .*to start and load the model"):
        HFProcessEngine(str(tmp_path / "no-such-model"), start_timeout_s=120)
