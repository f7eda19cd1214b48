"""Every `trainer.logger` sink for real: jsonl, console (progress + table), wandb offline, tensorboard."""

import json
import logging

from configs.loader import load_config
from learner.metrics import MetricsLogger


def test_all_sinks_write(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(["demo"], [f"trainer.default_local_dir={tmp_path}", "trainer.logger=[console,jsonl,wandb,tensorboard]"])
    with caplog.at_level(logging.WARNING):
        logger = MetricsLogger(tmp_path, cfg)
    assert any("wandb: logging offline" in r.message for r in caplog.records)
    logger.log(0, 0, {"val/accuracy": 0.25}, total=4)  # validation before the first step
    logger.log(
        1, 1,
        {"reward/mean": 0.5, "reward/std": 0.1, "actor/pg_loss": 0.01, "staleness": [0, 1, 1],
         "time/step_s": 2.0, "time/wait_s": 0.5, "time/train_s": 1.5, "perf/actor_gen_tokens": 100},
        total=4,
    )
    logger.close()

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert records[1]["staleness/hist_1"] == 2 / 3 and records[1]["perf/actor_tokens_per_s"] == 50.0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(line.startswith("[step] ") for line in out)  # one line per logged step
    assert "step 1/4" in out[1] and "eta" in out[1] and "reward 0.500±0.10" in out[1]
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline wandb run written"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_the_live_panel_shows_start_up_then_progress_and_the_last_steps_metrics(tmp_path):
    import io

    from rich.console import Console

    from launcher.console import LivePanel

    panel = LivePanel(tmp_path, total_steps=4, n_actors=2, engine="vllm")
    panel.console = Console(file=io.StringIO(), width=120, record=True)

    def shown() -> str:
        panel.console.print(panel.render())
        return panel.console.export_text()

    (tmp_path / "status.json").write_text(json.dumps({"actors": {"actor-0": {}}}))
    text = shown()
    assert "starting: 1/2 actors registered (vLLM engines take a minute or more to start)" in text
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "val/accuracy": 0.1}) + "\n")
        f.write(json.dumps({"step": 1, "reward/mean": 0.5, "reward/std": 0.1, "time/step_s": 2.0, "time/wait_s": 0.5, "time/train_s": 1.5}) + "\n")
        f.write('{"step": 2, "reward/me')  # half-written: not read yet
    text = shown()
    assert "step 1/4" in text and "0.500±0.10" in text and "2.0 (wait 0.5, train 1.5)" in text
    panel.echo(b"[step] step 1/4 ...\n")  # the panel shows steps; other lines scroll above it
    panel.echo(b"learner-0 WARNING something\n")
    text = panel.console.export_text()
    assert "WARNING something" in text and "[step]" not in text
