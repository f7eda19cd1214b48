"""verifiers environments: ``env.type=verifiers env.id=NAME``.

A `verifiers <https://github.com/PrimeIntellect-ai/verifiers>`_ 0.4 (v1)
environment is an installed (or importable) package with a taskset: its tasks
are the dataset, its ``@vf.reward`` functions the rubric, its toolsets (MCP
servers) the tools, and verifiers' harness plays each episode. Relay loads it
with verifiers' own loader, a single-agent environment with the ``null``
harness (a plain chat loop with the tasks' tools) on the ``subprocess``
runtime, and runs every episode against the actor's OpenAI-compatible
endpoint (``actors/endpoint.py``), which records the exact token ids; the
reward is the trace's reward (the weighted sum of the rubric).

* The learner's training rows are the taskset's tasks (``task_rows``): the
  prompt text under ``data.prompt_key`` (for the prompt-length filter and the
  logs) plus the task's position ``vf_idx``; the actor plays the task at that
  position of its own copy of the taskset and refuses a row whose prompt differs
  (learner and actor loaded different environments).
* ``env.args`` go to the taskset's config (``taskset={"id": NAME, **args}``);
  ``env.size`` takes the first N tasks (needed for an endless taskset).

Install: ``pip install 'relay-rl[verifiers]'`` (``verifiers==0.4.*`` and
``uv``). The harness program runs under ``uv`` (a PEP 723 script whose
packages uv resolves from PyPI the first time, then from its cache), so the
``uv`` of that install must be on ``PATH``: the actor puts its interpreter's
``bin/`` first when ``uv`` is there.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

INDEX_KEY = "vf_idx"
"""The row field holding the task's position in the taskset."""

API_KEY_VAR = "RELAY_VERIFIERS_API_KEY"
"""The environment variable verifiers reads the endpoint's API key from (the session key is in the URL)."""


class VerifiersError(RuntimeError):
    """A verifiers environment that cannot be used as configured."""


def vf_module():
    try:
        import verifiers.v1 as vf
    except ImportError:
        raise VerifiersError("env.type=verifiers needs the verifiers package (0.4): pip install 'relay-rl[verifiers]' "
                             "(or pip install 'verifiers==0.4.*' uv)") from None
    return vf


def prepare_process() -> str:
    """Ready this process's environment for verifiers' subprocesses; returns the ``uv`` they will run.

    ``PYTHONPATH`` entries become absolute (verifiers starts toolsets as ``python -m module`` in
    a working directory of its own, where a relative entry would find nothing); this
    interpreter's ``bin/`` goes first on ``PATH`` when it has ``uv``. ``VerifiersError`` when
    there is no ``uv``, since verifiers would then try to download one."""
    if os.environ.get("PYTHONPATH"):
        os.environ["PYTHONPATH"] = os.pathsep.join(
            str(Path(p).resolve()) if p else p for p in os.environ["PYTHONPATH"].split(os.pathsep))
    os.environ.setdefault(API_KEY_VAR, "relay")  # the session key is in the base URL
    here = Path(sys.executable).parent
    if (here / "uv").exists() and str(here) not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = str(here) + os.pathsep + os.environ.get("PATH", "")
    uv = shutil.which("uv")
    if uv is None:
        raise VerifiersError("env.type=verifiers: no 'uv' on PATH; verifiers runs its harness with uv: "
                             "pip install uv (into the environment that runs Relay)")
    return uv


def load_env(env_id: str, args: dict[str, Any] | None = None):
    """The single-agent environment of taskset ``env_id`` (``null`` harness, ``subprocess`` runtime)."""
    vf = vf_module()
    from verifiers.v1.harnesses.null import NullHarnessConfig
    from verifiers.v1.utils.loaders import load_environment

    try:
        config = vf.SingleAgentEnvConfig(
            taskset={"id": env_id, **(args or {})},
            agent=vf.AgentConfig(harness=NullHarnessConfig(id="null"), runtime=vf.SubprocessConfig()),
        )
        return load_environment(config)
    except ModuleNotFoundError as e:
        raise VerifiersError(f"env.id={env_id}: cannot import {e.name!r}; install the environment's package "
                             "or put its folder on PYTHONPATH") from None
    except (ValueError, TypeError) as e:  # pydantic's ValidationError is a ValueError
        raise VerifiersError(f"env.id={env_id}: bad env.args {sorted(args or {})}: {e}") from None


def tasks_of(env: Any, env_id: str, size: int | None) -> list[Any]:
    """The first ``size`` tasks of ``env``'s taskset (all of a finite one when ``size`` is None)."""
    taskset = env.taskset
    if size is None and not taskset.bounded:
        raise VerifiersError(f"env.id={env_id}: the taskset is endless; set env.size=N to train on its first N tasks")
    tasks = []
    for task in taskset:
        if size is not None and len(tasks) >= size:
            break
        tasks.append(task)
    if not tasks:
        raise VerifiersError(f"env.id={env_id}: the taskset has no tasks")
    return tasks


def prompt_text(task: Any) -> str:
    return task.data.prompt_text


def task_rows(env_id: str, args: dict[str, Any] | None, size: int | None, prompt_key: str) -> list[dict[str, Any]]:
    """The learner's rows for the tasks: ``{prompt_key: prompt text, vf_idx: position}``."""
    return [{prompt_key: prompt_text(t), INDEX_KEY: i} for i, t in enumerate(tasks_of(load_env(env_id, args), env_id, size))]


def task_for(tasks: list[Any], row: dict[str, Any], prompt_key: str, env_id: str) -> Any:
    """The task ``row`` names; ``VerifiersError`` when the row is not one of this taskset's."""
    idx = row.get(INDEX_KEY)
    if not isinstance(idx, int) or not 0 <= idx < len(tasks):
        raise VerifiersError(f"env.id={env_id}: row has no task position '{INDEX_KEY}' in [0, {len(tasks)}): {idx!r}")
    task = tasks[idx]
    if prompt_key in row and row[prompt_key] != prompt_text(task):
        raise VerifiersError(f"env.id={env_id}: task {idx} has prompt {prompt_text(task)[:80]!r} here but the learner sent "
                             f"{str(row[prompt_key])[:80]!r}: learner and actor loaded different environments (env.args, env.size)")
    return task


def episode_result(episode: Any) -> tuple[dict[str, float], list[str]]:
    """``(reward components, error messages)`` of a finished verifiers episode: ``reward`` is the
    trace's (the rubric's weighted sum), plus each reward function's and metric's value."""
    trace = episode.traces[-1] if episode.traces else None
    errors = [hint(f"{e.type}: {e.message.strip()}") for e in (list(episode.errors) + (list(trace.errors) if trace else []))]
    if trace is None:
        return {"reward": 0.0}, errors or ["the episode has no trace"]
    scores = {"reward": float(trace.reward or 0.0)}
    for name, r in (trace.rewards or {}).items():  # a weighted reward's value; None: not scored
        if r is not None:
            scores[f"vf_reward/{name}"] = float(r.value)
    for name, value in (trace.metrics or {}).items():
        if isinstance(value, (bool, int, float)):
            scores[f"vf_metric/{name}"] = float(value)
    return scores, errors


def hint(message: str) -> str:
    """``message`` with what usually causes it, for the errors verifiers reports about toolsets."""
    if "did not report its port" in message:
        return (message + " (verifiers starts a toolset as `python -m <its module>` in another directory: the module must be "
                "importable from there, an installed package or an absolute PYTHONPATH entry, and end with "
                "`if __name__ == \"__main__\": <Toolset>.run()`)")
    return message
