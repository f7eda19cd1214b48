"""An external agent: a plain ``openai`` client loop with function calling and one tool.

Train it with ``agent.agent_type=external agent.entrypoint=examples/external/openai_agent.py:run``
(see docs/environments.md). The actor hands ``run`` a dataset row and an
``openai.AsyncOpenAI`` bound to the episode on its endpoint; every token the
model samples here is recorded and trained on exactly as sampled. The return
value is the final answer, which the configured ``agent.reward_name`` scores.

Nothing here is Relay-specific: point the same function at any OpenAI-compatible
server (``AsyncOpenAI(base_url=..., api_key=...)``) and it runs there too.
"""

from __future__ import annotations

import ast
import json
import operator

TOOLS = [{
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression with + - * / and parentheses.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 12*(3+4)"}},
            "required": ["expression"],
        },
    },
}]

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv, ast.USub: operator.neg}


def calculator(expression: str) -> str:
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError("only numbers and + - * / are allowed")

    try:
        value = ev(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError) as e:
        return f"Error: {e}"
    return str(int(value) if float(value).is_integer() else value)


async def run(row: dict, client) -> str | None:
    messages = [
        {"role": "system", "content": "Use the calculator tool, then reply with the number only."},
        {"role": "user", "content": row["question"]},
    ]
    for _ in range(4):
        response = await client.chat.completions.create(model="relay", messages=messages, tools=TOOLS)
        message = response.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        if not message.tool_calls:
            return message.content
        for call in message.tool_calls:
            try:
                args = json.loads(call.function.arguments)
                result = calculator(**args) if call.function.name == "calculator" else f"Error: unknown tool {call.function.name}"
            except (json.JSONDecodeError, TypeError) as e:
                result = f"Error: bad arguments: {e}"
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    return None
