"""bench/gpu_check.py's CPU-side parts run end to end: ``--dry-run`` does the three parts (learner
throughput vs a raw loop, a weight publish to an actor process, relay train) with tiny shapes."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_gpu_check_dry_run_runs_all_three_parts(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {r["part"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())["results"]}
    assert set(results) == {"learner", "publish", "relay_train"}
    assert results["learner"]["relay_tok_s"] > 0 and results["learner"]["raw_tok_s"] > 0
    assert results["publish"]["ms"] > 0 and results["publish"]["mb"] >= 0
    assert results["relay_train"]["rc"] == 0 and results["relay_train"]["steps"] == 1
    assert proc.stdout.count("RESULT gpu_check part=") == 3


def test_gpu_check_refuses_to_run_without_a_gpu_unless_dry_run():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real check would start")
    proc = subprocess.run([sys.executable, "bench/gpu_check.py"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stdout
