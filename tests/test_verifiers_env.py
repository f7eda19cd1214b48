"""verifiers environments (``env.type=verifiers``): two small environments defined here, played by
verifiers' own harness against the actor's endpoint.

``relay_vf_plain`` is single-turn (reward 1 when the reply contains the task's
answer); ``relay_vf_tool`` gives every task a ``calculator`` toolset (an MCP
server that verifiers starts per episode). The episodes run on a scripted
engine with the tiny model's tokenizer, so the turns are known: the ids the
runner hands the learner must be, token for token, the ones the engine
returned (mask 1) and the observation ids between them (mask 0).
"""

import asyncio
import json
import os
import sys
import textwrap

import pytest

pytest.importorskip("verifiers.v1", reason="the verifiers extra: pip install 'relay-rl[verifiers]'")
pytest.importorskip("aiohttp")

from actors.endpoint import Endpoint
from actors.engines.base import SamplingSettings
from actors.external import VerifiersRunner
from actors.rollout import EpisodeLimits
from envs import verifiers_env
from tests.test_endpoint import RecordingEngine, runs

PLAIN = '''
import json
import os

import verifiers.v1 as vf


class MathData(vf.TaskData):
    answer: str = ""


class Config(vf.TasksetConfig):
    count: int = 3
    endless: bool = False


class MathTask(vf.Task[MathData]):
    @vf.reward(weight=1.0)
    async def correct(self, trace: vf.Trace) -> float:
        replies = trace.assistant_messages
        if os.environ.get("RECORD_DIR"):  # what the harness saw, for the test to compare with the learner's batches
            with open(os.path.join(os.environ["RECORD_DIR"], f"{os.getpid()}.jsonl"), "a") as f:
                f.write(json.dumps({"prompt": self.data.prompt, "replies": [
                    {"content": m.content, "tool_calls": bool(getattr(m, "tool_calls", None))} for m in replies]}) + "\\n")
        return 1.0 if replies and self.data.answer in str(replies[-1].content or "") else 0.0


class PlainTaskset(vf.Taskset[MathTask, Config]):
    def __init__(self, config):
        super().__init__(config)
        self.INFINITE = config.endless  # verifiers' flag for a taskset whose load() never ends

    def load(self):
        i = 0
        while self.config.endless or i < self.config.count:
            yield MathTask(MathData(prompt=f"What is 2+{i}?", answer=str(2 + i)), self.config.task)
            i += 1


__all__ = ["PlainTaskset"]
'''

TOOL = '''
import verifiers.v1 as vf
from relay_vf_plain import MathData, MathTask
from relay_vf_tool.tools import Calculator


class ToolTask(MathTask):
    @classmethod
    def toolsets(cls, config):
        return [Calculator(vf.ToolsetConfig())]


class ToolTaskset(vf.Taskset[ToolTask, vf.TasksetConfig]):
    def load(self):
        for a, b in [(12, 30), (7, 6)]:
            yield ToolTask(MathData(prompt=f"What is {a} * {b}? Use the calculator.", answer=str(a * b)), self.config.task)


__all__ = ["ToolTaskset"]
'''

TOOLS = '''
import verifiers.v1 as vf


class Calculator(vf.Toolset[vf.ToolsetConfig]):
    TOOL_PREFIX = None  # advertised as plain `calculator`

    @vf.tool
    async def calculator(self, expression: str) -> str:
        """Evaluate an arithmetic expression."""
        a, op, b = expression.split()
        return str(int(a) * int(b) if op == "*" else int(a) + int(b))


if __name__ == "__main__":
    Calculator.run()
'''


@pytest.fixture(scope="module")
def vf_packages(tmp_path_factory):
    """The two environments as packages on ``sys.path`` and ``PYTHONPATH`` (verifiers starts the
    toolset as ``python -m relay_vf_tool.tools``)."""
    root = tmp_path_factory.mktemp("vf_envs")
    for name, files in {"relay_vf_plain": {"__init__.py": PLAIN},
                        "relay_vf_tool": {"__init__.py": TOOL, "tools.py": TOOLS}}.items():
        (root / name).mkdir()
        for file, text in files.items():
            (root / name / file).write_text(textwrap.dedent(text))
    sys.path.insert(0, str(root))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(root) + (os.pathsep + old if old else "")
    yield root
    sys.path.remove(str(root))
    if old is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = old


@pytest.fixture
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_rows_are_the_tasks_in_order(vf_packages):
    rows = verifiers_env.task_rows("relay_vf_plain", {"count": 2}, None, "question")
    assert rows == [{"question": "What is 2+0?", "vf_idx": 0}, {"question": "What is 2+1?", "vf_idx": 1}]
    assert verifiers_env.task_rows("relay_vf_plain", {}, 2, "prompt") == [
        {"prompt": "What is 2+0?", "vf_idx": 0}, {"prompt": "What is 2+1?", "vf_idx": 1}]


def test_endless_taskset_needs_a_size(vf_packages):
    with pytest.raises(verifiers_env.VerifiersError, match="endless; set env.size"):
        verifiers_env.task_rows("relay_vf_plain", {"endless": True}, None, "question")
    rows = verifiers_env.task_rows("relay_vf_plain", {"endless": True}, 5, "question")
    assert [r["vf_idx"] for r in rows] == [0, 1, 2, 3, 4] and rows[4]["question"] == "What is 2+4?"


def test_bad_ids_and_args_and_rows_are_clear_errors(vf_packages):
    with pytest.raises(verifiers_env.VerifiersError, match="env.id=no_such_env_pkg"):
        verifiers_env.load_env("no_such_env_pkg")
    with pytest.raises(verifiers_env.VerifiersError, match="bad env.args"):
        verifiers_env.load_env("relay_vf_plain", {"count": "many"})
    env = verifiers_env.load_env("relay_vf_plain")
    tasks = verifiers_env.tasks_of(env, "relay_vf_plain", None)
    assert verifiers_env.task_for(tasks, {"question": "What is 2+1?", "vf_idx": 1}, "question", "x") is tasks[1]
    with pytest.raises(verifiers_env.VerifiersError, match="no task position"):
        verifiers_env.task_for(tasks, {"question": "What is 2+1?"}, "question", "x")
    with pytest.raises(verifiers_env.VerifiersError, match="no task position"):
        verifiers_env.task_for(tasks, {"vf_idx": 3}, "question", "x")
    with pytest.raises(verifiers_env.VerifiersError, match="loaded different environments"):
        verifiers_env.task_for(tasks, {"question": "What is 9+9?", "vf_idx": 1}, "question", "x")


def test_relative_pythonpath_is_made_absolute_for_the_toolset_processes(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["envs_here", str(tmp_path / "abs")]))
    verifiers_env.prepare_process()
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [str(tmp_path / "envs_here"), str(tmp_path / "abs")]
    assert os.environ[verifiers_env.API_KEY_VAR]


def test_config_and_preflight_name_the_keys(vf_packages, tiny_model_dir):
    from configs.loader import load_config
    from launcher.preflight import PreflightError, preflight

    with pytest.raises(ValueError, match="env.type=verifiers needs env.id"):
        load_config(["demo"], ["env.type=verifiers"])
    cfg = load_config(["demo"], ["env.type=verifiers", "env.id=no_such_env_pkg", f"actor_rollout_ref.model.path={tiny_model_dir}",
                               "data.val_files=[x.jsonl]"])
    with pytest.raises(PreflightError) as e:
        preflight(cfg)
    text = str(e.value)
    assert "env.id=no_such_env_pkg: cannot import" in text and "data.val_files is not supported" in text


def _play(tok, env_id, rows, turns):
    """Each row's episode through a ``VerifiersRunner`` on a scripted engine, one after the other."""
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    engine = RecordingEngine(tok, turns, im_end)
    settings = SamplingSettings(max_tokens=64, stop_token_ids=(im_end,))
    lim = EpisodeLimits(max_turns=4, max_tokens_per_turn=64, max_response_tokens=600, max_context=2048)

    async def go():
        runner = VerifiersRunner(Endpoint(engine, tok, None), env_id, {}, None, "question", timeout_s=300)
        try:
            return [await runner.run_episode(engine, None, tok, None, row, lim, settings) for row in rows], runner
        finally:
            await runner.close()

    episodes, runner = asyncio.run(go())
    return episodes, engine, runner


@pytest.mark.slow
def test_single_turn_episode_is_scored_by_the_rubric_token_exact(vf_packages, tok):
    rows = verifiers_env.task_rows("relay_vf_plain", {}, 2, "question")
    episodes, engine, runner = _play(tok, "relay_vf_plain", rows, ["It is 2.", "It is 7."])
    assert [ep.reward["reward"] for ep in episodes] == [1.0, 0.0]  # "2" in "It is 2."; "3" not in "It is 7."
    assert [ep.reward["vf_reward/correct"] for ep in episodes] == [1.0, 0.0]
    assert [ep.final_answer for ep in episodes] == ["It is 2.", "It is 7."]
    for ep, prompt, sampled in zip(episodes, engine.prompts, engine.returned):
        assert ep.prompt_ids == prompt and ep.response_ids == sampled and ep.loss_mask == [1] * len(sampled)
        assert ep.num_turns == 1 and ep.splits == 0 and not ep.truncated
        assert "What is 2+" in tok.decode(ep.prompt_ids)
    assert len(set(runner._free_keys)) == 1  # the second episode reused the first one's session URL


@pytest.mark.slow
def test_tool_episode_runs_the_toolset_and_records_every_turn(vf_packages, tok):
    call = "<tool_call>\n" + json.dumps({"name": "calculator", "arguments": {"expression": "12 * 30"}}) + "\n</tool_call>"
    rows = verifiers_env.task_rows("relay_vf_tool", {}, 1, "question")
    [ep], engine, _ = _play(tok, "relay_vf_tool", rows, [call, "12 * 30 = 360."])
    assert ep.reward["reward"] == 1.0 and ep.num_turns == 2 and ep.tool_calls == ["calculator"]
    # the second request extended the first: one sequence, sampled runs = the engine's turns, in order
    parts = runs(ep.loss_mask, ep.response_ids)
    assert [p for m, p in parts if m == 1] == engine.returned
    assert ep.prompt_ids == engine.prompts[0]
    [(zero, observation)] = [(m, p) for m, p in parts if m == 0]
    assert "360" in tok.decode(observation)  # the toolset's answer, rendered as the tool message
    assert engine.prompts[1] == ep.prompt_ids + ep.response_ids[: len(engine.returned[0]) + len(observation)]
    rendered = tok.decode(ep.prompt_ids)
    assert "Tools: calculator" in rendered  # the toolset's tool reached the prompt (the tiny template lists names)


@pytest.mark.slow
def test_relay_train_on_a_verifiers_environment(vf_packages, tmp_path, tiny_model_dir):
    """3 steps of `relay train` on ``relay_vf_tool`` (its tasks, toolset and rubric) with the tiny
    model: every sampled run the learner trained on is a reply the harness received, in order."""
    import re
    import subprocess

    from transformers import AutoTokenizer

    from learner.replay import load_batches

    records = tmp_path / "records"
    records.mkdir()
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "launcher.cli", "train", "-c", "demo",
        f"actor_rollout_ref.model.path={tiny_model_dir}", "data.val_files=[]",
        "env.type=verifiers", "env.id=relay_vf_tool",
        "trainer.total_training_steps=3", "trainer.total_epochs=3",  # 2 tasks: one step an epoch
        f"trainer.default_local_dir={run}", "trainer.dump_batches=true",
        "trainer.n_gpus_per_node=1", "actor_rollout_ref.rollout.num_actors=1",
        "data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "agent.num_chains=4", "agent.max_tokens_per_turn=12", "actor_rollout_ref.rollout.response_length=160",
        "actor_rollout_ref.rollout.max_concurrent_episodes=8",
        "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=-1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env={**os.environ, "RECORD_DIR": str(records)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]

    received = []  # (task prompt, the replies the harness got, in order)
    for path in records.glob("*.jsonl"):
        received += [json.loads(line) for line in path.read_text().splitlines()]

    def same(reply, text):  # a parsed tool call came from a <tool_call> block; any other reply is the text
        # (an empty reply, the stop token alone, reaches the harness with content None)
        return "<tool_call>" in text if reply["tool_calls"] else (reply["content"] or "") == text

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    trained = 0
    for batch in load_batches(run / "batches"):
        for t in batch:
            prompt = tok.decode(t.prompt_ids.numpy().tolist())
            [task] = [p for p in ("What is 12 * 30?", "What is 7 * 6?") if p in prompt]
            assert "Tools: calculator" in prompt
            texts = [tok.decode(ids[:-1] if ids and ids[-1] == im_end else ids, skip_special_tokens=False)  # as served
                     for mask, ids in runs(t.loss_mask.numpy().tolist(), t.response_ids.numpy().tolist()) if mask == 1]
            assert any(rec["prompt"] == task + " Use the calculator." and len(rec["replies"]) == len(texts)
                       and all(same(r, x) for r, x in zip(rec["replies"], texts)) for rec in received), (task, texts)
            trained += 1
    assert trained == 3 * 2 * 4
    assert all(s["reward/mean"] >= 0.0 for s in steps)
    log = (run / "logs" / "actor-0.log").read_text()
    assert re.search(r"verifiers:relay_vf_tool: \d+ episodes", log), log[-2000:]
