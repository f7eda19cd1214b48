"""``relay slurm``: render an sbatch script from a Relay config and submit it.

The script (``launcher/templates/slurm.sbatch.j2``) asks for
``trainer.nnodes`` learner nodes plus ``--actor-nodes`` actor nodes. Inside the
allocation, node names come from ``scontrol show hostnames $SLURM_JOB_NODELIST``:
the first node is ``MASTER_ADDR`` (torch.distributed rendezvous) and hosts
learner rank 0, whose ZMQ endpoint the actors connect to. One ``srun`` step per
node runs ``relay learner --node-rank i`` or ``relay actor --learner
MASTER_ADDR:PORT``; the first step to fail stops the others.

Every role gets the same presets and overrides as typed here (plus the
endpoints), so every node resolves the same config. A ``--sweep`` becomes a
job array: task ``i`` runs sweep point ``i`` with its own experiment name and
run directory. No torch import here.
"""

from __future__ import annotations

import datetime
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from configs.schema import RelayConfig
from launcher.sweep import SweepPoint, run_overrides

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


class SlurmError(RuntimeError):
    """Bad ``relay slurm`` options or a failed ``sbatch``."""


@dataclass(frozen=True)
class SlurmOptions:
    actor_nodes: int = 0
    """Nodes running only actors; 0 = actors share the first learner node."""
    actors_per_node: int | None = None
    """Actors per actor node; None = ``rollout.num_actors`` spread over the actor nodes."""
    bind_host: str = "0.0.0.0"
    """Interface learner rank 0 binds (other nodes must reach it)."""
    master_port: int = 29500
    """torch.distributed rendezvous port on the first node."""
    learner_port: int | None = None
    """Learner ZMQ port; None = ``transport.port`` or 29600."""
    gpus_per_node: int | None = None
    """``#SBATCH --gpus-per-node``; None = ``n_gpus_per_node`` when ``trainer.device=cuda``."""
    sbatch_extra: tuple[str, ...] = ()
    """More ``#SBATCH`` lines, e.g. ``--partition=gpu``, ``--time=04:00:00``."""
    job_name: str | None = None


def _job_name(cfg: RelayConfig, opts: SlurmOptions) -> str:
    return opts.job_name or f"relay-{cfg.trainer.experiment_name}"


def render(cfg: RelayConfig, presets: list[str], overrides: list[str], points: list[SweepPoint], opts: SlurmOptions, workdir: Path | None = None) -> str:
    """The sbatch script for ``cfg`` (loaded from ``presets`` + ``overrides``) as text."""
    import jinja2

    t = cfg.trainer
    if opts.actor_nodes < 0:
        raise SlurmError(f"--actor-nodes must be >= 0, got {opts.actor_nodes}")
    # relay slurm cannot see the nodes the job will get: a shape left open is --gpus-per-node ranks
    # (else 1) per learner node and one actor per actor node, written into the job's overrides
    per_node = t.n_gpus_per_node or opts.gpus_per_node or 1
    num_actors = cfg.actor_rollout_ref.rollout.num_actors or max(1, opts.actor_nodes)
    per_actor_node = opts.actors_per_node or (-(-num_actors // opts.actor_nodes) if opts.actor_nodes else num_actors)
    learner_port = opts.learner_port or cfg.transport.port or 29600
    gpus = opts.gpus_per_node if opts.gpus_per_node is not None else (per_node if t.device == "cuda" else None)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        comment_start_string="{##",  # bash has `${#array[@]}`
        comment_end_string="##}",
    )
    env.filters["q"] = lambda v: shlex.quote(str(v))
    point_views = [
        {"tag": p.tag, "run_overrides": run_overrides(p, t.experiment_name, t.default_local_dir)} for p in points
    ]
    return env.get_template("slurm.sbatch.j2").render(
        rendered_at=datetime.datetime.now().isoformat(timespec="seconds"),
        job_name=_job_name(cfg, opts),
        nnodes=t.nnodes,
        per_node=per_node,
        actor_nodes=opts.actor_nodes,
        actors_per_node=per_actor_node,
        total_actors=per_actor_node * max(opts.actor_nodes, 1),
        total_nodes=t.nnodes + opts.actor_nodes,
        log_dir=str(Path(t.default_local_dir).absolute() / "slurm"),
        gpus_per_node=gpus,
        points=point_views,
        sbatch_extra=list(opts.sbatch_extra),
        workdir=str((workdir or Path.cwd()).absolute()),
        relay=shlex.join([sys.executable, "-m", "launcher.cli"]),
        master_port=opts.master_port,
        learner_port=learner_port,
        presets=presets,
        overrides=overrides,
        bind_host=opts.bind_host,
    )


def submit(script: str, cfg: RelayConfig, opts: SlurmOptions) -> tuple[Path, str]:
    """Write the script under ``<run dir>/slurm/`` and ``sbatch`` it; returns (path, sbatch output)."""
    out_dir = Path(cfg.trainer.default_local_dir) / "slurm"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{_job_name(cfg, opts)}-{stamp}.sbatch"
    path.write_text(script)
    path.chmod(0o755)
    try:
        proc = subprocess.run(["sbatch", str(path)], capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise SlurmError(f"sbatch not found on PATH; the script is at {path} (or use --dry-run)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"sbatch {path} did not return within 600s") from None
    if proc.returncode != 0:
        raise SlurmError(f"sbatch {path} failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return path, proc.stdout.strip()
