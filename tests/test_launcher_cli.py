"""The `relay` command line: lazy imports, sweep expansion, SLURM rendering (no processes beyond `--help`)."""

import subprocess
import sys

import pytest

from configs.loader import load_config
from launcher.slurm import SlurmOptions, render
from launcher.sweep import SweepError, expand_sweep, run_overrides, split_values

COMMANDS = ["train", "learner", "actor", "slurm", "plot", "eval", "sft", "build-model", "demo"]


def test_help_of_every_command_imports_no_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from launcher.cli import app\n"
        "runner = CliRunner()\n"
        f"for args in [['--help']] + [[c, '--help'] for c in {COMMANDS!r}]:\n"
        "    r = runner.invoke(app, args)\n"
        "    assert r.exit_code == 0, (args, r.output)\n"
        "    assert 'Usage' in r.output, (args, r.output)\n"
        "heavy = [m for m in ('torch', 'vllm', 'transformers', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_relay_help_lists_the_commands():
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for c in COMMANDS:
        assert c in proc.stdout


def test_sweep_expands_one_run_per_value():
    points = expand_sweep(["actor_rollout_ref.actor.optim.lr=1e-4,2e-4,5e-4"])
    assert [p.tag for p in points] == ["lr=1e-4", "lr=2e-4", "lr=5e-4"]
    assert [p.overrides for p in points] == [
        ("actor_rollout_ref.actor.optim.lr=1e-4",),
        ("actor_rollout_ref.actor.optim.lr=2e-4",),
        ("actor_rollout_ref.actor.optim.lr=5e-4",),
    ]
    assert run_overrides(points[1], "demo", "runs/relay/demo/") == [
        "actor_rollout_ref.actor.optim.lr=2e-4",
        "trainer.experiment_name=demo-lr=2e-4",
        "trainer.default_local_dir=runs/relay/demo/lr=2e-4",
    ]


def test_sweep_product_of_two_keys_and_bracketed_values():
    points = expand_sweep(["agent.num_chains=2,4", "agent.tools=[calculator],[calculator,answer]"])
    assert len(points) == 4
    assert points[1].overrides == ("agent.num_chains=2", "agent.tools=[calculator,answer]")
    assert points[1].tag == "num_chains=2,tools=calculator_answer"
    assert split_values("a,'b,c',[d,e]") == ["a", "'b,c'", "[d,e]"]


@pytest.mark.parametrize("bad", ["lr", "lr=", "lr=1,,2", "lr=1,1", "x=[1,2"])
def test_bad_sweeps_are_refused(bad):
    with pytest.raises(SweepError):
        expand_sweep([bad])


def test_every_sweep_run_loads_with_its_own_run_dir():
    base = load_config(["demo"], [])
    dirs = set()
    for p in expand_sweep(["algorithm.adv_estimator=grpo,rloo"]):
        cfg = load_config(["demo"], run_overrides(p, base.trainer.experiment_name, base.trainer.default_local_dir))
        assert cfg.algorithm.adv_estimator == p.overrides[0].split("=")[1]
        assert cfg.trainer.experiment_name == f"demo-{p.tag}"
        dirs.add(cfg.trainer.default_local_dir)
    assert len(dirs) == 2


def test_slurm_script_for_two_learner_nodes_and_two_actor_nodes(tmp_path):
    overrides = ["trainer.nnodes=2", "trainer.n_gpus_per_node=4", "data.train_files=[/data/a b.jsonl]"]
    cfg = load_config(["demo"], overrides)
    points = expand_sweep(["actor_rollout_ref.actor.optim.lr=1e-4,2e-4"])
    script = render(cfg, ["demo"], overrides, points, SlurmOptions(actor_nodes=2, sbatch_extra=("--partition=gpu",)), workdir=tmp_path)
    assert "#SBATCH --nodes=4" in script
    assert "#SBATCH --array=0-1" in script
    assert "#SBATCH --partition=gpu" in script
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    assert 'MASTER_ADDR="${NODES[0]}"' in script
    assert "'data.train_files=[/data/a b.jsonl]'" in script  # shell-quoted
    assert "trainer.default_local_dir=runs/relay/demo/lr=2e-4" in script
    assert script.count("srun ") == 2  # one loop over learner nodes, one over actor nodes
    # the learner waits for every actor of the job before granting work (2 nodes x 1 actor here)
    assert 'OVERRIDES=("transport.min_actors=2" ' in script
    proc = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert proc.returncode == 0, proc.stderr


def test_slurm_dry_run_prints_the_script():
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "slurm", "-c", "demo", "trainer.nnodes=2", "--actor-nodes", "1", "--dry-run"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#!/bin/bash")
    assert "--node-rank" in proc.stdout and "--learner" in proc.stdout
