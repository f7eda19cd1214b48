"""Asynchronous vs synchronous training wall-clock on the demo, next to the overlap limit.

    python bench/bench_async.py [--steps 8] [--learners 1] [--actors 1]

Runs ``relay train`` on the demo task (embedded tiny model, random init) twice
for the same number of learner steps: ``algorithm.max_staleness=0``
(synchronous: actors generate a batch, then wait for the new weights) and
``max_staleness=1`` (actors generate the next batch while the learner trains).
Per-step wall-clock is measured from the metrics timestamps, first step
excluded (start-up). From the synchronous run, ``gen`` is the learner's mean
wait for a batch and ``train`` its mean train + publish time; perfect overlap
would make a step take ``max(gen, train)`` instead of ``gen + train``, so the
best speed-up is ``(gen + train) / max(gen, train)``. Prints the measured
speed-up, that limit, and their ratio (target >= 0.9).

Overlap needs free cores: on a machine where learner and actors share too
few cores, both slow down when they run at once, and the speed-up is capped
by the hardware, not by the protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(tmp: Path, staleness: int, args) -> list[dict]:
    from envs.tasks import arithmetic

    train, test = arithmetic.write_splits(tmp / "data", n_train=400, n_test=8)
    out = tmp / f"staleness{staleness}"
    cmd = [
        sys.executable, "-m", "launcher.cli", "train", "-c", "demo",
        f"data.train_files=[{train}]", f"data.val_files=[{test}]",
        f"trainer.default_local_dir={out}", f"trainer.total_training_steps={args.steps}",
        f"trainer.n_gpus_per_node={args.learners}", f"actor_rollout_ref.rollout.num_actors={args.actors}",
        f"algorithm.max_staleness={staleness}", f"data.train_batch_size={args.batch}",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=-1", "trainer.logger=[jsonl]",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise SystemExit(f"relay train (max_staleness={staleness}) failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"time/step_s"' in line]


def per_step(metrics: list[dict]) -> float:
    times = [m["time"] for m in metrics]
    return (times[-1] - times[0]) / (len(times) - 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--learners", type=int, default=1)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4, help="prompts per step (x 8 episodes)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        sync = run(Path(tmp), 0, args)
        asyn = run(Path(tmp), 1, args)
    later = sync[1:]
    gen = statistics.mean(m["time/wait_s"] for m in later)
    train = statistics.mean(m["time/train_s"] + m["time/publish_s"] for m in later)
    t_sync, t_async = per_step(sync), per_step(asyn)
    speedup = t_sync / t_async
    limit = (gen + train) / max(gen, train)
    print(f"sync step {t_sync:.2f}s (gen {gen:.2f}s + train {train:.2f}s), async step {t_async:.2f}s "
          f"(staleness mean {statistics.mean(m.get('staleness/mean', 0) for m in asyn[1:]):.2f})")
    print(f"async vs sync speed-up {speedup:.2f}x; overlap limit (gen+train)/max(gen,train) {limit:.2f}x "
          f"-> {speedup / limit:.2f} of the limit (target >= 0.9)", flush=True)
    print(f"RESULT async sync_step_s={t_sync:.2f} async_step_s={t_async:.2f} speedup={speedup:.2f} limit={limit:.2f} "
          f"of_limit={speedup / limit:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
