"""Checks a config against the machine before any process starts.

``preflight(cfg)`` resolves and validates what a run names, and reports every
problem at once, one line each, no traceback:

- model directories (``actor_rollout_ref.model.path``, ``critic.model.path``):
  ``tiny`` (built on first use), a local Hugging Face directory, or a hub id
  found in the local Hugging Face cache (``HF_HUB_OFFLINE`` semantics: nothing
  is downloaded; a missing one says how to fetch it). Hub ids come back as
  their snapshot directory, so no child process goes to the hub;
- data files (``data.train_files``, ``data.val_files``, or ``relay eval --data``);
- tools with their ``agent.tool_configs`` options, the reward (and the dataset
  fields it needs), the chat template;
- prompt lengths: the rows rendered by the configured agent and counted by the
  policy's tokenizer against ``data.max_prompt_length``, as the learner will;
- ``trainer.resume_mode=auto``: a checkpoint in the run directory whose config
  differs from this one in what it trains (model, data, algorithm, optimizer,
  agent) is refused with the differences and the two ways forward.

It returns the config with resolved model paths and the notes to show.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configs.schema import RelayConfig

TINY = "tiny"
TINY_DIR = Path("runs/models/tiny")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class PreflightError(Exception):
    """Problems found before start-up; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- models


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def resolve_model_path(path: str, key: str) -> str:
    """A local model directory for ``path`` (``key`` names the setting in messages); raises
    ``PreflightError`` with one line when there is none."""
    if path == TINY:
        from launcher.tiny_model import build_tiny_model

        return str(build_tiny_model(TINY_DIR))
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise PreflightError([f"{key}={path}: the directory has no config.json (not a Hugging Face model directory)"])
        return str(local)
    if HUB_ID.fullmatch(path) and not path.startswith("."):
        from huggingface_hub import snapshot_download

        try:
            snapshot = snapshot_download(path, local_files_only=True)
        except Exception:  # LocalEntryNotFoundError and friends: not cached
            raise PreflightError([
                f"{key}={path}: not a local directory and not in the Hugging Face cache ({hf_cache_dir()}); "
                f"Relay never downloads at run time: fetch it first with `hf download {path}` "
                f"(`huggingface-cli download {path}` in older versions), or give a local directory"
            ]) from None
        if not (Path(snapshot) / "config.json").is_file():
            raise PreflightError([f"{key}={path}: the cached snapshot {snapshot} has no config.json; fetch it again with `hf download {path}`"])
        return snapshot
    raise PreflightError([f"{key}={path}: no such model directory (nor a Hugging Face id like Qwen/Qwen2.5-0.5B-Instruct)"])


def _with_model_paths(cfg: RelayConfig, policy: str, critic: str) -> RelayConfig:
    arr = cfg.actor_rollout_ref
    return cfg.model_copy(update={
        "actor_rollout_ref": arr.model_copy(update={"model": arr.model.model_copy(update={"path": policy})}),
        "critic": cfg.critic.model_copy(update={"model": cfg.critic.model.model_copy(update={"path": critic})}),
    })


def _check_models(cfg: RelayConfig, report: Report) -> RelayConfig | None:
    policy_key = "actor_rollout_ref.model.path"
    try:
        policy = resolve_model_path(cfg.actor_rollout_ref.model.path, policy_key)
    except PreflightError as e:
        report.problems += e.problems
        return None
    critic = cfg.critic.model.path or policy
    if critic == cfg.actor_rollout_ref.model.path:
        critic = policy
    elif cfg.algorithm.adv_estimator == "gae":
        try:
            critic = resolve_model_path(critic, "critic.model.path")
        except PreflightError as e:
            report.problems += e.problems
    return _with_model_paths(cfg, policy, critic)


# --------------------------------------------------------------------------- data, tools, reward


def _load(files: list[str], cfg: RelayConfig, what: str, report: Report) -> list[dict[str, Any]]:
    from envs.data import DataError, load_rows

    try:
        return load_rows(files, cfg.data.prompt_key)
    except DataError as e:
        report.problems.append(f"{what}: {e}")
        return []


def _check_external(cfg: RelayConfig, report: Report) -> None:
    """``agent.agent_type=external``: the entrypoint loads and is an async function."""
    if cfg.agent.agent_type != "external":
        if cfg.agent.entrypoint:
            report.notes.append(f"agent.entrypoint={cfg.agent.entrypoint} has no effect: agent.agent_type={cfg.agent.agent_type} "
                                "(set agent.agent_type=external to run it)")
        return
    if not cfg.agent.entrypoint:
        report.problems.append("agent.agent_type=external needs agent.entrypoint=path/to/agent.py:run (or package.module:run)")
        return
    from actors.external import load_entrypoint

    try:
        load_entrypoint(cfg.agent.entrypoint)
    except Exception as e:
        report.problems.append(f"agent.entrypoint: {_one_line(e)}")


def _source(cfg: RelayConfig, report: Report) -> list[dict[str, Any]]:
    from envs.tasks.rgym import source_rows

    try:
        return source_rows(cfg.data.source, {**cfg.data.source_options, "size": min(64, int(cfg.data.source_options.get("size", 1000)))},
                           cfg.data.seed)
    except (ImportError, ValueError) as e:
        report.problems.append(f"data.source={cfg.data.source}: {_one_line(e)}")
        return []


def _verifiers_rows(cfg: RelayConfig, report: Report) -> list[dict[str, Any]]:
    """``env.type=verifiers``: the package and ``uv`` are there and the taskset loads (its rows)."""
    from envs import verifiers_env

    try:
        verifiers_env.prepare_process()
        return verifiers_env.task_rows(cfg.env.id, cfg.env.args, cfg.env.size, cfg.data.prompt_key)
    except verifiers_env.VerifiersError as e:
        report.problems.append(_one_line(e))
    except Exception as e:  # the environment's own code
        report.problems.append(f"env.id={cfg.env.id}: loading its taskset failed: {type(e).__name__}: {_one_line(e)}")
    return []


def _check_tools(cfg: RelayConfig, report: Report) -> bool:
    from envs.tools import TOOL_ALIASES, get_tool, registered_tools

    ok = True
    names = set(cfg.agent.tools) | {TOOL_ALIASES.get(t, t) for t in cfg.agent.tools}
    for name in cfg.agent.tool_configs:
        if name not in names:
            report.problems.append(
                f"agent.tool_configs.{name}: '{name}' is not in agent.tools {cfg.agent.tools}")
            ok = False
    for name in cfg.agent.tools:
        if name.startswith("mcp:"):  # a tool server: its tools are listed when the agent is built (envs.agents)
            continue
        options = cfg.agent.tool_configs.get(name, cfg.agent.tool_configs.get(TOOL_ALIASES.get(name, name), {}))
        try:
            get_tool(name, **options)
        except Exception as e:
            hint = ""
            if TOOL_ALIASES.get(name, name) == "search" and "exactly one" in str(e):
                hint = f"; set agent.tool_configs.{name}.corpus=FILE.jsonl or agent.tool_configs.{name}.endpoint=URL"
            if isinstance(e, KeyError) and str(e.args[0]).startswith("unknown tool"):
                hint = _did_you_mean(name, [*registered_tools(), *TOOL_ALIASES])
            report.problems.append(f"agent.tools: {name}: {_one_line(e)}{hint}")
            ok = False
    return ok


def _did_you_mean(name: str, known: list[str]) -> str:
    import difflib

    near = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
    return f"; did you mean '{near[0]}'?" if near else ""


def _one_line(e: BaseException) -> str:
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _reward_fields(fn) -> set[str]:
    """Dataset fields a reward function requires (its parameters after the first two, without defaults)."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty}


def _check_reward(cfg: RelayConfig, rows: list[dict[str, Any]], files: list[str], report: Report) -> None:
    from envs.rewards import get_reward, registered_rewards

    try:
        reward = get_reward(cfg.agent.reward_name)
    except Exception as e:
        hint = _did_you_mean(cfg.agent.reward_name, registered_rewards()) if str(e).startswith(("unknown reward", "'unknown reward")) else ""
        report.problems.append(f"agent.reward_name={cfg.agent.reward_name}: {_one_line(e)}{hint}")
        return
    if rows:
        missing = sorted(_reward_fields(reward.fn) - set(rows[0]))
        if missing:
            report.problems.append(
                f"agent.reward_name={cfg.agent.reward_name} needs dataset field(s) {missing}, "
                f"but the rows of {', '.join(files)} have {sorted(rows[0])}")


def _check_template(cfg: RelayConfig, report: Report) -> None:
    from envs.templates import CHAT_TEMPLATES

    if cfg.agent.template is not None and cfg.agent.template not in CHAT_TEMPLATES:
        report.problems.append(f"agent.template={cfg.agent.template}: unknown chat template; known: {', '.join(sorted(CHAT_TEMPLATES))}")


# --------------------------------------------------------------------------- prompt lengths


def _suggest_length(longest: int) -> int:
    return max(512, -(-longest // 256) * 256)


def _span(lengths: list[int]) -> str:
    return f"{min(lengths)}" if min(lengths) == max(lengths) else f"{min(lengths)}-{max(lengths)}"


LENGTH_SAMPLE = 1024
"""Most rows per file set whose rendered length the launcher measures."""


def _length_counter(cfg: RelayConfig):
    """``rows -> [tokens of each row's rendered prompt]``: the learner's own count
    (``learner.prompts.prompt_lengths``), so both measure alike."""
    from learner.prompts import prompt_lengths

    return lambda rows: prompt_lengths(cfg, rows)


def _check_lengths(cfg: RelayConfig, sets: list[tuple[str, list[dict[str, Any]]]], report: Report) -> None:
    data, limit = cfg.data, cfg.data.max_prompt_length
    prompt_lengths = None
    for what, all_rows in sets:
        if not all_rows:
            continue
        stride = -(-len(all_rows) // LENGTH_SAMPLE)
        rows = all_rows[::stride]  # the learner measures every row; here an even sample is enough
        of = f" (a sample of {len(rows)} of {len(all_rows)})" if stride > 1 else ""
        sampled = "sampled " if stride > 1 else ""
        try:
            prompt_lengths = prompt_lengths or _length_counter(cfg)
            lengths = prompt_lengths(rows)
        except Exception as e:  # a template or tokenizer that cannot render these rows
            report.problems.append(f"{what} prompts cannot be rendered by agent.agent_type={cfg.agent.agent_type}: {_one_line(e)}")
            return
        over = [i for i, n in enumerate(lengths) if n > limit]
        if not over:
            continue
        span = f"rendered {what} prompts{of} (with the agent's template, system prompt and tool descriptions) are {_span(lengths)} tokens"
        if data.filter_overlong_prompts and len(over) == len(rows):
            report.problems.append(
                f"every {what} prompt is longer than data.max_prompt_length={limit}: {span}; "
                f"raise data.max_prompt_length (e.g. data.max_prompt_length={_suggest_length(max(lengths))})")
        elif data.filter_overlong_prompts:
            report.notes.append(
                f"data.max_prompt_length={limit}: {len(over)} of {len(rows)} {sampled}{what} prompts are longer "
                f"(up to {max(lengths)} tokens) and are dropped; raise data.max_prompt_length to keep them")
        elif data.truncation == "error":
            report.problems.append(
                f"{len(over)} of {len(rows)} {sampled}{what} prompts are longer than data.max_prompt_length={limit} "
                f"(first: prompt {over[0] * stride + 1}, {lengths[over[0]]} tokens; {span}) and data.truncation=error; "
                f"raise data.max_prompt_length, or set data.filter_overlong_prompts=true or data.truncation=left|right")
        else:
            report.notes.append(
                f"data.truncation={data.truncation}: {len(over)} of {len(rows)} {sampled}{what} prompts are cut to "
                f"data.max_prompt_length={limit} tokens (longest {max(lengths)})")


def _check_context(cfg: RelayConfig, model_dir: str, report: Report) -> None:
    import json

    try:
        positions = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return
    context = min(filter(None, [positions, cfg.actor_rollout_ref.rollout.max_model_len])) if positions else None
    if context is None:
        return
    need = cfg.data.max_prompt_length + cfg.actor_rollout_ref.rollout.response_length
    if need > context:
        report.notes.append(
            f"data.max_prompt_length + rollout.response_length = {need} tokens exceeds the model's context of "
            f"{context}: long episodes stop when the context is full")


# --------------------------------------------------------------------------- resume

RESUME_KEYS = (
    "actor_rollout_ref.model.",
    "actor_rollout_ref.actor.optim.",
    "actor_rollout_ref.actor.",
    "critic.",
    "algorithm.",
    "agent.",
    "data.train_files",
    "data.prompt_key",
    "data.train_batch_size",
    "data.max_prompt_length",
    "data.filter_overlong_prompts",
    "data.truncation",
    "data.shuffle",
    "data.seed",
    "actor_rollout_ref.rollout.response_length",
    "actor_rollout_ref.rollout.temperature",
    "actor_rollout_ref.rollout.top_p",
    "actor_rollout_ref.rollout.top_k",
    "trainer.seed",
)
"""Keys whose change makes a checkpoint belong to another experiment (prefixes end in '.')."""

RESUME_FREE = (
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
    "actor_rollout_ref.actor.use_dynamic_bsz",
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu",
    "actor_rollout_ref.actor.fsdp_config.",
    "critic.ppo_micro_batch_size_per_gpu",
    "critic.model.fsdp_config.",
    "agent.tool_timeout_s",
)
"""Keys under ``RESUME_KEYS`` that only change how the same training runs."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and not (prefix.startswith("agent.tool_configs.") and not tree):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: tree}
    return {prefix[:-1]: tree}


def _matters(key: str) -> bool:
    hit = lambda rules: any(key == r or (r.endswith(".") and key.startswith(r)) for r in rules)  # noqa: E731
    return hit(RESUME_KEYS) and not hit(RESUME_FREE)


def resume_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each key that matters for resuming, between two config dumps."""
    a, b = _flat(old), _flat(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if _matters(key) and a.get(key) != b.get(key):
            lines.append(f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}")
    return lines


def _check_resume(cfg: RelayConfig, report: Report) -> None:
    from configs.loader import ConfigError, load_config

    if cfg.trainer.resume_mode != "auto":
        return
    run_dir = Path(cfg.trainer.default_local_dir)
    done = sorted(
        (int(p.parent.name.rsplit("_", 1)[1]), p.parent) for p in (run_dir / "checkpoints").glob("global_step_*/COMPLETE")
    )
    saved = run_dir / "config.yaml"
    if not done or not saved.is_file():
        return
    try:
        old = load_config([saved])
    except ConfigError as e:
        report.problems.append(f"trainer.resume_mode=auto: cannot read the config of the run to resume ({saved}): {_one_line(e)}")
        return
    diff = resume_diff(old.model_dump(mode="json"), cfg.model_dump(mode="json"))
    if diff:
        report.problems.append(
            f"trainer.resume_mode=auto would resume {done[-1][1]}, trained with a different config:\n    "
            + "\n    ".join(diff)
            + f"\n  to start a new run, set a new trainer.experiment_name (now {cfg.trainer.experiment_name!r}); "
            "to start over in this directory, set trainer.resume_mode=disable"
        )
        return
    step = done[-1][0]
    total = cfg.trainer.total_training_steps
    if total is not None and step >= total:
        report.notes.append(
            f"trainer.resume_mode=auto: {done[-1][1]} already reached trainer.total_training_steps={total}; "
            "nothing is left to train (raise trainer.total_training_steps to train longer)")


# --------------------------------------------------------------------------- entry


def preflight(
    cfg: RelayConfig,
    *,
    data_files: list[str] | None = None,
    model: str | None = None,
    resume: bool = True,
    lengths: bool = True,
    data: bool = True,
) -> tuple[RelayConfig, list[str]]:
    """Check ``cfg`` (see the module docstring); returns (config with resolved model paths,
    notes). ``data_files``/``model``: ``relay eval``'s ``--data``/``--model`` instead of the
    config's; ``data=False`` skips the data files (``relay actor``: actors get their prompts
    from the learner). Raises ``PreflightError`` with every problem found."""
    report = Report()
    if model is not None:
        cfg = _with_model_paths(cfg, model, cfg.critic.model.path or model)
    resolved = _check_models(cfg, report)
    if not data:
        sets = []
    elif data_files is None:
        sets = [("train", cfg.data.train_files), ("validation", cfg.data.val_files)]
    else:
        sets = [("eval", data_files)]
    keys = {"train": "data.train_files", "validation": "data.val_files", "eval": "--data"}
    verifiers = cfg.env.type == "verifiers"
    if data and verifiers:  # the environment's taskset is the data
        if data_files is not None or cfg.data.val_files:
            report.problems.append(f"env.type=verifiers: prompts come from env.id={cfg.env.id}'s taskset; "
                                   + ("relay eval --data is" if data_files is not None else "data.val_files is")
                                   + " not supported with it (set data.val_files=[])")
        sets = []
    if data_files is None and cfg.data.source:  # generated training prompts (reasoning_gym:NAME), no train files
        sets = [(what, files) for what, files in sets if what != "train"]
    loaded = [(what, files, _load(files, cfg, keys[what], report))
              for what, files in sets if files]
    if data and data_files is None and cfg.data.source and not verifiers:
        loaded.insert(0, ("train", [cfg.data.source], _source(cfg, report)))
    if data and verifiers and data_files is None:
        loaded.insert(0, ("train", [f"env.id={cfg.env.id}"], _verifiers_rows(cfg, report)))
    _check_template(cfg, report)
    tools_ok = _check_tools(cfg, report)
    _check_external(cfg, report)
    if loaded and not verifiers:  # a verifiers environment scores with its own rubric
        _check_reward(cfg, loaded[0][2], loaded[0][1], report)
    if resolved is not None:
        cfg = resolved
        if resume:
            _check_resume(cfg, report)
        if lengths and tools_ok and not report.problems:
            _check_lengths(cfg, [(what, rows) for what, _, rows in loaded], report)
            _check_context(cfg, cfg.actor_rollout_ref.model.path, report)
    if report.problems:
        raise PreflightError(report.problems)
    return cfg, report.notes
