"""A verifiers 0.4 environment for Relay's ``env.type=verifiers``: arithmetic questions, a
``calculator`` toolset, and a rubric that rewards the right number in the last reply.

    PYTHONPATH=examples/verifiers relay train -c demo env.type=verifiers env.id=vf_calc data.val_files=[]

``env.args.count`` (default 64) and ``env.args.seed`` (default 0) size and draw the tasks.
"""

import random
import re

import verifiers.v1 as vf

from vf_calc.tools import Calculator


class CalcData(vf.TaskData):
    answer: str = ""


class CalcConfig(vf.TasksetConfig):
    count: int = 64
    """Tasks in the taskset."""
    seed: int = 0
    """Seed of the operands."""


class CalcTask(vf.Task[CalcData]):
    @vf.reward(weight=1.0)
    async def correct(self, trace: vf.Trace) -> float:
        replies = trace.assistant_messages
        numbers = re.findall(r"-?\d+", str(replies[-1].content or "")) if replies else []
        return 1.0 if numbers and numbers[-1] == self.data.answer else 0.0


class CalcTaskset(vf.Taskset[CalcTask, CalcConfig]):
    @classmethod
    def toolsets(cls, config):
        """One calculator server for the whole environment (a task's own ``toolsets`` would start one per episode)."""
        return [Calculator(vf.SharedToolsetConfig())]

    def load(self):
        rng = random.Random(self.config.seed)
        for _ in range(self.config.count):
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            yield CalcTask(CalcData(prompt=f"What is {a} * {b}?", answer=str(a * b)), self.config.task)


__all__ = ["CalcTaskset"]
