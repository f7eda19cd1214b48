"""reasoning-gym tasks as datasets and rewards: ``data.source=reasoning_gym:NAME``.

reasoning-gym (``pip install reasoning-gym``, in Relay's ``envs`` extra) holds
about a hundred procedural task generators with verifiers: arithmetic, algebra,
logic puzzles, games, graphs, ARC-like grids. With ``data.source`` set, the
learner's training prompts come from ``reasoning_gym.create_dataset(NAME,
size=..., seed=..., **options)`` instead of ``data.train_files``; the options
are ``data.source_options`` (``size``, default 1000; ``seed``, default
``data.seed``; anything else goes to the generator's config, e.g.
``min_terms``). Each row is ``{question, answer, metadata}`` (made JSON-safe),
so it crosses the wire to the actors as is.

The reward ``reasoning_gym`` (``agent.reward_name=reasoning_gym``) scores the
final answer with the task's own ``score_answer`` (1.0 correct, partial credit
where the task gives it, 0.0 otherwise), named by the row's
``metadata.source_dataset``.

Validation prompts come from files: ``python -m envs.tasks.rgym NAME --size 64
--seed 1 --out val.jsonl`` writes rows in the same form for ``data.val_files``.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any, Callable

SOURCE_PREFIX = "reasoning_gym:"


def _module():
    try:
        import reasoning_gym
    except ImportError:
        raise ImportError("data.source=reasoning_gym:... needs the reasoning-gym package: pip install 'relay-rl[envs]' "
                          "(or pip install reasoning-gym)") from None
    return reasoning_gym


def task_names() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def generate_rows(name: str, size: int = 1000, seed: int = 0, **options: Any) -> list[dict[str, Any]]:
    """``size`` rows of task ``name`` (deterministic in ``seed``), JSON-safe."""
    rg = _module()
    try:
        dataset = rg.create_dataset(name, size=size, seed=seed, **options)
    except ValueError as e:
        if "not registered" in str(e):
            near = [n for n in task_names() if name.split("_")[0] in n][:8]
            raise ValueError(f"reasoning-gym has no task '{name}'" + (f"; similar: {near}" if near else "")) from None
        raise
    except TypeError as e:
        raise ValueError(f"reasoning-gym task '{name}': bad data.source_options {sorted(options)}: {e}") from None
    return [json.loads(json.dumps(dict(entry), default=str)) for entry in dataset]


def source_rows(source: str, options: dict[str, Any], default_seed: int) -> list[dict[str, Any]]:
    """The rows ``data.source`` names (``reasoning_gym:NAME``)."""
    if not source.startswith(SOURCE_PREFIX):
        raise ValueError(f"data.source={source!r}: the known source is reasoning_gym:NAME")
    opts = dict(options)
    return generate_rows(source[len(SOURCE_PREFIX):], size=int(opts.pop("size", 1000)), seed=int(opts.pop("seed", default_seed)), **opts)


@functools.lru_cache(maxsize=None)
def score_fn(name: str) -> Callable[[Any, dict], float]:
    return _module().get_score_answer_fn(name)


def score(final_answer: str | None, row: dict[str, Any]) -> float:
    """The task's own score of ``final_answer`` for ``row`` (a reasoning-gym entry)."""
    metadata = row.get("metadata") or {}
    name = metadata.get("source_dataset")
    if not name:
        raise ValueError("the reasoning_gym reward needs rows from data.source=reasoning_gym:NAME (metadata.source_dataset)")
    entry = {"question": row.get("question"), "answer": row.get("answer"), "metadata": metadata}
    return float(score_fn(name)(final_answer, entry))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write reasoning-gym rows as JSONL (for data.val_files).")
    ap.add_argument("name", nargs="?", help="task name, e.g. basic_arithmetic (--list shows all)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--list", action="store_true", help="print the task names and exit")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(task_names()))
        return 0
    if args.name is None or args.out is None:
        ap.error("give a task name and --out (or --list)")
    rows = generate_rows(args.name, size=args.size, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} {args.name} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
