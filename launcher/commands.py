"""What the ``relay`` commands do, wiring configs, envs, actors and learner."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from configs.loader import dump_config, load_config, no_effect_notes
from configs.schema import RelayConfig

log = logging.getLogger("relay")
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

TINY = "tiny"
TINY_DIR = Path("runs/models/tiny")


def _say(msg: str) -> None:
    print(f"[relay] {msg}", file=sys.stderr, flush=True)


def resolve_model(cfg: RelayConfig) -> RelayConfig:
    """Replace the model path ``tiny`` with the embedded model (built on first use)."""
    if cfg.actor_rollout_ref.model.path != TINY:
        path = Path(cfg.actor_rollout_ref.model.path)
        if not (path / "config.json").exists():
            raise SystemExit(f"model path {path} is not a Hugging Face model directory (no config.json)")
        return cfg
    from launcher.tiny_model import build_tiny_model

    path = build_tiny_model(TINY_DIR)
    cfg = cfg.model_copy(
        update={
            "actor_rollout_ref": cfg.actor_rollout_ref.model_copy(
                update={"model": cfg.actor_rollout_ref.model.model_copy(update={"path": str(path)})}
            )
        }
    )
    if cfg.critic.model.path == TINY:  # derived from the policy path before it was resolved
        cfg = cfg.model_copy(
            update={"critic": cfg.critic.model_copy(update={"model": cfg.critic.model.model_copy(update={"path": str(path)})})}
        )
    return cfg


def _has_gpu() -> bool:
    from launcher.shape import gpu_count

    return gpu_count() > 0


def fit_to_machine(cfg: RelayConfig) -> RelayConfig:
    """Fill in learner ranks and actors the config leaves open (``launcher.shape``), saying what was chosen."""
    from launcher.shape import fit_shape, gpu_count, usable_cores

    t, r = cfg.trainer, cfg.actor_rollout_ref.rollout
    if t.n_gpus_per_node is not None and r.num_actors is not None:
        return cfg
    ranks, actors, note = fit_shape(t.n_gpus_per_node, r.num_actors, usable_cores(), gpu_count() if t.device != "cpu" else 0)
    _say(note)
    return cfg.model_copy(update={
        "trainer": t.model_copy(update={"n_gpus_per_node": ranks}),
        "actor_rollout_ref": cfg.actor_rollout_ref.model_copy(update={"rollout": r.model_copy(update={"num_actors": actors})}),
    })


def _prepare(cfg: RelayConfig, port: int) -> tuple[RelayConfig, Path]:
    """Resolve the model and the run's shape, fix the learner port, log the no-effect notes, make the run dir."""
    cfg = fit_to_machine(resolve_model(cfg))
    cfg = cfg.model_copy(update={"transport": cfg.transport.model_copy(update={"port": port})})
    run_dir = Path(cfg.trainer.default_local_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for note in no_effect_notes(cfg, _has_gpu()):
        _say(f"note: {note}")
    return cfg, run_dir


def _run_secret(run_dir: Path, create: bool, wait_s: float = 60.0) -> str | None:
    """Name this run's secret in the environment the children inherit (``protocol.auth``).

    One given in the environment wins. Otherwise the run directory's ``relay.secret`` (0600), so
    actors on other nodes can read it from the shared run directory and a resumed run keeps it:
    ``create`` (a learner) makes it when it is missing; otherwise (actors) it must appear within
    ``wait_s`` (the learner writes it as it starts). Returns an error message or None.
    """
    from protocol.auth import ENV_SECRET_FILE, AuthError, new_secret, read_secret_file, secret_from_env, write_secret_file

    path = run_dir / "relay.secret"
    try:
        if secret_from_env() is not None:
            return None
        if create and not path.exists():
            write_secret_file(path, new_secret())
        deadline = time.monotonic() + wait_s
        if not path.exists():
            _say(f"waiting up to {wait_s:.0f}s for the learner to write the run secret {path}")
        while not path.exists():
            if time.monotonic() > deadline:
                return (f"no run secret: the learner writes {path} when it starts; start it first (same "
                        f"trainer.default_local_dir), or set {ENV_SECRET_FILE} to the learner's secret file")
            time.sleep(0.2)
        read_secret_file(path)
        os.environ[ENV_SECRET_FILE] = str(path)
    except AuthError as e:
        return str(e)
    return None


def _write_config(cfg: RelayConfig, path: Path) -> Path:
    """Write the resolved config atomically (several nodes may share the run dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(dump_config(cfg))
    tmp.replace(path)
    return path


def _resume_note(cfg: RelayConfig, run_dir: Path) -> None:
    t = cfg.trainer
    if t.resume_mode == "auto":
        done = sorted(int(p.parent.name.rsplit("_", 1)[1]) for p in (run_dir / "checkpoints").glob("global_step_*/COMPLETE"))
        if done:
            _say(f"resume_mode=auto: continuing from {run_dir / 'checkpoints'}/global_step_{done[-1]}")
    elif t.resume_mode == "resume_path":
        _say(f"resume_mode=resume_path: continuing from {t.resume_from_path}")


def _supervise(children, run_dir: Path, main: str, cfg: RelayConfig, summary_name: str, watch: bool = False) -> int:
    """Run ``children`` to the end; ``watch``: this node holds learner rank 0, whose metrics the
    stall watchdog follows."""
    from launcher.local import Supervisor, Watchdog

    t = cfg.trainer
    from launcher.console import make_panel

    watchdog = Watchdog(run_dir, t.stall_timeout_s, t.stall_action) if watch and t.stall_timeout_s > 0 else None
    sup = Supervisor(children, watchdog=watchdog, panel=make_panel(run_dir, cfg, enabled=watch))
    t0 = time.monotonic()
    status = sup.run(main=main, grace_s=cfg.transport.heartbeat_interval_s * 3 + 30)
    summary = {
        "status": status,
        "failure": sup.failure,
        "wall_s": time.monotonic() - t0,
        "peak_rss_bytes": sup.peak_rss,
        "exit_codes": {c.name: c.returncode for c in children},
        "restarts": [{"child": name, "cause": cause} for name, cause in sup.restarts],
    }
    (run_dir / summary_name).write_text(json.dumps(summary, indent=2))
    _say(f"{'finished' if status == 0 else 'FAILED'} in {summary['wall_s']:.0f}s; peak memory of all processes {sup.peak_rss / 2**30:.2f} GiB")
    return status


def train_local(cfg: RelayConfig) -> int:
    """Run a whole training job on this machine; returns the exit status."""
    from launcher.local import plan_local

    if cfg.trainer.nnodes != 1:
        _say(f"trainer.nnodes={cfg.trainer.nnodes}: local mode runs one node; use `relay slurm` (or `relay learner` per node) for several")
        return 2
    cfg, run_dir = _prepare(cfg, cfg.transport.port)  # 0: the learner binds a free pair itself (no race)
    (run_dir / "learner.json").unlink(missing_ok=True)  # a previous run's address must not mislead the actors
    # every local actor gets work, however long its engine takes to start
    cfg = cfg.model_copy(update={"transport": cfg.transport.model_copy(update={"min_actors": cfg.actor_rollout_ref.rollout.num_actors})})
    config_path = _write_config(cfg, run_dir / "config.yaml")
    if error := _run_secret(run_dir, create=True):
        _say(error)
        return 2
    world = cfg.trainer.n_gpus_per_node
    port = cfg.transport.port
    children = plan_local(config_path, run_dir, world, cfg.actor_rollout_ref.rollout.num_actors, port,
                          max_actor_restarts=cfg.trainer.max_actor_restarts)
    where = f"127.0.0.1:{port}" if port else f"127.0.0.1, ports picked at bind time ({run_dir / 'learner.json'})"
    _say(f"run dir {run_dir}: {world} learner rank(s), {cfg.actor_rollout_ref.rollout.num_actors} actor(s), learner at {where}")
    _resume_note(cfg, run_dir)
    return _supervise(children, run_dir, "learner-0", cfg, "summary.json", watch=True)


def train_sweep(cfg_for, points) -> int:
    """Run one ``train_local`` per sweep point, one after another; stops at the first failure."""
    cfgs = [(p, cfg_for(p)) for p in points]  # every config is valid before anything starts
    results = []
    for i, (point, cfg) in enumerate(cfgs, start=1):
        _say(f"sweep {i}/{len(cfgs)}: {' '.join(point.overrides)} -> {cfg.trainer.default_local_dir}")
        status = train_local(cfg)
        results.append((point.tag, status, cfg.trainer.default_local_dir))
        if status != 0:
            _say(f"sweep stopped: run {point.tag} failed (exit {status}); later runs not started")
            break
    for tag, status, run_dir in results:
        _say(f"  {'ok    ' if status == 0 else 'FAILED'} {tag}: {run_dir}")
    return max(status for _, status, _ in results)


def run_learner_node(cfg: RelayConfig, node_rank: int, master_addr: str, master_port: int | None) -> int:
    """``relay learner``: this node's ``n_gpus_per_node`` learner ranks of a ``nnodes``-node world."""
    from launcher.local import free_port, plan_learner_node

    t = cfg.trainer
    if not 0 <= node_rank < t.nnodes:
        _say(f"--node-rank {node_rank} is outside 0..{t.nnodes - 1} (trainer.nnodes={t.nnodes})")
        return 2
    if t.nnodes > 1 and cfg.transport.port == 0:
        _say("several learner nodes: set transport.port (actors on other nodes must know it), e.g. transport.port=29600")
        return 2
    if t.nnodes > 1 and master_port is None:
        _say("several learner nodes: give --master-port (or MASTER_PORT) for the torch.distributed rendezvous")
        return 2
    if t.nnodes > 1 and cfg.transport.bind_host.startswith("127."):
        _say(f"note: transport.bind_host={cfg.transport.bind_host}: only actors on the first learner node can connect; "
             "use an interface address or 0.0.0.0 for actors on other nodes")
    cfg, run_dir = _prepare(cfg, cfg.transport.port or free_port(pairs=2))
    config_path = _write_config(cfg, run_dir / "configs" / f"learner-node{node_rank}.yaml")
    if node_rank == 0 and (error := _run_secret(run_dir, create=True)):
        _say(error)
        return 2
    per_node = t.n_gpus_per_node
    master_port = master_port or free_port()
    children = plan_learner_node(config_path, run_dir, node_rank, t.nnodes, per_node, master_addr, master_port)
    first = node_rank * per_node
    _say(f"learner node {node_rank}/{t.nnodes}: ranks {first}..{first + per_node - 1} of {t.nnodes * per_node}, "
         f"rendezvous {master_addr}:{master_port}, run dir {run_dir}")
    if node_rank == 0:
        _say(f"learner rank 0 binds {cfg.transport.bind_host}:{cfg.transport.port} (actors: --learner HOST:{cfg.transport.port})")
        _resume_note(cfg, run_dir)
    return _supervise(children, run_dir, f"learner-{first}", cfg, f"summary-learner-node{node_rank}.json", watch=node_rank == 0)


def run_actor_node(cfg: RelayConfig, learner: str, num_actors: int | None, first_index: int) -> int:
    """``relay actor``: actor processes that register with the learner at ``learner`` (HOST:PORT)."""
    from launcher.local import plan_actors

    host, sep, port = learner.rpartition(":")
    if not sep or not host or not port.isdigit():
        _say(f"--learner {learner!r} is not HOST:PORT")
        return 2
    n = num_actors or cfg.actor_rollout_ref.rollout.num_actors
    cfg, run_dir = _prepare(cfg, int(port))
    config_path = _write_config(cfg, run_dir / "configs" / f"actors-{first_index}.yaml")
    if error := _run_secret(run_dir, create=False):
        _say(error)
        return 2
    children = plan_actors(config_path, run_dir, learner, n, first_index, max_restarts=cfg.trainer.max_actor_restarts)
    _say(f"{n} actor(s) actor-{first_index}..actor-{first_index + n - 1} -> learner at {learner}; logs in {run_dir / 'logs'}")
    return _supervise(children, run_dir, f"actor-{first_index}", cfg, f"summary-actors-{first_index}.json")


def build_demonstrations(cfg: RelayConfig, model_path: str, rows: list[dict], tool_fraction: float, seed: int):
    """Token-exact demonstrations: scripted turns played through the real rollout loop."""
    import asyncio
    import random

    from actors.build import build_parts
    from actors.engines.scripted import ScriptedEngine
    from actors.rollout import run_episode
    from envs.tasks import arithmetic

    parts = build_parts(cfg, model_path)
    stop_id = parts.tokenizer.eos_token_id
    rng = random.Random(seed)

    async def one(row):
        turns = arithmetic.demonstration(row, use_tool=rng.random() < tool_fraction)
        ep = await run_episode(ScriptedEngine(parts.tokenizer, turns, stop_id), parts.agent, parts.tokenizer, parts.toolbox, row, parts.limits, parts.sampling)
        if ep.finish_reason != "answer":
            raise RuntimeError(f"demonstration for {row['question']!r} did not finish ({ep.finish_reason})")
        return ep.prompt_ids + ep.response_ids, [0] * len(ep.prompt_ids) + ep.loss_mask

    async def all_rows():
        return [await one(r) for r in rows]

    return asyncio.run(all_rows())


def sft(cfg: RelayConfig, out: Path, tool_fraction: float, steps: int, batch_size: int, lr: float) -> dict:
    from envs.data import load_rows
    from learner.sft import sft_train

    import torch

    torch.set_num_threads(2)
    cfg = resolve_model(cfg)
    model_path = cfg.actor_rollout_ref.model.path
    rows = load_rows(cfg.data.train_files, cfg.data.prompt_key)
    examples = build_demonstrations(cfg, model_path, rows, tool_fraction, cfg.trainer.seed)
    _say(f"sft: {len(examples)} demonstrations ({tool_fraction:.0%} with the tool), {steps} steps, batch {batch_size}, lr {lr}")
    result = sft_train(model_path, str(out), examples, steps, batch_size, lr, seed=cfg.trainer.seed)
    _say(f"sft: wrote {out} (final loss {result['final_loss']:.4f}, {result['seconds']:.0f}s)")
    return result


def evaluate(cfg, model, data, limit, num_chains, temperature, out, dump=None) -> dict:
    from actors.evaluate import evaluate as run_eval
    from envs.data import load_rows

    import torch

    torch.set_num_threads(2)
    cfg = resolve_model(cfg) if model is None else cfg
    model_path = model or cfg.actor_rollout_ref.model.path
    files = [data] if data else cfg.data.val_files
    rows = load_rows(files, cfg.data.prompt_key)
    if limit:
        rows = rows[:limit]
    result = run_eval(cfg, model_path, rows, num_chains=num_chains, temperature=temperature, dump=dump)
    if dump:
        _say(f"wrote {len(rows) * num_chains} samples to {dump}")
    result["model"] = str(model_path)
    print(json.dumps(result, indent=2))
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return result


DEMO_SFT = {"tool_fraction": 0.5, "steps": 2000, "batch_size": 32, "lr": 1e-3}
"""The demo's warm start (``relay sft`` options); tests/test_learning_reward.py starts from the same.
Measured on operands of 1-4 digits: 2000 steps learn to copy operands of any length into the call
and the tool's result into the answer (every greedy tool call right), 600 steps do not."""


DEMO_DIGITS = ((1, 4), (1, 4))
"""Operand lengths (digits of a, of b: a number or an inclusive range) of the demo's problems."""
DEMO_UNSEEN_DIGITS = (5, (1, 4))
"""Operand lengths of the held-out problems of a length never trained on."""
DEMO_TRAIN_ROWS = 4000


def digits_label(a, b) -> str:
    """``((1, 4), 2)`` -> ``"1-4-digit x 2-digit"``."""
    one = lambda d: f"{d[0]}-{d[1]}" if isinstance(d, tuple) else str(d)  # noqa: E731
    return f"{one(a)}-digit x {one(b)}-digit"


def demo_data(out: Path) -> tuple[Path, Path, Path]:
    """The demo's ``train.jsonl``, held-out ``test.jsonl`` (same lengths) and
    ``test_unseen.jsonl`` (operand lengths ``DEMO_UNSEEN_DIGITS``) under ``out``."""
    from envs.tasks import arithmetic

    (a, b), (ua, ub) = DEMO_DIGITS, DEMO_UNSEEN_DIGITS
    train, test = arithmetic.write_splits(out, n_train=DEMO_TRAIN_ROWS, n_test=200, seed=0, a_digits=a, b_digits=b)
    return train, test, arithmetic.write_rows(out / "test_unseen.jsonl", arithmetic.make_rows(200, seed=1, a_digits=ua, b_digits=ub))


def demo(out: Path, steps: int | None, sft_steps: int, overrides: list[str]) -> int:
    """Data -> tiny model -> SFT warm start -> eval -> RL -> eval, printing both accuracies."""
    from launcher.tiny_model import build_tiny_model

    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    train_path, test_path, unseen_path = demo_data(out / "data")
    base = build_tiny_model(out / "tiny-base")
    _say(f"[1/5] data in {out / 'data'}, tiny model in {base}")
    ov = [
        f"data.train_files=[{train_path}]",
        f"data.val_files=[{test_path}]",
        f"trainer.default_local_dir={out / 'rl'}",
        *([f"trainer.total_training_steps={steps}"] if steps else []),
        *overrides,
    ]
    cfg = load_config(["demo"], ov + [f"actor_rollout_ref.model.path={base}"])
    warm = out / "sft"
    if not (warm / "config.json").exists():
        _say("[2/5] supervised warm start")
        sft(cfg, warm, **{**DEMO_SFT, "steps": sft_steps})
    else:
        _say(f"[2/5] reusing warm start {warm}")
    _say("[3/5] held-out accuracy before RL")
    before = evaluate(cfg, str(warm), str(test_path), 0, 1, None, out / "eval_before.json")
    before_unseen = evaluate(cfg, str(warm), str(unseen_path), 0, 1, None, out / "eval_before_unseen.json")
    _say("[4/5] RL: relay train")
    rl_cfg = load_config(["demo"], ov + [f"actor_rollout_ref.model.path={warm}"])
    status = train_local(rl_cfg)
    if status != 0:
        return status
    final = Path(rl_cfg.trainer.default_local_dir) / "final"
    _say("[5/5] held-out accuracy after RL")
    after = evaluate(cfg, str(final), str(test_path), 0, 1, None, out / "eval_after.json")
    after_unseen = evaluate(cfg, str(final), str(unseen_path), 0, 1, None, out / "eval_after_unseen.json")
    summary = {
        "before_accuracy": before["accuracy"],
        "after_accuracy": after["accuracy"],
        "before_tool_use": before["tool_use_rate"],
        "after_tool_use": after["tool_use_rate"],
        "before_accuracy_unseen": before_unseen["accuracy"],
        "after_accuracy_unseen": after_unseen["accuracy"],
        "after_tool_use_unseen": after_unseen["tool_use_rate"],
        "minutes": (time.monotonic() - t0) / 60,
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\nheld-out accuracy (greedy, {before['n_prompts']} problems, {digits_label(*DEMO_DIGITS)} as in training): "
        f"before RL {before['accuracy']:.1%} -> after RL {after['accuracy']:.1%}"
        f"  (tool use {before['tool_use_rate']:.0%} -> {after['tool_use_rate']:.0%}; {summary['minutes']:.1f} min)"
        f"\nunseen length ({before_unseen['n_prompts']} problems, {digits_label(*DEMO_UNSEEN_DIGITS)}): "
        f"before RL {before_unseen['accuracy']:.1%} -> after RL {after_unseen['accuracy']:.1%}"
        f"  (tool use {before_unseen['tool_use_rate']:.0%} -> {after_unseen['tool_use_rate']:.0%})"
    )
    return 0
