"""The ``calculator`` toolset of ``vf_calc``: an MCP server verifiers starts
(``python -m vf_calc.tools``), one for the environment."""

import ast
import operator

import verifiers.v1 as vf

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.USub: operator.neg}


def _eval(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))
    raise ValueError("only numbers and + - * /")


class Calculator(vf.Toolset[vf.SharedToolsetConfig]):
    TOOL_PREFIX = None  # advertised as plain `calculator`, the name Relay's demo model learned

    @vf.tool
    async def calculator(self, expression: str) -> str:
        """Evaluate an arithmetic expression, e.g. 12 * 34."""
        try:
            value = _eval(ast.parse(expression, mode="eval").body)
        except (SyntaxError, ValueError, ZeroDivisionError) as e:
            return f"Error: {e}"
        return str(int(value) if float(value).is_integer() else value)


if __name__ == "__main__":
    Calculator.run()
