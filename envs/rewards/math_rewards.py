"""Math rewards: string equality on the last number, and GSM8K's ``#### N`` ground truth."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from envs.rewards.base import TrajectoryInfo, reward

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_number(text: str | None) -> str | None:
    """The last number written in ``text`` (commas allowed), as written; ``None`` when there is none."""
    if not text:
        return None
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def normalize_number(text: str) -> str:
    """``"1,234.0"`` → ``"1234"``, ``"$5.50"`` → ``"5.5"``, ``"-0"`` → ``"0"``; non-numbers are only stripped."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return s
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def gsm8k_ground_truth(answer: str) -> str:
    """The number on the ``#### N`` line of a GSM8K ``answer`` field, or the whole field when
    it is just a number (verl's GSM8K parquet: ``reward_model.ground_truth`` is ``"72"``)."""
    if "####" not in answer and re.fullmatch(r"\s*-?[\d,]*\.?\d+\s*", answer):
        return normalize_number(answer)
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####' line: {answer[-80:]!r}")
    return normalize_number(answer.split("####")[-1])


@reward("math_reward_string_equal", inline=True)
def math_reward_string_equal(final_answer: str | None, trajectory: TrajectoryInfo, answer: str) -> float:
    """1.0 when the last number of the final answer equals ``answer`` after normalisation."""
    pred = last_number(final_answer)
    return float(pred is not None and normalize_number(pred) == normalize_number(str(answer)))


@reward("gsm8k_reward", inline=True)
def gsm8k_reward(final_answer: str | None, trajectory: TrajectoryInfo, answer: str) -> float:
    """1.0 when the last number of the final answer equals the ``#### N`` line of ``answer``."""
    pred = last_number(final_answer)
    return float(pred is not None and normalize_number(pred) == gsm8k_ground_truth(answer))


# ----------------------------------------------------------------------------- equivalence

FORMAT_BONUS = 0.1
"""``math_reward_format``: added when the final answer has an extractable mathematical answer."""
TOOL_BONUS = 0.1
"""``math_reward_format``: added when the episode called at least one tool."""


def _math_verify_timeouts() -> dict[str, int | None]:
    # math-verify's timeouts use SIGALRM, which only works in the main thread.
    import threading

    main = threading.current_thread() is threading.main_thread()
    return {"parsing_timeout": 5 if main else None, "timeout_seconds": 5 if main else None}


def _gold_text(answer: str) -> str:
    return answer.split("####")[-1].strip() if "####" in answer else answer.strip()


def _sympy_equal(gold: str, pred: str) -> bool:
    """Fallback when math-verify extracts nothing: sympy parses both strings whole."""
    import sympy
    from sympy.parsing.sympy_parser import parse_expr, standard_transformations, implicit_multiplication_application

    transformations = standard_transformations + (implicit_multiplication_application,)
    try:
        a = parse_expr(gold.replace("^", "**"), transformations=transformations, evaluate=True)
        b = parse_expr(pred.replace("^", "**"), transformations=transformations, evaluate=True)
        return bool(sympy.simplify(a - b) == 0)
    except Exception:  # unparsable text is simply not equal
        return False


def math_equal(final_answer: str | None, answer: str) -> tuple[bool, bool]:
    """(equivalent, extractable): math-verify on the final answer against ``answer``, then sympy."""
    if not final_answer:
        return False, False
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    t = _math_verify_timeouts()
    gold_text = _gold_text(str(answer))
    gold = parse(gold_text, parsing_timeout=t["parsing_timeout"])
    if "$" not in gold_text and "\\" not in gold_text and not gold:
        gold = parse(f"${gold_text}$", parsing_timeout=t["parsing_timeout"])
    pred = parse(final_answer, parsing_timeout=t["parsing_timeout"])
    if gold and pred:
        return bool(verify(gold, pred, timeout_seconds=t["timeout_seconds"])), True
    return _sympy_equal(gold_text, final_answer), bool(pred)


@reward("math_reward")
def math_reward(final_answer: str | None, trajectory: TrajectoryInfo, answer: str) -> float:
    """1.0 when the final answer is mathematically equivalent to ``answer`` (math-verify, then sympy).

    A GSM8K-style ``answer`` (with a ``#### N`` line) is compared on ``N``.
    """
    return float(math_equal(final_answer, answer)[0])


@reward("math_reward_format")
def math_reward_format(final_answer: str | None, trajectory: TrajectoryInfo, answer: str) -> dict[str, float]:
    """Components ``correct`` (0/1), ``format`` (``FORMAT_BONUS`` for an extractable, untruncated
    answer), ``tool`` (``TOOL_BONUS`` when any tool was called); ``reward`` is their sum."""
    correct, extractable = math_equal(final_answer, answer)
    return {
        "correct": float(correct),
        "format": FORMAT_BONUS if extractable and not trajectory.truncated else 0.0,
        "tool": TOOL_BONUS if trajectory.tool_calls else 0.0,
    }
