"""`relay slurm` end to end on one machine: stand-in sbatch/srun/scontrol run the rendered job locally.

2 learner nodes (1 rank each, a 2-rank torch.distributed group over gloo) and
2 actor nodes (1 actor each), every "node" being 127.0.0.1.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from envs.tasks import arithmetic
from launcher.local import free_port

REPO = Path(__file__).resolve().parents[1]

SBATCH = """#!/bin/bash
# stand-in sbatch: runs the job here, now, with a SLURM-like environment
script="${@: -1}"
nodes=$(sed -n 's/^#SBATCH --nodes=//p' "$script")
export SLURM_JOB_ID=4242 SLURM_JOB_NODELIST="node[1-$nodes]" SLURM_JOB_NUM_NODES="$nodes"
bash "$script" > "$(dirname "$script")/job-4242.out" 2>&1
rc=$?
echo "Submitted batch job 4242"
exit $rc
"""

SCONTROL = """#!/bin/bash
# stand-in scontrol: every node of the allocation is this machine
[ "$1 $2" = "show hostnames" ] || { echo "stand-in scontrol knows only 'show hostnames'" >&2; exit 1; }
for i in $(seq 1 "$SLURM_JOB_NUM_NODES"); do echo 127.0.0.1; done
"""

SRUN = """#!/bin/bash
# stand-in srun: drop srun's own options, run the step here
while [[ "$1" == -* ]]; do shift; done
exec "$@"
"""


@pytest.mark.slow
def test_slurm_job_two_learner_nodes_two_actor_nodes(tmp_path, tiny_model_dir):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"sbatch": SBATCH, "scontrol": SCONTROL, "srun": SRUN}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    train, test = arithmetic.write_splits(tmp_path / "data", n_train=32, n_test=4)
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "launcher.cli", "slurm", "-c", "demo",
        f"actor_rollout_ref.model.path={tiny_model_dir}",
        f"data.train_files=[{train}]", f"data.val_files=[{test}]", f"trainer.default_local_dir={run}",
        "trainer.nnodes=2", "trainer.n_gpus_per_node=1", "trainer.total_training_steps=3",
        "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4", "agent.num_chains=2",
        "agent.max_tokens_per_turn=16", "actor_rollout_ref.rollout.response_length=48",
        "actor_rollout_ref.rollout.num_actors=2", "actor_rollout_ref.rollout.max_concurrent_episodes=4",
        "trainer.save_freq=-1", "trainer.test_freq=-1",
        "trainer.val_before_train=true", "trainer.logger=[jsonl]",
        "--actor-nodes", "2", "--bind-host", "127.0.0.1",
        "--master-port", str(free_port()), "--learner-port", str(free_port(pairs=2)),
    ]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    job_out = next((run / "slurm").glob("job-*.out"), None)
    detail = (job_out.read_text()[-4000:] if job_out else "") + proc.stderr[-2000:]
    assert proc.returncode == 0, detail
    assert "Submitted batch job 4242" in proc.stdout

    script = next((run / "slurm").glob("*.sbatch")).read_text()
    assert "#SBATCH --nodes=4" in script

    # every role came up and finished cleanly
    logs = run / "logs"
    assert {p.stem for p in logs.glob("*.log")} == {"learner-0", "learner-1", "actor-0", "actor-1"}
    for node in (0, 1):
        summary = json.loads((run / f"summary-learner-node{node}.json").read_text())
        assert summary["exit_codes"] == {f"learner-{node}": 0}, summary
    for first in (0, 1):
        summary = json.loads((run / f"summary-actors-{first}.json").read_text())
        assert summary["exit_codes"] == {f"actor-{first}": 0}, summary

    # the two learner nodes formed one 2-rank group; both actors registered and served it
    rank1 = (logs / "learner-1.log").read_text()
    assert "learner rank 1 done at v3" in rank1
    rank0 = (logs / "learner-0.log").read_text()
    assert "actor actor-0 registered" in rank0 and "actor actor-1 registered" in rank0
    assert "learner listening: control tcp://127.0.0.1:" in rank0
    actors = json.loads((run / "actors.json").read_text())
    assert set(actors) == {"actor-0", "actor-1"}, actors
    # 3 steps x 4 prompts x 2 chains trained (plus any stale ones dropped), 4 validation episodes;
    # which actor does which is up to timing: one may be busy validating while the other trains
    assert sum(a["trajectories"] for a in actors.values()) >= 24, actors
    assert sum(a["validation_trajectories"] for a in actors.values()) == 4, actors
    assert all(a["trajectories"] + a["validation_trajectories"] > 0 for a in actors.values()), actors

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert metrics[0]["val/n"] == 4 and 0.0 <= metrics[0]["val/accuracy"] <= 1.0
    ledger = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    trained = [s for r in ledger for s in r["samples"]]
    assert len(trained) == len(set(trained)) == 12
