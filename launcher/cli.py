"""``relay``: the command line. Thin and lazy: nothing heavy is imported before a command runs.

Every command that takes a config accepts presets (``-c configs/demo.yaml`` or
a bundled name like ``demo``) and dotted ``key=value`` overrides, the way
verl/Hydra users write them.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import os

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Relay: asynchronous RL for tool-using LLM agents.")

PRESETS = typer.Option(None, "--config", "-c", help="YAML preset(s), later ones win (path or bundled name, e.g. demo).")
OVERRIDES = typer.Argument(
    None,
    help="Dotted overrides, e.g. algorithm.adv_estimator=grpo agent.tools=\\[calculator] +experiment=quick_test.",
)


SWEEP = typer.Option(
    None, "--sweep", help="key=v1,v2,...: one run per value (several --sweep: every combination), each with its own experiment name and run dir."
)
MULTIRUN = typer.Option(
    False, "--multirun", "-m", help="Hydra style: every override with a comma-separated value (a=1,2) is a --sweep."
)


def _say(msg: str) -> None:
    typer.echo(f"[relay] {msg}", err=True)


def _load(presets, overrides, quiet: bool = False):
    from configs.loader import ConfigError, load_config_with_notes

    try:
        cfg, notes = load_config_with_notes(presets or [], overrides or [])
    except ConfigError as e:
        lines = str(e).splitlines()
        typer.echo(f"config error: {lines[0]}" if len(lines) == 1 else f"config errors ({len(lines)}):", err=True)
        for line in lines if len(lines) > 1 else []:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(2)
    for note in [] if quiet else notes:
        _say(f"note: {note}")
    return cfg


def _checked(cfg, **kwargs):
    """``launcher.preflight`` on ``cfg``: every problem on one line each and exit 2, else the
    config with resolved model paths (the notes are shown)."""
    from launcher.preflight import PreflightError, preflight

    try:
        cfg, notes = preflight(cfg, **kwargs)
    except PreflightError as e:
        typer.echo(f"error: {e.problems[0]}" if len(e.problems) == 1 else f"errors ({len(e.problems)}):", err=True)
        for line in e.problems if len(e.problems) > 1 else []:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(2)
    for note in notes:
        _say(f"note: {note}")
    return cfg


def _split_multirun(overrides, sweep, multirun: bool):
    """With ``--multirun``, overrides whose value lists several values become sweeps."""
    if not multirun:
        return overrides, sweep
    from launcher.sweep import split_values

    plain, sweeps = [], list(sweep or [])
    for text in overrides or []:
        key, sep, value = text.partition("=")
        (sweeps if sep and len(split_values(value)) > 1 else plain).append(text)
    return plain, sweeps


def _sweep_points(sweep):
    from launcher.sweep import SweepError, expand_sweep

    try:
        return expand_sweep(sweep or [])
    except SweepError as e:
        typer.echo(f"sweep error: {e}", err=True)
        raise typer.Exit(2)


@app.command()
def train(
    overrides: Optional[List[str]] = OVERRIDES,
    presets: Optional[List[str]] = PRESETS,
    sweep: Optional[List[str]] = SWEEP,
    multirun: bool = MULTIRUN,
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    check: bool = typer.Option(False, "--check", help="Only check the config, data, model, tools and reward, then exit."),
):
    """Train locally: learner ranks and actors as processes on this machine."""
    overrides, sweep = _split_multirun(overrides, sweep, multirun)
    cfg = _load(presets, overrides)
    points = _sweep_points(sweep)
    if print_config:
        from configs.loader import dump_config

        typer.echo(dump_config(cfg))
        return
    if not points:
        cfg = _checked(cfg)
        if check:
            _say("checks passed")
            return
        from launcher import commands

        raise typer.Exit(commands.train_local(cfg))
    from launcher.sweep import run_overrides

    base = cfg.trainer
    # every sweep point is checked before the first run starts
    cfgs = {p.tag: _checked(_load(presets, [*(overrides or []), *run_overrides(p, base.experiment_name, base.default_local_dir)], quiet=True))
            for p in points}
    if check:
        _say(f"checks passed ({len(cfgs)} runs)")
        return
    from launcher import commands

    raise typer.Exit(commands.train_sweep(lambda p: cfgs[p.tag], points))


@app.command()
def learner(
    overrides: Optional[List[str]] = OVERRIDES,
    presets: Optional[List[str]] = PRESETS,
    node_rank: int = typer.Option(0, "--node-rank", help="This node's index among the trainer.nnodes learner nodes."),
    master_addr: str = typer.Option(
        os.environ.get("MASTER_ADDR", "127.0.0.1"), "--master-addr", help="Rendezvous host: learner node 0 (env MASTER_ADDR)."
    ),
    master_port: Optional[int] = typer.Option(
        int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT", "").isdigit() else None,
        "--master-port",
        help="Rendezvous port (env MASTER_PORT); needed with several nodes.",
    ),
):
    """Run this node's learner ranks (ranks node_rank*n_gpus_per_node ...); rank 0 also serves the actors."""
    cfg = _checked(_load(presets, overrides), resume=node_rank == 0, lengths=node_rank == 0)
    from launcher import commands

    raise typer.Exit(commands.run_learner_node(cfg, node_rank, master_addr, master_port))


@app.command()
def actor(
    overrides: Optional[List[str]] = OVERRIDES,
    presets: Optional[List[str]] = PRESETS,
    learner_addr: str = typer.Option(..., "--learner", help="HOST:PORT of learner rank 0 (its transport.port)."),
    num_actors: Optional[int] = typer.Option(None, "--num-actors", help="Actor processes here (default rollout.num_actors)."),
    first_index: int = typer.Option(0, "--first-index", help="Number of the first actor (ids actor-N...), unique across nodes."),
):
    """Run actor processes that register with a running learner and fetch its current weights."""
    cfg = _checked(_load(presets, overrides), resume=False, lengths=False, data=False)
    from launcher import commands

    raise typer.Exit(commands.run_actor_node(cfg, learner_addr, num_actors, first_index))


@app.command()
def slurm(
    overrides: Optional[List[str]] = OVERRIDES,
    presets: Optional[List[str]] = PRESETS,
    sweep: Optional[List[str]] = SWEEP,
    actor_nodes: int = typer.Option(0, "--actor-nodes", help="Nodes running only actors (0: actors share learner node 0)."),
    actors_per_node: Optional[int] = typer.Option(None, "--actors-per-node", help="Default: rollout.num_actors spread over the actor nodes."),
    bind_host: str = typer.Option("0.0.0.0", "--bind-host", help="Interface learner rank 0 binds (transport.bind_host)."),
    master_port: int = typer.Option(29500, "--master-port", help="torch.distributed rendezvous port."),
    learner_port: Optional[int] = typer.Option(None, "--learner-port", help="Learner ZMQ port (default transport.port or 29600)."),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", help="#SBATCH --gpus-per-node (default n_gpus_per_node on cuda)."),
    sbatch: Optional[List[str]] = typer.Option(None, "--sbatch", help="Extra #SBATCH line, e.g. --sbatch=--partition=gpu."),
    job_name: Optional[str] = typer.Option(None, "--job-name"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the script instead of submitting it."),
):
    """Render an sbatch script for trainer.nnodes learner nodes plus actor nodes, and submit it."""
    cfg = _load(presets, overrides)
    points = _sweep_points(sweep)
    from launcher.slurm import SlurmError, SlurmOptions, render, submit
    from launcher.sweep import run_overrides

    for p in points:  # every sweep point must load before anything is submitted
        _load(presets, [*(overrides or []), *run_overrides(p, cfg.trainer.experiment_name, cfg.trainer.default_local_dir)])
    opts = SlurmOptions(
        actor_nodes=actor_nodes,
        actors_per_node=actors_per_node,
        bind_host=bind_host,
        master_port=master_port,
        learner_port=learner_port,
        gpus_per_node=gpus_per_node,
        sbatch_extra=tuple(sbatch or ()),
        job_name=job_name,
    )
    try:
        script = render(cfg, presets or [], overrides or [], points, opts)
        if dry_run:
            typer.echo(script, nl=False)
            return
        path, out = submit(script, cfg, opts)
    except SlurmError as e:
        typer.echo(f"slurm error: {e}", err=True)
        raise typer.Exit(1)
    typer.echo(f"script: {path}")
    typer.echo(out)


@app.command()
def plot(
    run_dir: Path = typer.Argument(..., help="Run directory (holds metrics.jsonl)."),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default RUN_DIR/curves.png)."),
):
    """Training curves (reward, validation, loss, KL/mismatch, entropy, staleness, time) as a PNG."""
    from launcher.plot import plot_run

    try:
        typer.echo(plot_run(run_dir, out))
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"plot error: {e}", err=True)
        raise typer.Exit(1)


@app.command()
def sft(
    overrides: Optional[List[str]] = OVERRIDES,
    presets: Optional[List[str]] = PRESETS,
    out: Path = typer.Option(..., help="Where to write the warm-started HF model directory."),
    tool_fraction: float = typer.Option(0.3, help="Share of demonstrations that call the tool."),
    steps: int = typer.Option(1200, help="Optimizer steps."),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(1e-3),
):
    """Supervised warm start on demonstrations generated by the environment itself."""
    cfg = _checked(_load(presets, overrides), resume=False, lengths=False)
    from launcher import commands

    commands.sft(cfg, out, tool_fraction=tool_fraction, steps=steps, batch_size=batch_size, lr=lr)


@app.command("eval")
def eval_(
    overrides: Optional[List[str]] = OVERRIDES,
    presets: Optional[List[str]] = PRESETS,
    model: Optional[str] = typer.Option(None, help="Model directory (default: actor_rollout_ref.model.path)."),
    data: Optional[str] = typer.Option(None, help="Dataset file (default: data.val_files)."),
    limit: int = typer.Option(0, help="Evaluate only the first N rows (0 = all)."),
    num_chains: int = typer.Option(1, help="Samples per prompt; >1 also reports pass@k."),
    temperature: Optional[float] = typer.Option(None, help="Default: rollout.val_temperature (0 = greedy)."),
    out: Optional[Path] = typer.Option(None, help="Also write the result as JSON here."),
    dump: Optional[Path] = typer.Option(None, help="Write one JSON line per sample here (prompt, response, tool calls, reward)."),
):
    """Accuracy of a model on a dataset, through the same agent, tools and reward as training."""
    cfg = _load(presets, overrides)
    files = [data] if data else cfg.data.val_files
    if not files:
        typer.echo("error: nothing to evaluate: give --data FILE or set data.val_files", err=True)
        raise typer.Exit(2)
    cfg = _checked(cfg, data_files=files, model=model, resume=False)  # --model resolves like the config's
    from launcher import commands

    commands.evaluate(cfg, None, files[0] if data else None, limit, num_chains, temperature, out, dump)


@app.command()
def keys(
    word: Optional[str] = typer.Argument(None, help="Show only keys containing this text (e.g. lr, rollout)."),
    aliases: bool = typer.Option(False, "--aliases", help="Also list the verl / AgentFly / Agent-Tunix spellings."),
):
    """List the config keys with their defaults and descriptions."""
    from configs.loader import all_keys, canonical_key, key_help, schema_default

    docs = key_help()
    for key in all_keys(aliases=aliases):
        if word and word not in key:
            continue
        canon = canonical_key(key)
        where = f" -> {canon}" if canon != key else f" = {schema_default(key)!r}"
        typer.echo(f"{key}{where}\n    {docs[canon].splitlines()[0] if docs[canon] else ''}")


@app.command("build-model")
def build_model(out: Path = typer.Argument(..., help="Directory to write."), seed: int = 0):
    """Build the embedded tiny Qwen2 model and tokenizer as an HF directory."""
    from launcher.tiny_model import build_tiny_model

    typer.echo(build_tiny_model(out, seed=seed))


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Demo directory (data, models, run)."),
    steps: Optional[int] = typer.Option(None, help="RL steps (default: the demo preset's)."),
    sft_steps: int = typer.Option(2000, help="Warm-start steps (launcher.commands.DEMO_SFT)."),
    overrides: Optional[List[str]] = OVERRIDES,
):
    """The whole demo: build the tiny model, warm-start it, RL with a calculator, evaluate before/after."""
    from launcher import commands

    raise typer.Exit(commands.demo(out, steps, sft_steps, overrides or []))


if __name__ == "__main__":
    app()
