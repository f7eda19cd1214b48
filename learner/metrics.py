"""Metrics: JSONL (always), console progress, optional wandb and tensorboard.

Every sink has the same two methods, and disabled ones are do-nothing objects,
so the training loop never asks which loggers are on.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class _Sink:
    def write(self, step: int, metrics: dict) -> None: ...

    def close(self) -> None: ...


class JsonlSink(_Sink):
    def __init__(self, path: Path):
        self.f = open(path, "a")

    def write(self, step, metrics):
        self.f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()


class ConsoleSink(_Sink):
    """Per step: one line (``[step] `` + progress bar with elapsed time and ETA + the metrics).

    Rank 0's output reaches the log file, and the terminal through the launcher's pipe: there
    the launcher draws its live panel (``launcher/console.py``, with ``table`` below) and skips
    these lines, or echoes them where there is no terminal. ETA counts from the first step this
    process logged, so a resumed run's ETA is right too.
    """

    CELLS = [
        ("reward", ("reward/mean", "reward/std"), "{:.3f}±{:.2f}"),
        ("val acc", ("val/accuracy",), "{:.3f}"),
        ("pg loss", ("actor/pg_loss",), "{:.4f}"),
        ("value loss", ("critic/vf_loss",), "{:.4f}"),
        ("kl", ("actor/kl_loss",), "{:.4f}"),
        ("entropy", ("actor/entropy",), "{:.3f}"),
        ("grad norm", ("actor/grad_norm",), "{:.3f}"),
        ("lr", ("actor/lr",), "{:.2e}"),
        ("mismatch kl", ("actor/logprob_mismatch_kl",), "{:.4f}"),
        ("staleness", ("staleness/mean", "staleness/max"), "{:.2f} (max {})"),
        ("turns", ("episode/turns",), "{:.2f}"),
        ("tools/ep", ("episode/tool_calls_per_episode",), "{:.2f}"),
        ("truncated", ("episode/truncated_rate",), "{:.1%}"),
        ("learner tok/s", ("perf/train_tokens_per_s",), "{:.0f}"),
        ("actor tok/s", ("perf/actor_tokens_per_s",), "{:.0f}"),
        ("s/step", ("time/step_s", "time/wait_s", "time/train_s"), "{:.1f} (wait {:.1f}, train {:.1f})"),
    ]

    def __init__(self, total: int | None):
        self.total = total
        self.t0 = time.monotonic()
        self.first: tuple[int, float] | None = None

    def progress(self, step: int) -> str:
        now = time.monotonic()
        if self.first is None:
            self.first = (step - 1 if step > 0 else 0, self.t0)
        return progress_line(step, self.total, now - self.t0, self.first, now)

    @classmethod
    def cells(cls, metrics: dict) -> list[tuple[str, str]]:
        return [(label, fmt.format(*(metrics[k] for k in keys))) for label, keys, fmt in cls.CELLS if all(k in metrics for k in keys)]

    @classmethod
    def table(cls, metrics: dict):
        from rich.table import Table

        cells = cls.cells(metrics)
        grid = Table.grid(padding=(0, 2))
        for _ in range(3):
            grid.add_column(style="dim", justify="right")
            grid.add_column()
        for i in range(0, len(cells), 3):
            row = cells[i : i + 3]
            row += [("", "")] * (3 - len(row))
            grid.add_row(*(x for pair in row for x in pair))
        return grid

    def write(self, step, metrics):
        line = "  ".join(f"{label} {value}" for label, value in self.cells(metrics))
        print(f"[step] {self.progress(step)}  {line}", file=sys.stdout, flush=True)


def progress_line(step: int, total: int | None, elapsed: float, first: tuple[int, float] | None, now: float) -> str:
    """``━━━━╺──── step 3/30 10%  elapsed 0m12s  eta 1m48s``; ``first`` is (step, time) the ETA counts from."""
    head = f"step {step}" + (f"/{total}" if total else "")
    tail = f"elapsed {_hms(elapsed)}"
    if total and first is not None and step > first[0]:
        rate = (now - first[1]) / (step - first[0])
        tail += f"  eta {_hms(rate * max(0, total - step))}"
    if not total:
        return f"{head}  {tail}"
    filled = int(30 * min(step, total) / total)
    return f"{'━' * filled}{'╺' if filled < 30 else ''}{'─' * max(0, 29 - filled)} {head} {step / total:4.0%}  {tail}"


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class WandbSink(_Sink):
    """wandb; offline (files under ``<run dir>/wandb``, sync later with ``wandb sync``) when
    no API key is set or ``WANDB_MODE=offline``, and it says so."""

    def __init__(self, run_dir: Path, cfg):
        import wandb

        if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") is None:
            os.environ["WANDB_MODE"] = "offline"
            log.warning("wandb: no WANDB_API_KEY set")
        if os.environ.get("WANDB_MODE") in ("offline", "dryrun"):
            log.warning("wandb: logging offline to %s/wandb (upload later with `wandb sync`)", run_dir)
        self.run = wandb.init(
            project=cfg.trainer.project_name, name=cfg.trainer.experiment_name, dir=str(run_dir), config=cfg.model_dump()
        )

    def write(self, step, metrics):
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self):
        self.run.finish()


class TensorboardSink(_Sink):
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step, metrics):
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.w.add_scalar(k, v, step)

    def close(self):
        self.w.close()


class MetricsLogger:
    """Fans one metrics dict out to the configured sinks (rank 0 only)."""

    def __init__(self, run_dir: Path, cfg, enabled: bool = True):
        self.sinks: list[_Sink] = []
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.sinks.append(JsonlSink(run_dir / "metrics.jsonl"))
        loggers = set(cfg.trainer.logger)
        if "console" in loggers:
            self.sinks.append(ConsoleSink(None))
        if "wandb" in loggers:
            self.sinks.append(WandbSink(run_dir, cfg))
        if "tensorboard" in loggers:
            self.sinks.append(TensorboardSink(run_dir))

    def log(self, step: int, version: int, metrics: dict, total: int | None = None) -> None:
        flat = {"version": version}
        for k, v in metrics.items():
            if k == "staleness":
                flat.update(staleness_metrics(v))
            else:
                flat[k] = v
        if "perf/actor_gen_tokens" in flat and flat.get("time/step_s"):
            # whole-fleet actor throughput: tokens generated for this batch per second of step
            flat["perf/actor_tokens_per_s"] = flat["perf/actor_gen_tokens"] / flat["time/step_s"]
        for s in self.sinks:
            if isinstance(s, ConsoleSink):
                s.total = total
            s.write(step, flat)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def staleness_metrics(ages: list[int]) -> dict:
    """The staleness histogram (versions between sampling and training) as flat metrics."""
    if not ages:
        return {}
    hist = Counter(ages)
    out = {f"staleness/hist_{a}": n / len(ages) for a, n in sorted(hist.items())}
    out["staleness/mean"] = float(np.mean(ages))
    out["staleness/max"] = int(max(ages))
    return out


def reward_metrics(trajs, batch) -> dict:
    """Reward, per-component reward, episode shape and tool-use metrics of one batch."""
    rewards = [t.reward for t in trajs]
    out = {
        "reward/mean": float(np.mean(rewards)),
        "reward/std": float(np.std(rewards)),
        "reward/min": float(np.min(rewards)),
        "reward/max": float(np.max(rewards)),
    }
    comps: dict[str, list[float]] = {}
    for t in trajs:
        for k, v in t.reward_components.items():
            comps.setdefault(k, []).append(v)
    out.update({f"reward/{k}": float(np.mean(v)) for k, v in comps.items() if k != "reward"})
    tools = Counter()
    for t in trajs:
        tools.update(t.stats.tool_calls)
    n = len(trajs)
    out.update({f"episode/tool_calls/{k}": v / n for k, v in tools.items()})
    out["episode/tool_calls_per_episode"] = sum(tools.values()) / n
    out["episode/tool_use_rate"] = sum(1 for t in trajs if t.stats.tool_calls) / n
    out["episode/tool_error_rate"] = sum(t.stats.tool_errors for t in trajs) / max(1, sum(tools.values()))
    out["episode/turns"] = float(np.mean([t.stats.num_turns for t in trajs]))
    out["episode/truncated_rate"] = sum(t.stats.truncated for t in trajs) / n
    out["episode/response_tokens"] = float(np.mean([len(t.response_ids) for t in trajs]))
    gen_tokens = sum(t.stats.gen_tokens for t in trajs)
    out["perf/actor_gen_tokens"] = gen_tokens
    gen_time = sum(t.stats.gen_time_s for t in trajs)
    out["perf/actor_tokens_per_episode_s"] = gen_tokens / max(gen_time, 1e-9)
    out.update(reward_hacking_monitors(trajs))
    return out


def reward_hacking_monitors(trajs) -> dict:
    """Tool-use rate per tool, share of reward from format terms, length-reward correlation, turns."""
    from envs.monitors import EpisodeSummary, monitor_batch

    summaries = [
        EpisodeSummary(
            reward=dict(t.reward_components),
            tool_calls=[name for name, n in t.stats.tool_calls.items() for _ in range(n)],
            num_turns=t.stats.num_turns,
            response_length=len(t.response_ids),
        )
        for t in trajs
    ]
    return monitor_batch(summaries)


class EngineMismatch(RuntimeError):
    """An actor's engine sampled with weights other than the version it claims (the log-prob guard)."""


def check_same_version_logprobs(actor_ids: list[str], rows, version: int, threshold: float | None) -> dict:
    """The log-prob guard over one batch: per actor, the mean |learner - engine| log-prob of the
    tokens it sampled with exactly version ``version`` (the weights the learner holds, so the gap
    is numerics alone: ~1e-6 in fp32, ~1e-2 with a bf16 engine).

    Args:
        actor_ids: [N] the actor of each batch row.
        rows: [N, 2] per row: sum of |learner - engine| over its same-version tokens, and their
            count (``Trainer.update_policy``); None when the policy was not updated (critic warm-up).
        version: the version the learner held when it computed its log-probs.
        threshold: ``rollout.max_logprob_diff``; None = report only.

    Returns:
        ``actor/logprob_abs_diff_same_version_max`` (the worst actor's mean) when any row has such
        tokens. Raises ``EngineMismatch`` naming the actor and version past ``threshold``.
    """
    if rows is None:
        return {}
    per_actor: dict[str, list[float]] = {}
    for actor_id, (diff, count) in zip(actor_ids, rows.double().cpu().tolist()):
        acc = per_actor.setdefault(actor_id, [0.0, 0.0])
        acc[0] += diff
        acc[1] += count
    means = {a: d / c for a, (d, c) in per_actor.items() if c > 0}
    if not means:
        return {}
    worst = max(means, key=means.get)
    if threshold is not None and means[worst] > threshold:
        raise EngineMismatch(
            f"{worst} does not serve the weights of v{version}: on the {int(per_actor[worst][1])} tokens it sampled "
            f"with v{version}, its log-probs differ from the learner's by {means[worst]:.4g} on average "
            f"(rollout.max_logprob_diff = {threshold}); an engine that did not load v{version} correctly "
            f"(e.g. a silently failed or partial weight update), or a different model, stops the run"
        )
    return {"actor/logprob_abs_diff_same_version_max": means[worst]}
