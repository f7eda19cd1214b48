"""``relay plot RUN_DIR``: the training curves of ``metrics.jsonl`` as one PNG.

Panels (each only when its metrics were logged): reward (mean with min..max
band), validation accuracy and reward, policy (and value) loss, KL and the
actor/learner log-prob mismatch, entropy, staleness (mean and max), tool calls
and turns per episode, and the time per step. A resumed run logs some steps
twice; the last record of a step wins. matplotlib with the Agg backend, no
display needed.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    """Records of ``<run_dir>/metrics.jsonl`` by step (last record per step wins)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a Relay run directory?")
    by_step: dict[int, dict] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        by_step.setdefault(rec["step"], {}).update(rec)
    return [by_step[s] for s in sorted(by_step)]


# (title, [(metric, label)], y label)
PANELS = [
    ("Reward", [("reward/mean", "mean")], "reward"),
    ("Validation", [("val/accuracy", "accuracy"), ("val/reward_mean", "reward mean")], ""),
    ("Loss", [("actor/pg_loss", "policy loss"), ("critic/vf_loss", "value loss")], "loss"),
    ("KL / log-prob mismatch", [("actor/kl_loss", "KL to reference"), ("actor/logprob_mismatch_kl", "actor vs learner")], "KL"),
    ("Entropy", [("actor/entropy", "entropy")], "nats / token"),
    ("Staleness", [("staleness/mean", "mean"), ("staleness/max", "max")], "versions"),
    ("Episodes", [("episode/tool_calls_per_episode", "tool calls"), ("episode/turns", "turns")], "per episode"),
    ("Time per step", [("time/step_s", "step"), ("time/wait_s", "waiting for data"), ("time/train_s", "training")], "seconds"),
]


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write the curves of ``run_dir`` to ``out`` (default ``<run_dir>/curves.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'} has no records yet")
    panels = [p for p in PANELS if any(k in r for r in records for k, _ in p[1])]
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, series, ylabel) in zip(axes.flat, panels):
        for key, label in series:
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = "o-" if len(pts) < 30 else "-"
            ax.plot(xs, ys, style, label=label, markersize=3, linewidth=1.5)
            if key == "reward/mean":
                band = [(r["step"], r["reward/min"], r["reward/max"]) for r in records if "reward/min" in r and "reward/max" in r]
                if band:
                    bx, lo, hi = zip(*band)
                    ax.fill_between(bx, lo, hi, alpha=0.15, label="min..max")
        if title == "Validation":
            ax.set_ylim(-0.03, 1.03)  # accuracy and (0/1) rewards
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("learner step")
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    last = records[-1]
    fig.suptitle(f"{Path(run_dir).resolve().name}: {last['step']} steps, policy v{last.get('version', '?')}", fontsize=13)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
