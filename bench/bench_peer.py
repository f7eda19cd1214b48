"""Relay vs the peer (TRL's GRPOTrainer) on the same job, on this machine.

The job: the demo's SFT warm start (``runs/demo/sft`` after ``make demo``; else built once into
``runs/bench-peer``), 4 prompts x 8 completions of at most 64 tokens per step, the same rendered prompt
text (so the same token ids: the tiny model's tokenizer is byte-level), lr 1e-4 constant, no KL
(beta 0), clip 0.2, token-mean loss, one optimizer step per batch, 20 steps, single-turn (TRL has
no tool loop). Relay runs in its default shape (fitted to the machine) and synchronous
(``algorithm.max_staleness=0``); pairs are interleaved (TRL, Relay, Relay sync, TRL, ...).

Figures per run: steady completion tokens/s (tokens actually generated from step 3 to the
last, over the wall time between those step ends) and whole-process wall time. Printed: the
ratios Relay / TRL (min, median, max over pairs) and ``RESULT peer ...`` lines. Torch threads:
TRL's process uses torch's default (all cores); each Relay process one thread (the launcher's
OMP_NUM_THREADS=1), learner and actor in parallel.

    make bench-peer            # creates .venv-peer with TRL, then runs this
    .venv/bin/python bench/bench_peer.py --pairs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PEER_PY = REPO / ".venv-peer" / "bin" / "python"


def warm_start(out: Path) -> Path:
    """The demo's SFT model (``make demo``), else one built like it once and kept in runs/bench-peer."""
    for sft in (REPO / "runs" / "demo" / "sft", REPO / "runs" / "bench-peer" / "sft"):
        if (sft / "config.json").exists():
            return sft
    out = REPO / "runs" / "bench-peer"
    from configs.loader import load_config
    from launcher.commands import DEMO_SFT, demo_data
    from launcher.commands import sft as run_sft
    from launcher.tiny_model import build_tiny_model

    train, test, _ = demo_data(out / "data")
    base = build_tiny_model(out / "tiny-base")
    cfg = load_config(["demo"], [f"data.train_files=[{train}]", f"data.val_files=[{test}]", f"actor_rollout_ref.model.path={base}"])
    run_sft(cfg, out / "sft", **DEMO_SFT)
    return out / "sft"


OVERRIDES = [
    "agent.tools=[]", "agent.max_turns=1", "agent.max_tokens_per_turn=64", "actor_rollout_ref.rollout.response_length=64",
    "data.train_batch_size=4", "agent.num_chains=8", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=32", "actor_rollout_ref.actor.optim.lr=1e-4",
    "actor_rollout_ref.actor.optim.warmup_style=constant", "actor_rollout_ref.actor.use_kl_loss=false",
    "actor_rollout_ref.actor.clip_ratio=0.2", "actor_rollout_ref.actor.loss_agg_mode=token-mean",
    "trainer.val_before_train=false", "trainer.test_freq=-1", "trainer.save_freq=-1", "trainer.logger=[jsonl]",
    "data.shuffle=false",
    # Relay's default shape, fitted to the machine (the demo preset itself asks for 2 + 2)
    "trainer.n_gpus_per_node=null", "actor_rollout_ref.rollout.num_actors=null",
]


def job(model: Path, tmp: Path, steps: int) -> dict:
    from configs.loader import load_config
    from envs.agents import agent_for_config
    from transformers import AutoTokenizer

    cfg = load_config(["demo"], [*OVERRIDES, f"actor_rollout_ref.model.path={model}"])
    rows = [json.loads(line) for line in open(REPO / "runs" / "demo" / "data" / "train.jsonl")] if (REPO / "runs/demo/data/train.jsonl").exists() else None
    if rows is None:
        from launcher.commands import demo_data

        train, _, _ = demo_data(tmp / "data")
        rows = [json.loads(line) for line in open(train)]
    rows = rows[: 4 * steps]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    agent = agent_for_config(cfg, AutoTokenizer.from_pretrained(str(model)))
    prompts = [agent.prompt_text(agent.start(r)) for r in rows]
    return {"model": str(model), "prompts": prompts, "answers": [str(r["answer"]) for r in rows], "steps": steps,
            "prompts_per_step": 4, "group_size": 8, "max_tokens": 64, "lr": 1e-4, "clip": 0.2, "out": str(tmp / "trl")}


def steady(steps: list[dict]) -> float:
    """Completion tokens/s from the end of step 2 to the end of the last step."""
    steps = sorted(steps, key=lambda s: s["step"])
    first = next(i for i, s in enumerate(steps) if s["step"] >= 2)
    window = steps[first + 1 :]
    return sum(s["tokens"] for s in window) / (steps[-1]["time"] - steps[first]["time"])


def run_trl(job_path: Path) -> dict:
    t0 = time.monotonic()
    proc = subprocess.run([str(PEER_PY), str(REPO / "bench" / "peer_trl.py"), str(job_path)], capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"TRL run failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "steady_tok_s": steady(out["steps"]), "threads": out["torch_threads"], "version": out["trl"]}


def run_relay(model: Path, tmp: Path, tag: str, steps: int, extra: list[str]) -> dict:
    run = tmp / f"relay-{tag}"
    cmd = [sys.executable, "-m", "launcher.cli", "train", "-c", "demo", *OVERRIDES, *extra,
           f"actor_rollout_ref.model.path={model}", f"data.train_files=[{tmp / 'train.jsonl'}]", "data.val_files=[]",
           f"trainer.total_training_steps={steps}", f"trainer.default_local_dir={run}", "trainer.resume_mode=disable"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=REPO)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"Relay run failed:\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps_ = [{"step": r["step"], "time": r["time"], "tokens": r["perf/actor_gen_tokens"]} for r in recs if r.get("step", 0) > 0]
    shape = next((line for line in proc.stderr.splitlines() if "chose" in line or "learner rank(s)" in line), "")
    return {"wall_s": wall, "steady_tok_s": steady(steps_), "shape": shape.strip()}


def spread(xs: list[float]) -> str:
    return f"min={min(xs):.2f} median={statistics.median(xs):.2f} max={max(xs):.2f}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    if not PEER_PY.exists():
        print(f"no peer environment at {PEER_PY.parent.parent}: run `make bench-peer` (it creates it)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="relay-peer-") as d:
        tmp = Path(d)
        model = warm_start(tmp)
        spec = job(model, tmp, args.steps)
        (tmp / "job.json").write_text(json.dumps(spec))
        results = {"trl": [], "relay": [], "relay_sync": []}
        for i in range(args.pairs):
            results["trl"].append(run_trl(tmp / "job.json"))
            results["relay"].append(run_relay(model, tmp, f"async{i}", args.steps, []))
            results["relay_sync"].append(run_relay(model, tmp, f"sync{i}", args.steps, ["algorithm.max_staleness=0"]))
            print(f"pair {i + 1}: " + "  ".join(f"{k} {v[-1]['steady_tok_s']:.0f} tok/s, {v[-1]['wall_s']:.0f}s" for k, v in results.items()), flush=True)
    trl = results["trl"]
    print(f"\nTRL {trl[0]['version']} (torch threads {trl[0]['threads']}); Relay: {results['relay'][0]['shape']} (1 torch thread per process)")
    print(f"{'shape':<12} {'steady tok/s Relay/TRL':<40} {'wall Relay/TRL':<40}")
    for name in ("relay", "relay_sync"):
        steady_r = [r["steady_tok_s"] / t["steady_tok_s"] for r, t in zip(results[name], trl)]
        wall_r = [r["wall_s"] / t["wall_s"] for r, t in zip(results[name], trl)]
        print(f"{name:<12} {spread(steady_r):<40} {spread(wall_r):<40}")
        tag = "" if name == "relay" else "_sync"
        print(f"RESULT peer shape={name} relay_over_trl_steady{tag}={statistics.median(steady_r):.2f} "
              f"relay_over_trl_wall{tag}={statistics.median(wall_r):.2f} steady_{spread(steady_r).replace(' ', ' steady_')} "
              f"pairs={args.pairs} trl_threads={trl[0]['threads']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
