"""`relay train` with an external agent: the tiny model trained through the actor's OpenAI endpoint.

The agent (written below into the test's directory) is a plain ``openai``
client loop with function calling and a calculator tool; it asks for the
engine's ids (``return_token_ids``) and records them. After 3 steps, every
trajectory the learner trained on (``trainer.dump_batches``) is checked token
by token against those records. Half the episodes take a history-rewriting
path (the harness restarts from a summary), which splits the episode in two
training sequences: both must reach the learner, as two trajectories of one
chain, each equal to what the engine sampled; the actor logs the count.
"""

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from envs.tasks import arithmetic

AGENT = '''
import json, os, uuid

TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
          "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]


def record(episode, r, new_sequence):
    path = os.path.join(os.environ["RECORD_DIR"], f"{os.getpid()}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps({"episode": episode, "prompt": r.model_extra["prompt_token_ids"],
                            "sampled": r.choices[0].model_extra["token_ids"], "new_sequence": new_sequence}) + "\\n")


EPISODES = [0]


async def run(row, client):
    EPISODES[0] += 1
    rewrite = EPISODES[0] % 2 == 0  # every second episode of this actor
    episode = uuid.uuid4().hex
    messages = [{"role": "user", "content": row["question"]}]
    answer = None
    for turn in range(2):
        r = await client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, extra_body={"return_token_ids": True})
        record(episode, r, turn == 0)
        msg = r.choices[0].message
        messages.append(msg.model_dump(exclude_none=True))
        if msg.tool_calls:
            for c in msg.tool_calls:
                messages.append({"role": "tool", "tool_call_id": c.id, "content": "Error: only numbers"})
        else:
            answer = msg.content
            messages.append({"role": "user", "content": "Check with the calculator."})
    if rewrite:  # the harness summarises: a history that does not extend the session's
        messages = [{"role": "user", "content": row["question"] + " Your last answer: " + str(answer)[:20]}]
        r = await client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, extra_body={"return_token_ids": True})
        record(episode, r, True)
        answer = r.choices[0].message.content
    return answer
'''


def episodes_from(records):
    """Recorded requests grouped into sequences: (episode, prompt ids, [sampled ids per turn])."""
    out, current = [], {}
    for rec in records:  # concurrent episodes interleave: each record names its episode
        if rec["new_sequence"]:
            current[rec["episode"]] = (rec["episode"], rec["prompt"], [rec["sampled"]])
            out.append(current[rec["episode"]])
        else:
            current[rec["episode"]][2].append(rec["sampled"])
    return out


def sampled_runs(t):
    """A trajectory's prompt and the runs of its sampled ids (mask 1), in order."""
    mask, ids = t.loss_mask.numpy(), t.response_ids.numpy()
    runs, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            if mask[start] == 1:
                runs.append(ids[start:i].tolist())
            start = i
    return t.prompt_ids.numpy().tolist(), runs


@pytest.mark.slow
def test_external_agent_trains_through_the_endpoint_token_exact(tmp_path, tiny_model_dir):
    from learner.replay import load_batches

    train, _ = arithmetic.write_splits(tmp_path / "data", n_train=32, n_test=4)
    (tmp_path / "agent.py").write_text(AGENT)
    records = tmp_path / "records"
    records.mkdir()
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "launcher.cli", "train", "-c", "demo",
        f"actor_rollout_ref.model.path={tiny_model_dir}", f"data.train_files=[{train}]", "data.val_files=[]",
        "agent.agent_type=external", f"agent.entrypoint={tmp_path / 'agent.py'}:run",
        "trainer.total_training_steps=3", f"trainer.default_local_dir={run}", "trainer.dump_batches=true",
        "trainer.n_gpus_per_node=1", "actor_rollout_ref.rollout.num_actors=1",
        "data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "agent.num_chains=4", "agent.max_tokens_per_turn=12", "actor_rollout_ref.rollout.response_length=160",
        "actor_rollout_ref.rollout.max_concurrent_episodes=8",
        "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=-1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=800, env={**os.environ, "RECORD_DIR": str(records)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]

    episode_of, sequences_of = {}, Counter()  # a recorded sequence -> its episode; sequences per episode
    for path in records.glob("*.jsonl"):
        for episode, prompt, sampled in episodes_from([json.loads(l) for l in path.read_text().splitlines()]):
            episode_of[json.dumps([prompt, sampled])] = episode
            sequences_of[episode] += 1
    chains = {}  # (step, sample, chain) -> its trajectories, by segment
    for step, batch in enumerate(load_batches(run / "batches")):
        for t in batch:
            chains.setdefault((step, t.sample_id, t.chain), []).append(t)
    assert len(chains) == 3 * 2 * 4  # every chain of every group, each whole
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    kinds = {"split": 0, "whole": 0}
    for where, segs in chains.items():
        segs.sort(key=lambda t: t.segment)
        assert [(t.segment, t.num_segments) for t in segs] == [(k, len(segs)) for k in range(len(segs))], where
        assert len({(t.reward, t.final_answer) for t in segs}) == 1  # every segment carries the episode's outcome
        # each segment is a sequence the engine sampled, token for token: same prompt, same sampled runs in order
        keys = [json.dumps(sampled_runs(t)) for t in segs]
        assert all(k in episode_of for k in keys), where
        [episode] = {episode_of[k] for k in keys}  # one episode's sequences ...
        assert sequences_of[episode] == len(segs), where  # ... all of them
        prompt, runs = sampled_runs(segs[0])
        assert len(runs) == 2 and "Your last answer" not in tok.decode(prompt)  # the second request extended the first
        if len(segs) == 2:
            assert "Your last answer" in tok.decode(segs[1].prompt_ids.numpy().tolist())  # the rewritten history
            kinds["split"] += 1
        else:
            assert len(segs) == 1
            kinds["whole"] += 1
    assert kinds["split"] > 0 and kinds["whole"] > 0, kinds
    # the learner logs the share of its episodes that came split
    assert [s["episode/split_rate"] for s in steps] == pytest.approx([
        sum(len(segs) > 1 for (step, _, _), segs in chains.items() if step == i) / 8 for i in range(3)])

    log = (run / "logs" / "actor-0.log").read_text()
    counts = re.findall(r"(\d+) episodes, (\d+) splits", log)
    assert counts, log[-2000:]
    episodes, splits = map(int, counts[-1])
    assert episodes >= len(chains) and kinds["split"] <= splits <= episodes
