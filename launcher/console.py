"""The terminal of `relay train`: one live panel, redrawn in place.

When stderr is a terminal and ``console`` is among ``trainer.logger``, the launcher draws a
panel from what the learner writes to the run dir: while the processes start, a spinner with
how many actors have registered (``status.json``; vLLM engines take a minute or more); then a
progress bar with elapsed time and ETA and the metrics table of the last step
(``metrics.jsonl``). Learner rank 0's log lines scroll above it, except its one line per step
(the panel shows that). Elsewhere (a pipe, CI, nohup) nothing is drawn and every line is echoed,
one line per step. ``NoPanel`` is the do-nothing version.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

STEP_PREFIX = b"[step] "
"""How learner rank 0's per-step console line starts (``learner.metrics.ConsoleSink``)."""


class NoPanel:
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def echo(self, line: bytes) -> None:
        sys.stderr.buffer.write(line)
        sys.stderr.flush()


class LivePanel:
    def __init__(self, run_dir: Path, total_steps: int | None, n_actors: int, engine: str):
        from rich.console import Console

        self.run_dir = Path(run_dir)
        self.total = total_steps
        self.n_actors = n_actors
        self.engine = engine
        self.t0 = time.monotonic()
        self.console = Console(file=sys.stderr, highlight=False)
        self.live = None
        self._metrics_pos = 0
        self._last: dict | None = None
        self._first_step: tuple[int, float] | None = None

    def start(self) -> None:
        from rich.live import Live

        self.live = Live(get_renderable=self.render, console=self.console, refresh_per_second=2, transient=False)
        self.live.start()

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def echo(self, line: bytes) -> None:
        if line.startswith(STEP_PREFIX):
            return  # the panel shows the step
        self.console.print(line.decode(errors="replace").rstrip("\n"), markup=False, highlight=False)

    def _read_metrics(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        try:
            with open(path) as f:
                f.seek(self._metrics_pos)
                for line in f:
                    if not line.endswith("\n"):
                        break  # half-written: read it next time
                    self._metrics_pos += len(line)
                    rec = json.loads(line)
                    if rec.get("step", 0) > 0 and "time/step_s" in rec:
                        self._last = rec
                        if self._first_step is None:
                            self._first_step = (rec["step"], time.monotonic())
        except (OSError, ValueError):
            pass

    def render(self):
        from rich.console import Group
        from rich.spinner import Spinner

        from learner.metrics import ConsoleSink, progress_line

        self._read_metrics()
        elapsed = time.monotonic() - self.t0
        if self._last is None:
            registered = 0
            try:
                registered = len(json.loads((self.run_dir / "status.json").read_text())["actors"])
            except (OSError, ValueError, KeyError):
                pass
            slow = " (vLLM engines take a minute or more to start)" if self.engine == "vllm" else ""
            return Spinner("dots", text=f"starting: {registered}/{self.n_actors} actors registered{slow}, {elapsed:.0f}s")
        step = self._last["step"]
        return Group(progress_line(step, self.total, elapsed, self._first_step, time.monotonic()), ConsoleSink.table(self._last))


def make_panel(run_dir: Path, cfg, enabled: bool):
    """A live panel when stderr is a terminal and the console logger is on, else ``NoPanel``."""
    if enabled and "console" in cfg.trainer.logger and sys.stderr.isatty():
        total = cfg.trainer.total_training_steps
        return LivePanel(run_dir, total, cfg.actor_rollout_ref.rollout.num_actors, cfg.actor_rollout_ref.rollout.name)
    return NoPanel()
