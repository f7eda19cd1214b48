"""Validation between learner steps, on the actors, through the coordinator.

Rank 0 only. A round validates one policy version: every row of
``data.val_files`` becomes ``rollout.val_n`` ``WorkItem(validation=True, group_size=1)``
(sample id ``val<version>:<row>``, plus ``:<k>`` with several); the coordinator grants them before any
training work, at most ``data.val_batch_size`` per grant and only to actors
serving that version; actors sample them at ``rollout.val_temperature`` and
score them with the training reward; the coordinator routes them to this
round, never into a training batch. The learner waits for the round (at most
``transport.recv_timeout_s``) and logs ``val/*`` with the step's metrics.

When: before the first step if ``trainer.val_before_train``, and after every
``trainer.test_freq`` steps and after the last step (``test_freq > 0``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import numpy as np

from configs.schema import RelayConfig
from protocol import messages as m

log = logging.getLogger(__name__)


def validation_metrics(trajs: list[m.Trajectory]) -> dict[str, float]:
    """``val/accuracy`` (reward >= 1, as ``relay eval``), reward mean and episode shape."""
    n = len(trajs)
    rewards = [t.reward for t in trajs]
    tools = Counter()
    for t in trajs:
        tools.update(t.stats.tool_calls)
    out = {
        "val/n": n,
        "val/accuracy": sum(r >= 1.0 for r in rewards) / n,
        "val/reward_mean": float(np.mean(rewards)),
        "val/tool_use_rate": sum(1 for t in trajs if t.stats.tool_calls) / n,
        "val/turns": float(np.mean([t.stats.num_turns for t in trajs])),
        "val/truncated_rate": sum(t.stats.truncated for t in trajs) / n,
    }
    out.update({f"val/tool_calls/{k}": v / n for k, v in tools.items()})
    return out


class Validator:
    """Runs validation rounds through the coordinator (rank 0); a do-nothing object elsewhere."""

    def __init__(self, cfg: RelayConfig, coordinator=None, alive=lambda: None):
        self.cfg = cfg
        self.coordinator = coordinator
        self.alive = alive
        self.rows: list[dict] = []
        enabled = cfg.trainer.val_before_train or cfg.trainer.test_freq > 0
        if coordinator is not None and enabled and cfg.data.val_files:
            from learner.prompts import load_prompts

            self.rows = load_prompts(cfg, cfg.data.val_files, "validation")
            log.info("validation: %d prompts from %s", len(self.rows), ", ".join(cfg.data.val_files))

    def before_train(self, version: int) -> dict:
        return self.run(version) if self.cfg.trainer.val_before_train else {}

    def after_step(self, version: int, total_steps: int) -> dict:
        freq = self.cfg.trainer.test_freq
        if freq > 0 and (version % freq == 0 or version == total_steps):
            return self.run(version)
        return {}

    def run(self, version: int) -> dict:
        """Validate policy ``version`` (already published); returns the ``val/*`` metrics."""
        if self.coordinator is None or not self.rows:
            return {}
        startup_s = self.coordinator.wait_for_actors(self.cfg.transport.recv_timeout_s, alive=self.alive)
        t0 = time.perf_counter()
        n = self.cfg.actor_rollout_ref.rollout.val_n  # verl's val_kwargs.n: samples per prompt
        items = [
            m.WorkItem(sample_id=f"val{version}:{i}" + (f":{k}" if n > 1 else ""), row=row, group_size=1, validation=True)
            for i, row in enumerate(self.rows)
            for k in range(n)
        ]
        self.coordinator.request_validation(items, version, per_grant=self.cfg.data.val_batch_size)
        trajs = self.coordinator.validation_results(self.cfg.transport.recv_timeout_s, alive=self.alive)
        out = validation_metrics(trajs)
        out["time/validation_s"] = time.perf_counter() - t0
        if startup_s > 0:
            out["time/actor_startup_s"] = startup_s  # engines still starting: not validation time
        log.info("validation of v%d: accuracy %.3f, reward %.3f on %d prompts (%.1fs)",
                 version, out["val/accuracy"], out["val/reward_mean"], len(trajs), out["time/validation_s"])
        return out
