"""Synthetic multiplication task: the calculator is needed, copying is learnable.

Questions are products of an ``a_digits``-digit and a ``b_digits``-digit number
("What is 417 * 36?"). A tiny model cannot multiply in its head, but it can
learn to call ``calculator`` and copy the result. Rows look like any dataset
row: ``{"question": ..., "answer": "15012"}``, scored with
``math_reward_string_equal``.

Demonstrations for the supervised warm start are assistant turns in the ``hf``
agent's tool-call format. Only a fraction ``tool_fraction`` of them use the
tool; the rest answer directly (with the true product, which the model cannot
reproduce), so after SFT the model knows both formats but mostly answers
without the tool: exactly the room RL needs to find that calling the tool pays.
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def make_rows(n: int, seed: int, a_digits: int = 3, b_digits: int = 2) -> list[dict]:
    """``n`` distinct multiplication problems, deterministic in ``seed``."""
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    rows = []
    while len(rows) < n:
        a = rng.randint(10 ** (a_digits - 1), 10**a_digits - 1)
        b = rng.randint(10 ** (b_digits - 1), 10**b_digits - 1)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        rows.append({"question": f"What is {a} * {b}?", "answer": str(a * b), "a": a, "b": b})
    return rows


def write_splits(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0) -> tuple[Path, Path]:
    """Write disjoint ``train.jsonl`` and ``test.jsonl`` splits; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = make_rows(n_train + n_test, seed)
    paths = out / "train.jsonl", out / "test.jsonl"
    for path, part in zip(paths, (rows[:n_train], rows[n_train:])):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in part))
        tmp.replace(path)
    return paths


def tool_call_text(expression: str) -> str:
    """The ``hf`` agent's tool-call markup for one calculator call."""
    call = {"name": "calculator", "arguments": {"expression": expression}}
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


def final_text(answer: str) -> str:
    return f"The answer is {answer}."


def demonstration(row: dict, use_tool: bool) -> list[str]:
    """Scripted assistant turns for ``row``: tool call then answer, or a direct answer."""
    if use_tool:
        return [tool_call_text(f"{row['a']} * {row['b']}"), final_text(row["answer"])]
    return [final_text(row["answer"])]


def corpus(n: int = 2000, seed: int = 1) -> list[str]:
    """Texts to train the embedded tokenizer on (questions, tool calls, answers)."""
    texts = []
    for row in make_rows(n, seed):
        texts.append(row["question"])
        texts.extend(demonstration(row, use_tool=True))
    texts.append("You are a helpful assistant. You can call tools: calculator, search, answer, code_interpreter.")
    return texts
