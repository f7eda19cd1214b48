"""A small MCP tool server (stdio): arithmetic tools for ``agent.tools=[mcp:calc]``.

    relay train -c demo agent.tools=[mcp:calc] 'agent.mcp_servers.calc.command=python examples/mcp/calc_server.py'

Written with the ``mcp`` SDK (2.x, ``MCPServer``); any MCP server works the
same way, started by command (stdio) or reached by URL (streamable HTTP,
``agent.mcp_servers.NAME.url=http://host:port/mcp``).
"""

from __future__ import annotations

import ast
import operator

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("calc")

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.USub: operator.neg}


@server.tool()
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / and parentheses, e.g. 12*(3+4)."""

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ToolError("only numbers and + - * / are allowed")

    try:
        value = ev(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ZeroDivisionError) as e:
        raise ToolError(str(e)) from None
    return str(int(value) if float(value).is_integer() else value)


if __name__ == "__main__":
    server.run("stdio")
