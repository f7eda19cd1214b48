"""Built-in light tools: ``calculator`` and ``answer``."""

from __future__ import annotations

import ast
import math
import operator

from envs.base import ToolResult
from envs.lru import SizedLRU
from envs.tools.base import tool

MAX_EXPONENT = 1000
"""Largest absolute exponent ``**`` accepts (keeps ``9**9**9`` from hanging the actor)."""

MAX_INT_DIGITS = 4000
"""Largest intermediate integer size in decimal digits (under Python's str-conversion limit)."""

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if type(node.value) in (int, float):
            return node.value
        raise ValueError(f"unsupported literal {node.value!r}")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} exceeds the limit of {MAX_EXPONENT}")
            if isinstance(left, int) and isinstance(right, int) and right > 0:
                if abs(left) > 1 and right * math.log10(abs(left)) > MAX_INT_DIGITS:
                    raise ValueError(f"result would exceed {MAX_INT_DIGITS} digits")
        if isinstance(node.op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
            if len(str(abs(left))) + len(str(abs(right))) > MAX_INT_DIGITS:
                raise ValueError(f"result would exceed {MAX_INT_DIGITS} digits")
        result = _BINOPS[type(node.op)](left, right)
        if isinstance(result, complex):
            raise ValueError("result is a complex number")
        return result
    raise ValueError(f"unsupported expression element '{type(node).__name__}'")


def format_number(value: int | float) -> str:
    """Integers (and integral floats) without ``.0``; other floats as Python's shortest repr."""
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        return repr(value)
    return str(value)


def _parse(expression: str) -> ast.Expression:
    try:
        return ast.parse(expression, mode="eval")
    except SystemError:
        # CPython 3.11 (gh-106905): a parse nested in this one (a finalizer run by the GC that
        # formats a traceback) corrupts the AST depth counter; the expression itself is fine
        return ast.parse(expression, mode="eval")


def evaluate(expression: str) -> int | float:
    """Evaluate arithmetic safely (no ``eval``): numbers, + - * / // % **, unary minus, parentheses."""
    return _eval(_parse(expression.strip()))


@tool(inline=True)  # bounded: MAX_EXPONENT and MAX_INT_DIGITS cap every step
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return the number.

    Args:
        expression: Arithmetic using numbers, + - * / // % ** and parentheses, e.g. "123*45".
    """
    answer = _ANSWERS.get(expression)
    if answer is None:  # a pure function: a group's chains often ask the same; one that raises is not kept
        answer = format_number(evaluate(expression))
        _ANSWERS.put(expression, answer, len(expression) + len(answer))
    return answer


_ANSWERS = SizedLRU(4 << 20)
"""``calculator``'s latest answers, by expression."""


@tool(inline=True)
def answer(answer: str) -> ToolResult:
    """Submit the final answer; this ends the episode.

    Args:
        answer: The final answer to the question.
    """
    return ToolResult(text=f"Final answer submitted: {answer}", final_answer=answer)
