"""Checkpoints and resume: the learner's whole state, written atomically.

Layout (``trainer.default_local_dir``)::

    checkpoints/global_step_<N>/      N = learner steps done = policy version
        policy.pt, policy_optim.pt    full (unsharded) policy and optimizer state dicts
        critic.pt, critic_optim.pt    the same for the value model (``adv_estimator=gae`` only)
        trainer_state.pt              step, version, LR schedulers, RNG states of every rank,
                                      the adaptive KL coefficient
        coordinator.json              data position + samples granted but not consumed
        ledger.jsonl                  the ledger (samples trained per step) up to step N
        hf/                           the policy as a plain Hugging Face directory
        meta.json                     step, version, world size, time
        COMPLETE                      written last: a checkpoint without it is ignored

Sharding choice: **full state dicts gathered to rank 0** (``torch.distributed.
checkpoint.state_dict`` with ``full_state_dict=True, cpu_offload=True``), so a
checkpoint is a handful of ordinary files that do not depend on the world size
it was written with. Rank 0 writes; on resume *every* rank reads the files and
keeps its own shard (``set_state_dict(full_state_dict=True)``), so with
several learner nodes the run directory must be on a filesystem every node
sees (the usual shared ``/scratch`` on SLURM). ``broadcast_from_rank0`` would
avoid that but hangs with FSDP2 on gloo (CPU) in torch 2.13.

Atomic: everything is written into ``checkpoints/.tmp-global_step_<N>``, the
``COMPLETE`` marker last, then the directory is renamed; a crash at any point
leaves either the previous checkpoints or a ``.tmp-`` directory that the next
save removes. The newest ``trainer.max_ckpt_to_keep`` checkpoints are kept.

Resume (``trainer.resume_mode``): ``auto`` takes the newest complete
checkpoint of the run directory (none: start fresh), ``resume_path`` the one at
``trainer.resume_from_path``, ``disable`` none. The run directory's
``ledger.jsonl`` is reset to the checkpoint's (steps trained after the
checkpoint were lost with the crash; their lines move to
``ledger.rolled_back.jsonl``) and the coordinator continues from the saved data
position, granting again what was granted but not consumed and never granting a
sample of the ledger again. The trainer then publishes the resumed version, so
actors load the resumed weights when they register.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from configs.schema import RelayConfig
from learner.critic import Critic

log = logging.getLogger(__name__)

PREFIX = "global_step_"
MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint that is asked for but missing, incomplete or unreadable."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run directory, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def read_ledger(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class _Resumed:
    path: Path
    version: int
    coordinator: dict
    consumed_ids: set[str]


def trainable_parts(model, optimizer, scheduler, critic) -> dict[str, tuple]:
    """name -> (model, optimizer, scheduler) of everything the learner trains."""
    parts = {"policy": (model, optimizer, scheduler)}
    if isinstance(critic, Critic):
        parts["critic"] = (critic.model, critic.optimizer, critic.scheduler)
    return parts


class Checkpointer:
    """Saves and restores the learner. ``save``/``restore`` are collectives: every rank calls them."""

    def __init__(self, cfg: RelayConfig, run_dir: Path, rank: int, world: int):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.world = world
        self.resumed: _Resumed | None = None
        self.extra: dict = {}
        """Set by ``restore``: the ``extra`` state saved with the checkpoint (empty when fresh)."""

    # ------------------------------------------------------------ save

    def due(self, version: int, total_steps: int) -> bool:
        """Save after step ``version``: every ``save_freq`` steps and after the last one."""
        freq = self.cfg.trainer.save_freq
        return freq > 0 and (version % freq == 0 or version == total_steps)

    def save(self, version: int, parts: dict[str, tuple], export_policy, coordinator, extra: dict | None = None) -> Path | None:
        """Write checkpoint ``global_step_<version>`` of ``parts`` (``trainable_parts``);
        ``export_policy(dir)`` writes the policy as a plain HF directory (a collective every rank
        runs: it streams the shards, ``Trainer.export_policy``); rank 0 passes its coordinator. ``extra``: name -> small state dict of other learner state (the KL
        controller), given back by ``restore`` as ``self.extra``. Returns the path on rank 0."""
        t0 = time.perf_counter()
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        states = {name: get_state_dict(model, optim, options=opts) for name, (model, optim, _) in parts.items()}
        schedulers = {name: sched.state_dict() for name, (_, _, sched) in parts.items()}
        rngs = [None] * self.world if self.rank == 0 else None
        dist.gather_object(_rng_state(), rngs, dst=0)
        hf_stage = checkpoint_dir(self.run_dir) / f".hf-stage-{version}"
        export_policy(hf_stage)
        path = None
        if self.rank == 0:
            path = self._write(version, states, schedulers, rngs, hf_stage, coordinator, extra or {})
            log.info("checkpoint v%d written to %s in %.1fs", version, path, time.perf_counter() - t0)
        dist.barrier()
        return path

    def _write(self, version, states, schedulers, rngs, hf_stage: Path, coordinator, extra) -> Path:
        root = checkpoint_dir(self.run_dir)
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(stale)
        final = root / f"{PREFIX}{version}"
        tmp = root / f".tmp-{PREFIX}{version}"
        tmp.mkdir()
        for name, (model_sd, optim_sd) in states.items():
            torch.save(model_sd, tmp / f"{name}.pt")
            torch.save(optim_sd, tmp / f"{name}_optim.pt")
        torch.save({"version": version, "schedulers": schedulers, "rng": rngs, "extra": extra}, tmp / "trainer_state.pt")
        (tmp / "coordinator.json").write_text(json.dumps(coordinator.state_dict()))
        ledger = self.run_dir / "ledger.jsonl"
        lines = [rec for rec in read_ledger(ledger) if rec["step"] < version]
        (tmp / "ledger.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in lines))
        hf_stage.rename(tmp / "hf")
        meta = {"step": version, "version": version, "world_size": self.world, "time": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        (tmp / MARKER).write_text("")
        if final.exists():  # a re-run of the same step after a resume
            shutil.rmtree(final)
        tmp.rename(final)
        self._prune()
        return final

    def _prune(self) -> None:
        keep = self.cfg.trainer.max_ckpt_to_keep
        for old in list_checkpoints(self.run_dir)[:-keep]:
            shutil.rmtree(old)
            log.info("removed old checkpoint %s (max_ckpt_to_keep=%d)", old, keep)

    # ------------------------------------------------------------ restore

    def _choose(self) -> Path | None:
        t = self.cfg.trainer
        if t.resume_mode == "disable":
            return None
        if t.resume_mode == "auto":
            return latest_checkpoint(self.run_dir)
        path = Path(t.resume_from_path)
        if not (path / MARKER).exists():
            raise CheckpointError(
                f"trainer.resume_from_path={path} is not a complete checkpoint (no {MARKER} marker); "
                f"complete checkpoints of that run: {[p.name for p in list_checkpoints(path.parent.parent)] or 'none'}"
            )
        return path

    def restore(self, parts: dict[str, tuple]) -> int:
        """Load the checkpoint chosen by ``trainer.resume_mode`` into every rank; returns the
        version to continue from (0 when starting fresh)."""
        choice: list = [None]
        if self.rank == 0:
            try:
                found = self._choose()
                choice = [("path", str(found)) if found else None]
            except CheckpointError as e:  # every rank must hear it, not wait in the broadcast
                choice = [("error", str(e))]
        dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return 0
        kind, value = choice[0]
        if kind == "error":
            raise CheckpointError(value)
        path = Path(value)
        if not (path / MARKER).exists():
            raise CheckpointError(
                f"rank {self.rank}: checkpoint {path} is not visible here; with several learner nodes "
                f"trainer.default_local_dir must be on a filesystem every node shares"
            )
        t0 = time.perf_counter()
        state = torch.load(path / "trainer_state.pt", weights_only=False)  # our own files
        for name, (model, optim, sched) in parts.items():
            if not (path / f"{name}.pt").exists():
                raise CheckpointError(f"checkpoint {path} has no {name} state (written with a different algorithm?)")
            set_state_dict(
                model,
                optim,
                model_state_dict=torch.load(path / f"{name}.pt", weights_only=False),
                optim_state_dict=torch.load(path / f"{name}_optim.pt", weights_only=False),
                options=StateDictOptions(full_state_dict=True),
            )
            sched.load_state_dict(state["schedulers"][name])
        rngs = state["rng"]
        if len(rngs) != self.world and self.rank == 0:
            log.warning("checkpoint written by %d ranks, resuming with %d: RNG streams are reassigned", len(rngs), self.world)
        _set_rng_state(rngs[self.rank % len(rngs)])
        version = int(state["version"])
        self.extra = state.get("extra", {})
        if self.rank == 0:
            ledger = read_ledger(path / "ledger.jsonl")
            self._reset_ledger(ledger, version)
            self.resumed = _Resumed(
                path=path,
                version=version,
                coordinator=json.loads((path / "coordinator.json").read_text()),
                consumed_ids={sid for rec in ledger for sid in rec["samples"]},
            )
            log.info("resumed from %s: step %d, policy v%d (%.1fs)", path, version, version, time.perf_counter() - t0)
        dist.barrier()
        return version

    def _reset_ledger(self, ledger: list[dict], version: int) -> None:
        """Make the run's ledger the checkpoint's; later lines were rolled back by the crash."""
        current = self.run_dir / "ledger.jsonl"
        rolled = [rec for rec in read_ledger(current) if rec["step"] >= version]
        if rolled:
            with open(self.run_dir / "ledger.rolled_back.jsonl", "a") as f:
                for rec in rolled:
                    f.write(json.dumps({**rec, "rolled_back_to": version}) + "\n")
            log.warning("ledger: %d step(s) after the checkpoint were not kept; their samples will be trained again", len(rolled))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # rewritten in place (same file), so an append handle opened later sees it
        current.write_text("".join(json.dumps(rec) + "\n" for rec in ledger))

    def restore_coordinator(self, coordinator) -> None:
        """Rank 0: continue the data stream from the checkpoint (before the server starts)."""
        if self.resumed is not None:
            coordinator.load_state_dict(self.resumed.coordinator, self.resumed.consumed_ids)
            log.info(
                "data stream resumed at epoch %d position %d; %d sample(s) granted again, %d consumed",
                self.resumed.coordinator["epoch"], self.resumed.coordinator["pos"],
                len(self.resumed.coordinator["requeue"]), len(self.resumed.consumed_ids),
            )
