"""Synthetic multiplication task: the calculator is needed, copying is learnable.

Questions are products of an ``a_digits``-digit and a ``b_digits``-digit number
("What is 417 * 36?"); a length may be a range, drawn per operand (the demo: 1-4
digits each), so that what pays is a skill (copy both operands into the call,
copy the tool's result into the answer) rather than a pattern of fixed digit
positions. A tiny model cannot multiply in its head, but it can learn to call
``calculator`` and copy. A length outside the trained range (5 digits) tests
whether it learned the skill. Rows look like any dataset
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


Digits = int | tuple[int, int]
"""An operand length: a fixed number of digits, or an inclusive range ``(lo, hi)``."""


def _length_range(digits: Digits) -> tuple[int, int]:
    lo, hi = (digits, digits) if isinstance(digits, int) else digits
    if not 1 <= lo <= hi:
        raise ValueError(f"operand length must be >= 1 digit, as n or (lo, hi) with lo <= hi; got {digits!r}")
    return lo, hi


def _operand(rng: random.Random, digits: tuple[int, int]) -> int:
    # the length first, uniformly (1-digit operands as often as 4-digit ones); a fixed length draws
    # nothing, so fixed-length rows are the same as before ranges existed
    length = digits[0] if digits[0] == digits[1] else rng.randint(*digits)
    return rng.randint(10 ** (length - 1), 10**length - 1)


def make_rows(n: int, seed: int, a_digits: Digits = 3, b_digits: Digits = 2) -> list[dict]:
    """``n`` distinct multiplication problems, deterministic in ``seed``; each operand's length is
    drawn uniformly from its range, then the operand uniformly among numbers of that length."""
    a_range, b_range = _length_range(a_digits), _length_range(b_digits)
    space = sum(9 * 10 ** (la - 1) for la in range(a_range[0], a_range[1] + 1)) * sum(
        9 * 10 ** (lb - 1) for lb in range(b_range[0], b_range[1] + 1)
    )
    if n > space // 2:
        raise ValueError(f"{n} distinct problems asked of {a_digits!r} x {b_digits!r} digits: only {space} exist")
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    rows = []
    while len(rows) < n:
        a, b = _operand(rng, a_range), _operand(rng, b_range)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        rows.append({"question": f"What is {a} * {b}?", "answer": str(a * b), "a": a, "b": b})
    return rows


def write_rows(path: str | Path, rows: list[dict]) -> Path:
    """Write ``rows`` as JSON lines at ``path`` (atomically); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


def write_splits(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0, a_digits: Digits = 3,
                 b_digits: Digits = 2) -> tuple[Path, Path]:
    """Write disjoint ``train.jsonl`` and ``test.jsonl`` splits (same operand lengths); returns their paths."""
    out = Path(out_dir)
    rows = make_rows(n_train + n_test, seed, a_digits, b_digits)
    return write_rows(out / "train.jsonl", rows[:n_train]), write_rows(out / "test.jsonl", rows[n_train:])


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
