"""Environments: tools, agents' turn logic, reward functions, datasets, chat templates.

Never imports ``learner/`` or ``actors/``. The contract the rollout loop uses is
in ``envs/base.py``.
"""

from envs.agents import AGENT_TYPES, make_agent

__all__ = ["AGENT_TYPES", "make_agent"]
