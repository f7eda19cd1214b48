"""``--sweep key=v1,v2,v3``: one run per value (the product over several ``--sweep``).

Pure string work, no torch: the CLI expands the sweep, validates every run's
config before the first one starts, then runs them one after another
(``relay train``) or as a SLURM job array (``relay slurm``).

Each run gets its own experiment name and run directory:

- ``trainer.experiment_name = <base experiment name>-<tag>``
- ``trainer.default_local_dir = <base run dir>/<tag>``

where ``<tag>`` names the point, e.g. ``lr=0.001`` (the last part of the key;
the full key when that is ambiguous), several keys joined by ``,``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass


class SweepError(ValueError):
    """A ``--sweep`` argument that cannot be read."""


@dataclass(frozen=True)
class SweepPoint:
    tag: str
    """Short, filesystem-safe name of this point (``lr=0.001``)."""
    overrides: tuple[str, ...]
    """The ``key=value`` overrides that make this point."""


def split_values(text: str) -> list[str]:
    """Split ``v1,v2,[a,b]`` on top-level commas (commas inside ``[]``/``{}``/quotes stay)."""
    out, cur, depth, quote = [], [], 0, ""
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    if depth != 0 or quote:
        raise SweepError(f"unbalanced brackets or quotes in sweep values {text!r}")
    return out


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    """``key=v1,v2`` -> (key, [v1, v2])."""
    key, sep, values = spec.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        raise SweepError(f"--sweep {spec!r} is not of the form key=v1,v2,...")
    vals = split_values(values)
    if any(v == "" for v in vals):
        raise SweepError(f"--sweep {spec!r} has an empty value")
    if len(set(vals)) != len(vals):
        raise SweepError(f"--sweep {spec!r} repeats a value")
    return key, vals


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_") or "x"


def expand_sweep(specs: list[str]) -> list[SweepPoint]:
    """Every point of the sweep (the product over ``specs``, in order); [] for no sweep."""
    if not specs:
        return []
    parsed = [parse_sweep(s) for s in specs]
    keys = [k for k, _ in parsed]
    if len(set(keys)) != len(keys):
        raise SweepError(f"--sweep names a key twice: {keys}")
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    names = keys if len(set(leaves)) != len(leaves) else leaves
    points = []
    for combo in itertools.product(*(vals for _, vals in parsed)):
        tag = ",".join(f"{_safe(n)}={_safe(v)}" for n, v in zip(names, combo))
        points.append(SweepPoint(tag=tag, overrides=tuple(f"{k}={v}" for k, v in zip(keys, combo))))
    if len({p.tag for p in points}) != len(points):
        raise SweepError(f"sweep values collide once made filesystem-safe: {[p.tag for p in points]}")
    return points


def run_overrides(point: SweepPoint, base_experiment: str, base_run_dir: str) -> list[str]:
    """The overrides of one sweep run: the point's values, its experiment name and run dir."""
    return [
        *point.overrides,
        f"trainer.experiment_name={base_experiment}-{point.tag}",
        f"trainer.default_local_dir={base_run_dir.rstrip('/')}/{point.tag}",
    ]
