"""Recording the batches a learner trained on, and training on them again.

With ``trainer.dump_batches`` rank 0 writes each step's broadcast payload (the
msgpack list of encoded ``Trajectory`` messages, greedy baselines included,
exactly the bytes every rank decoded) to ``batches/step_NNNNNN.msgpack``,
``NNNNNN`` the version the step produced. ``replay`` feeds those batches, in
order, through a trainer's own ``step_batch`` and ``train_step``: a
synchronous, single-loop training run on the same data, used to check that
asynchronous training with ``max_staleness=0`` is the synchronous algorithm.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from protocol import messages as m


class NoBatchDump:
    def write(self, version: int, payload: bytes) -> None: ...


class BatchDump:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def write(self, version: int, payload: bytes) -> None:
        """Record the batch that produces policy ``version``."""
        (self.dir / f"step_{version:06d}.msgpack").write_bytes(payload)


def load_batches(directory: Path) -> list[list[m.Trajectory]]:
    """The dumped batches in step order, each the list of trajectories as broadcast."""
    return [
        [m.decode(b) for b in msgspec.msgpack.decode(path.read_bytes())]
        for path in sorted(Path(directory).glob("step_*.msgpack"))
    ]


def replay(trainer, batches: list[list[m.Trajectory]]) -> list[dict]:
    """Train ``trainer`` (set up, at version 0) on ``batches`` one after the other; returns each step's metrics."""
    out = []
    for trajs in batches:
        out.append(trainer.train_step(trainer.step_batch(trajs).batch))
        trainer.version += 1
    return out
