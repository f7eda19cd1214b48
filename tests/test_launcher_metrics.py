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
    err = capsys.readouterr().err
    assert "step 1/4" in err and "eta" in err and "reward" in err and "0.500±0.10" in err
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline wandb run written"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
