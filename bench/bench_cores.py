"""Do this machine's cores slow each other? A model's decode forward, alone and beside a busy neighbour.

Relay's shapes put work side by side (an actor beside a learner rank; ``rollout.hf_engine_process``
puts the engine's steps beside the episodes' Python). That pays only if a core's work runs as fast with
the other core busy as with it idle. Here: a loop of batched one-token forwards of the embedded tiny
model (one torch thread, 64 rows: a decode step of the HF engine), timed alone, then beside a process
that runs a pure-Python loop (the episodes' kind of work) or a matmul loop (an engine's or a learner's
kind). The neighbours start once and are paused (SIGSTOP) and resumed (SIGCONT) in turn, so each
timing beside one sits between two timings alone, and its ratio is taken against their mean: the
machine's own speed drifts within seconds, which a run alone-then-beside reads as interference.
Baseline: those alone timings, in the same run. A ratio > 1 is a slowdown; the RESULT line gives the
median ratio of ``--repeats`` timings with its min and max.

Measured on the 2-core CI machine (2026-12-03, three runs): beside a Python loop 1.01x, 1.13x, 1.04x;
beside a matmul loop 1.02x, 1.06x, 1.24x; the alone timings of one run spread 0.13-0.26 s for the same
50 forwards. Two pure-Python loops do not slow each other (0.47 s alone, 0.48-0.50 s two at once).
Read: a busy second core costs a forward a few percent to a quarter, and the machine's drift is larger
than that, which is why single runs of ``bench_actor.py`` scatter by +-20%.
Usage: python bench/bench_cores.py [--steps 50] [--repeats 15]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NEIGHBOURS = {
    "python": "s = 0\nwhile True:\n    s += 1\n",
    "matmul": "import torch\ntorch.set_num_threads(1)\na = torch.randn(256, 256)\nwhile True:\n    a @ a\n",
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50, help="forwards per timing")
    ap.add_argument("--repeats", type=int, default=15, help="timings beside each neighbour (the median ratio is reported)")
    args = ap.parse_args()
    if args.steps < 1 or args.repeats < 1:
        ap.error("--steps and --repeats must be >= 1")

    import torch
    from transformers import AutoModelForCausalLM

    from launcher.tiny_model import build_tiny_model

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(Path(tempfile.mkdtemp(prefix="relay-bench-cores-")) / "tiny")).eval()
    x = torch.randint(0, model.config.vocab_size, (64, 1))

    def timed() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(args.steps):
                model(x)
        return time.perf_counter() - t0

    timed()  # warm-up
    procs = {n: subprocess.Popen([sys.executable, "-c", code]) for n, code in NEIGHBOURS.items()}
    try:
        time.sleep(1.0)  # the neighbours are up
        for n, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"the {n} neighbour exited with code {proc.returncode}")
            proc.send_signal(signal.SIGSTOP)
        ratios: dict[str, list[float]] = {n: [] for n in procs}
        alone = [timed()]
        for _ in range(args.repeats):
            for n, proc in procs.items():
                proc.send_signal(signal.SIGCONT)
                time.sleep(0.05)  # the neighbour runs again
                t = timed()
                proc.send_signal(signal.SIGSTOP)
                alone.append(timed())
                ratios[n].append(t / ((alone[-2] + alone[-1]) / 2))
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(timeout=30)
    med = {n: statistics.median(r) for n, r in ratios.items()}
    print(f"{args.steps} forwards of 64 rows, one thread, alone {statistics.median(alone):.3f}s "
          f"({min(alone):.3f}-{max(alone):.3f}); beside a busy neighbour, against the alone timings just before and after: "
          + "; ".join(f"{n} loop {med[n]:.2f}x ({min(r):.2f}-{max(r):.2f})" for n, r in ratios.items()), flush=True)
    print("RESULT cores alone_s=%.3f %s" % (statistics.median(alone), " ".join(
        f"beside_{n}={med[n]:.2f} beside_{n}_min={min(r):.2f} beside_{n}_max={max(r):.2f}" for n, r in ratios.items())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
