"""`relay plot`: metrics.jsonl -> PNG."""

import json
import subprocess
import sys

from launcher.plot import plot_run, read_metrics


def write_metrics(run, steps=12):
    lines = []
    for s in range(1, steps + 1):
        rec = {
            "step": s, "version": s, "reward/mean": s / steps, "reward/min": 0.0, "reward/max": 1.0,
            "actor/pg_loss": 0.1 / s, "actor/entropy": 2.0 - s / steps, "actor/logprob_mismatch_kl": 1e-3,
            "staleness/mean": 0.5, "staleness/max": 1, "episode/tool_calls_per_episode": 0.5,
            "episode/turns": 2.0, "time/step_s": 3.0, "time/wait_s": 1.0, "time/train_s": 2.0,
        }
        if s % 4 == 0:
            rec["val/accuracy"] = s / steps
        lines.append(json.dumps(rec))
    lines.append(json.dumps({"step": 12, "version": 12, "reward/mean": 0.99}))  # a resumed run logs step 12 again
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_plot_writes_a_png(tmp_path):
    write_metrics(tmp_path)
    out = plot_run(tmp_path, tmp_path / "curves.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_last_record_of_a_step_wins(tmp_path):
    write_metrics(tmp_path)
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert recs[-1]["reward/mean"] == 0.99 and "actor/pg_loss" in recs[-1]


def test_relay_plot_command(tmp_path):
    write_metrics(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "plot", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "curves.png").stat().st_size > 0
    missing = subprocess.run([sys.executable, "-m", "launcher.cli", "plot", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "metrics.jsonl not found" in missing.stderr
