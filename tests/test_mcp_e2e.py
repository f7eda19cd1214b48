"""`relay train` with an MCP stdio server's tools (a server written here), 3 steps on the tiny model.

The prompts the learner trained on carry the server's tool (the tiny chat
template lists tool names in the system prompt); the server was started by
the actor process (and by the learner and launcher, to list its tools), and no
server process is left when the run ends.
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from envs.tasks import arithmetic

pytest.importorskip("mcp.server.mcpserver")

SERVER = textwrap.dedent('''
    import json, os
    from mcp.server.mcpserver import MCPServer

    with open(os.path.join(os.environ["RECORD_DIR"], f"{os.getpid()}.json"), "w") as f:
        json.dump({"pid": os.getpid(), "parent": open(f"/proc/{os.getppid()}/cmdline").read().replace("\\\\0", " ")}, f)

    server = MCPServer("e2e")

    @server.tool()
    def multiply(a: int, b: int) -> str:
        """Multiply two integers."""
        return str(a * b)

    if __name__ == "__main__":
        server.run("stdio")
''')


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


@pytest.mark.slow
def test_relay_train_with_an_mcp_server_tool(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from learner.replay import load_batches

    train, _ = arithmetic.write_splits(tmp_path / "data", n_train=32, n_test=4)
    (tmp_path / "server.py").write_text(SERVER)
    records = tmp_path / "records"
    records.mkdir()
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "launcher.cli", "train", "-c", "demo",
        f"actor_rollout_ref.model.path={tiny_model_dir}", f"data.train_files=[{train}]", "data.val_files=[]",
        "agent.tools=[mcp:e2e,calculator]", f"agent.mcp_servers.e2e.command=[{sys.executable},{tmp_path / 'server.py'}]",
        f"agent.mcp_servers.e2e.env.RECORD_DIR={records}",  # a stdio server gets the SDK's default environment plus env
        "trainer.total_training_steps=3", f"trainer.default_local_dir={run}", "trainer.dump_batches=true",
        "trainer.n_gpus_per_node=1", "actor_rollout_ref.rollout.num_actors=1",
        "data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "agent.num_chains=4", "agent.max_tokens_per_turn=12", "actor_rollout_ref.rollout.response_length=64",
        "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=-1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    trained = [t for b in load_batches(run / "batches") for t in b]
    assert trained and all("Tools: multiply, calculator" in tok.decode(t.prompt_ids.numpy().tolist()) for t in trained)

    starts = [json.loads(p.read_text()) for p in records.glob("*.json")]
    assert any("actors.main" in s["parent"] for s in starts), [s["parent"][:120] for s in starts]
    deadline = time.monotonic() + 10
    while any(alive(s["pid"]) for s in starts) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(s["pid"]) for s in starts)
