"""How many learner ranks and actors a run gets when the config does not say.

Measured on a 2-core CPU machine (issue 14): 2 learner ranks + 2 actors ran four busy processes
on two cores and trained slower than 1 + 1 (the 2-rank weight gather alone cost 10x the 1-rank
one). So on CPU each learner rank gets 8 cores and each actor 2 of what is left, at least one of
each; with GPUs the learner takes every GPU and one actor shares them.
"""

from __future__ import annotations

import os
import shutil
import subprocess


def gpu_count() -> int:
    """NVIDIA GPUs visible here (``nvidia-smi -L``; 0 without the tool), honouring CUDA_VISIBLE_DEVICES."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    n = sum(line.startswith("GPU ") for line in out.splitlines())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        n = min(n, len([d for d in visible.split(",") if d.strip()]))
    return n


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def fit_shape(learner_ranks: int | None, actors: int | None, cores: int, gpus: int) -> tuple[int, int, str]:
    """``(learner ranks, actors, what was chosen and why)``; values given are kept as they are."""
    if gpus:
        ranks = learner_ranks or gpus
        n_actors = actors or 1
        why = f"{gpus} GPU(s)"
    else:
        ranks = learner_ranks or max(1, cores // 8)
        n_actors = actors or max(1, (cores - ranks) // 2)
        why = f"{cores} CPU core(s), no GPU"
    chosen = [f"{what}={value}" for what, value, given in
              (("trainer.n_gpus_per_node", ranks, learner_ranks), ("actor_rollout_ref.rollout.num_actors", n_actors, actors)) if given is None]
    note = f"chose {', '.join(chosen)} for {why} (set them to override)" if chosen else ""
    return ranks, n_actors, note
