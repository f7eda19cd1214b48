"""``code_reward``: the fraction of the row's test cases the final answer's code passes.

The row's ``tests`` field is a list of Python statements (typically
``assert f(2) == 4``). The program is the last ```` ```python ```` block of the
final answer (the whole answer when there is none). Each test runs in its own
sandbox process (``envs.sandbox``) as ``program + test + print(nonce)``; it
passes when the process exits 0 and its output ends with the nonce line, so a
program that exits early does not pass. Not closed: a program that reads its
own ``main.py`` can find the nonce. The function blocks (it runs its own event
loop in a worker thread); call it off the actor's event loop. It waits at most
``run_deadline_s(len(tests))``: every sandbox is bounded by its wall time, so
only a bug can reach that bound, and then it raises ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import re
import secrets
import threading

from envs.rewards.base import TrajectoryInfo, reward
from envs.sandbox import STOP_GRACE_S, SandboxLimits, run_python

TEST_LIMITS = SandboxLimits(wall_s=10.0, cpu_s=5, max_output_bytes=16_000)
TEST_CONCURRENCY = 4

_CODE_BLOCK = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.DOTALL)


def extract_program(final_answer: str) -> str:
    blocks = _CODE_BLOCK.findall(final_answer)
    return blocks[-1] if blocks else final_answer


async def _passes(program: str, test: str, gate: asyncio.Semaphore) -> bool:
    nonce = secrets.token_hex(16)
    async with gate:
        result = await run_python(f"{program}\n\n{test}\nprint({nonce!r})\n", TEST_LIMITS)
    return result.ok and result.output.rstrip("\n").endswith(nonce)


async def _count_passed(program: str, tests: list[str]) -> int:
    gate = asyncio.Semaphore(TEST_CONCURRENCY)
    return sum(await asyncio.gather(*(_passes(program, t, gate) for t in tests)))


@reward("code_reward")
def code_reward(final_answer: str | None, trajectory: TrajectoryInfo, tests: list[str]) -> float:
    """Fraction of ``tests`` passed by the final answer's program (0 with no answer)."""
    if not tests:
        raise ValueError("code_reward: the row has no tests")
    if not final_answer:
        return 0.0
    program = extract_program(final_answer)
    deadline = run_deadline_s(len(tests))
    passed = _run_in_thread(_count_passed(program, list(tests)), deadline, f"code_reward: {len(tests)} test(s)")
    return passed / len(tests)


def run_deadline_s(num_tests: int) -> float:
    """Longest ``code_reward`` waits for ``num_tests`` tests: rounds of ``TEST_CONCURRENCY``
    sandboxes, each at most its wall time plus the sandbox's stopping grace, and a margin."""
    return math.ceil(num_tests / TEST_CONCURRENCY) * (TEST_LIMITS.wall_s + 2 * STOP_GRACE_S) + 30.0


def _run_in_thread(coro, timeout_s: float, what: str):
    """``asyncio.run(coro)`` in a daemon thread (this thread may have a running loop); its result
    within ``timeout_s``, else ``TimeoutError`` (the thread is left to finish on its own)."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def work() -> None:
        try:
            future.set_result(asyncio.run(coro))
        except BaseException as e:  # noqa: BLE001  handed to the waiting thread
            future.set_exception(e)

    threading.Thread(target=work, name="code-reward", daemon=True).start()
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"{what} did not finish within {timeout_s:g} s") from None
