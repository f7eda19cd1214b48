"""``code_interpreter`` (alias ``python_executor``): Python in the sandbox of ``envs.sandbox``.

``make_code_interpreter(**limits)`` builds the tool with ``SandboxLimits``
fields as options (``wall_s``, ``cpu_s``, ``memory_bytes``, ...). Each call is
a fresh process: no state is kept between calls. The observation is the
merged stdout/stderr (``(no output)`` when empty); a failed run (exception,
non-zero exit, any limit) is an error result ``Error: <why>`` followed by the
output so far. Set the tool call timeout above ``wall_s``: the sandbox kills
every process of the run at ``wall_s``; a shorter tool timeout also kills them
(the run is cancelled) but reports only "timed out". ``memory_bytes`` and
``max_processes`` hold for the whole run where the sandbox has a cgroup (see
``envs.sandbox.resource_control()``), per process elsewhere.
"""

from __future__ import annotations

from typing import Any

from envs.base import ToolResult
from envs.sandbox import SandboxLimits, run_python
from envs.tools.base import Tool, tool


def format_result(output: str, error: str | None) -> ToolResult:
    if error is None:
        return ToolResult(text=output if output.strip() else "(no output)")
    return ToolResult(text=f"Error: {error}\n{output}".rstrip("\n"), error=True)


def make_code_interpreter(**limits: Any) -> Tool:
    sandbox_limits = SandboxLimits(**limits)

    @tool(name="code_interpreter")
    async def code_interpreter(code: str) -> ToolResult:
        """Run Python code in a fresh sandboxed process and return what it prints (stdout and stderr).

        Args:
            code: A complete Python program; use print() to show results.
        """
        result = await run_python(code, sandbox_limits)
        return format_result(result.output, result.error)

    return code_interpreter
