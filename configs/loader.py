"""Build a ``RelayConfig`` from YAML presets and verl/Hydra-style overrides.

    cfg = load_config(["configs/demo.yaml"], ["algorithm.adv_estimator=rloo", "agent.tools=[calculator]"])

How a config is assembled:

1. Each preset is read (a preset may list ``defaults: [other.yaml, ...]``,
   relative to itself, which are read first; ``_self_`` in that list places the
   preset's own values) and its nested mappings are flattened to dotted keys.
2. Overrides ``key=value`` follow, in order, exactly as verl/Hydra users type
   them: the value is YAML (``true``, ``1e-6``, ``null``, ``[a,b]``,
   ``['a','b']``); a leading ``+``/``++`` is accepted; ``~key`` resets a key to
   its default.
3. Every key goes through ``ALIASES`` (AgentFly and older verl spellings) to
   its canonical key; unknown keys fail with the nearest valid key.
   Later values win.
4. The dotted keys are nested again and validated by the pydantic schema;
   validation errors are translated to ``<dotted.key>: expected ..., got ...``.
5. ``derive`` fills in the values that follow from others.

Everything raised for bad input is a ``ConfigError``.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from configs.schema import RelayConfig

CONFIG_DIR = Path(__file__).resolve().parent
"""Directory of the bundled presets; preset names like ``demo`` resolve here."""


class ConfigError(ValueError):
    """Any problem with a config: unknown key, wrong type, unreadable preset."""


# --------------------------------------------------------------------------- aliases

ALIASES: dict[str, str] = {
    # AgentFly: the agent's constructor arguments, flattened or nested under init_args.
    "agent.init_args.*": "agent.*",
    "agent.max_steps": "agent.max_turns",
    "agent.model_name_or_path": "actor_rollout_ref.model.path",
    "agent.backend": "actor_rollout_ref.rollout.name",
    # verl: samples per prompt is the agent's group size.
    "actor_rollout_ref.rollout.n": "agent.num_chains",
    # verl keys whose value Relay keeps in one place.
    "actor_rollout_ref.rollout.val_kwargs.temperature": "actor_rollout_ref.rollout.val_temperature",
    "actor_rollout_ref.rollout.prompt_length": "data.max_prompt_length",
    "data.max_response_length": "actor_rollout_ref.rollout.response_length",
    "actor_rollout_ref.rollout.multi_turn.enable": "agent.use_agent",
    "actor_rollout_ref.rollout.multi_turn.max_assistant_turns": "agent.max_turns",
}
"""Alias dotted key -> canonical dotted key. A key ending in ``.*`` is a prefix:
``agent.init_args.X`` becomes ``agent.X``. Aliases chain (``agent.init_args.max_steps``
-> ``agent.max_steps`` -> ``agent.max_turns``)."""

ALIAS_VALUES: dict[str, dict[str, str]] = {
    "agent.backend": {
        "hf": "hf",
        "transformers": "hf",
        "vllm": "vllm",
        "async_vllm": "vllm",
        "verl": "vllm",
        "async_verl": "vllm",
    },
}
"""Value translation for aliases whose values are spelled differently, keyed by the
alias key. A value missing from an alias's table is an error (AgentFly's ``client``
backend, an external OpenAI-style server, has no Relay equivalent)."""


# --------------------------------------------------------------------------- schema walking


def _submodel(field: FieldInfo) -> type[BaseModel] | None:
    ann = field.annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


@functools.cache
def _leaf_fields() -> dict[str, FieldInfo]:
    """Every canonical leaf key with its pydantic field, in schema order."""
    out: dict[str, FieldInfo] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            sub = _submodel(field)
            if sub is None:
                out[prefix + name] = field
            else:
                walk(sub, f"{prefix}{name}.")

    walk(RelayConfig, "")
    return out


@functools.cache
def _sections() -> frozenset[str]:
    """Every dotted key that names a section (a sub-model) rather than a value."""
    return frozenset(k.rsplit(".", i)[0] for k in _leaf_fields() for i in range(1, k.count(".") + 1))


def _alias_step(key: str) -> str | None:
    if key in ALIASES:
        return ALIASES[key]
    for alias, target in ALIASES.items():
        if alias.endswith(".*") and key.startswith(alias[:-1]):
            return target[:-1] + key[len(alias) - 1 :]
    return None


def _alias_chain(key: str) -> list[str]:
    """``[key, ..., canonical]`` following ``ALIASES`` until no alias applies."""
    chain = [key]
    while (nxt := _alias_step(chain[-1])) is not None:
        if nxt in chain:
            raise ConfigError(f"alias cycle: {' -> '.join(chain + [nxt])}")
        chain.append(nxt)
    return chain


def canonical_key(key: str) -> str:
    """The canonical dotted key an (alias) key lands on; the key itself if none applies."""
    return _alias_chain(key)[-1]


def all_keys(aliases: bool = False) -> list[str]:
    """Every valid canonical dotted key; with ``aliases=True`` also every alias spelling
    (prefix aliases expanded over the keys they cover)."""
    keys = list(_leaf_fields())
    if not aliases:
        return keys
    exact = [a for a in ALIASES if not a.endswith(".*")]
    out = keys + exact
    for alias, target in ALIASES.items():
        if alias.endswith(".*"):
            stem = target[:-1]
            out += [alias[:-1] + k[len(stem) :] for k in keys + exact if k.startswith(stem)]
    return list(dict.fromkeys(out))


def key_help() -> dict[str, str]:
    """Canonical dotted key -> its docstring, for ``--help``-style listings."""
    return {k: f.description or "" for k, f in _leaf_fields().items()}


def _schema_default(key: str) -> Any:
    return _leaf_fields()[key].get_default(call_default_factory=True)


def _get(cfg: BaseModel, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _unknown_key(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, all_keys(aliases=True), n=1, cutoff=0.6)
    if near:
        return ConfigError(f"unknown config key '{key}'; did you mean '{near[0]}'?")
    sections = sorted({k.split(".")[0] for k in _leaf_fields()})
    return ConfigError(f"unknown config key '{key}'; top-level sections are {', '.join(sections)}")


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-6`` as a float (YAML 1.2 style, as OmegaConf does)."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader subclass


# --------------------------------------------------------------------------- presets


def list_presets() -> list[str]:
    """Names of the bundled presets (``demo``, ``experiment/quick_test``, ...)."""
    return sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob("*.yaml"))


def resolve_preset(preset: str | Path) -> Path:
    """A preset path as given if it exists, else a bundled preset name (``demo``,
    ``experiment/quick_test``, with or without ``.yaml``)."""
    path = Path(preset)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"preset '{preset}' not found; bundled presets: {', '.join(list_presets())}")


Entry = tuple[str, Any, str]
"""(dotted key as written, value, origin) of one setting."""


def _flatten(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and canonical_key(key) not in _leaf_fields():
            yield from _flatten(value, key + ".")
        else:
            yield key, value


def _read_preset(path: Path, stack: tuple[Path, ...] = ()) -> list[Entry]:
    path = path.resolve()
    if path in stack:
        raise ConfigError(f"{path}: defaults cycle: {' -> '.join(str(p) for p in stack + (path,))}")
    try:
        tree = _yaml(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read preset: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of keys, got {type(tree).__name__}")
    defaults = tree.pop("defaults", [])
    defaults = [defaults] if isinstance(defaults, str) else defaults
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"{path}: 'defaults' must be a list of preset paths, got {defaults!r}")
    if "_self_" not in defaults:
        defaults = [*defaults, "_self_"]
    entries: list[Entry] = []
    for name in defaults:
        if name == "_self_":
            entries += [(k, v, str(path)) for k, v in _flatten(tree)]
            continue
        base = path.parent / name
        if not base.is_file() and base.suffix != ".yaml":
            base = base.with_name(base.name + ".yaml")
        if not base.is_file():
            raise ConfigError(f"{path}: defaults entry '{name}' not found (looked for {base})")
        entries += _read_preset(base, stack + (path,))
    return entries


# --------------------------------------------------------------------------- overrides

_RESET = object()
"""Marker value of a ``~key`` override: forget earlier settings of the key."""


def _is_plain_str_field(field: FieldInfo) -> bool:
    return field.annotation in (str, str | None)


def _parse_override(text: str) -> Entry:
    """``key=value`` -> (key, parsed value, origin). Values are YAML; a string field
    keeps the text as typed (``trainer.experiment_name=007`` stays ``'007'``)."""
    origin = f"override '{text}'"
    body = text.strip()
    if body.startswith("~"):
        return body[1:].split("=", 1)[0].strip(), _RESET, origin
    body = body.lstrip("+")
    key, sep, raw = body.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    raw = raw.strip()
    if raw == "":
        return key, "", origin
    try:
        value = _yaml(raw)
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. starts with '@'): the text itself, checked by the schema
    field = _leaf_fields().get(canonical_key(key))
    if field is not None and _is_plain_str_field(field) and value is not None and not isinstance(value, str):
        value = raw
    return key, value, origin


# --------------------------------------------------------------------------- assembly


def _set(state: dict[str, tuple[Any, str]], key: str, value: Any, origin: str) -> None:
    """Record one setting under its canonical key (later wins), checking the key."""
    chain = _alias_chain(key)
    canon = chain[-1]
    where = f" (in {origin})" if not origin.startswith("override") else ""
    if canon not in _leaf_fields():
        if canon in _sections():
            if value is None or value is _RESET:
                if value is _RESET:
                    for k in [k for k in state if k.startswith(canon + ".")]:
                        del state[k]
                return
            first = next(k for k in _leaf_fields() if k.startswith(canon + "."))
            raise ConfigError(f"'{key}' is a section, not a value; set its keys, e.g. '{first}'{where}")
        raise ConfigError(f"{_unknown_key(key)}{where}")
    if value is _RESET:
        state.pop(canon, None)
        return
    for alias in chain:
        table = ALIAS_VALUES.get(alias)
        if table is None:
            continue
        if not isinstance(value, str) or value not in table:
            raise ConfigError(
                f"{key}: {value!r} has no Relay equivalent; expected one of "
                f"{', '.join(repr(v) for v in table)}{where}"
            )
        value = table[value]
    if _is_plain_str_field(_leaf_fields()[canon]) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # `experiment_name: 7` in YAML means the text "7"
    state[canon] = (value, origin)


_EXPECTED = {
    "float_type": "a number",
    "float_parsing": "a number",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "bool_type": "a boolean (true/false)",
    "bool_parsing": "a boolean (true/false)",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "too_short": "a list of the right length",
    "too_long": "a list of the right length",
    "missing": "one more item (the list is too short)",
}


def _loc_to_key(loc: tuple) -> str:
    """Pydantic error location -> dotted key (``trainer.logger[1]``), dropping union tags."""
    parts: list[str] = []
    model: type[BaseModel] | None = RelayConfig
    for item in loc:
        if isinstance(item, int) and parts:
            parts[-1] += f"[{item}]"
        elif model is not None and item in model.model_fields:
            parts.append(item)
            model = _submodel(model.model_fields[item])
    return ".".join(parts)


def _translate(err: ValidationError, state: dict[str, tuple[Any, str]]) -> ConfigError:
    by_key: dict[str, list[str]] = {}
    got: dict[str, Any] = {}
    for e in err.errors():
        key = _loc_to_key(e["loc"])
        msg = e["msg"]
        if e["type"] in _EXPECTED:
            what = f"expected {_EXPECTED[e['type']]}"
        elif e["type"] == "literal_error":
            what = f"expected one of {e['ctx']['expected']}"
        elif msg.startswith("Input should be "):
            what = "must be " + msg[len("Input should be ") :]
        else:
            what = msg.removeprefix("Value error, ")
        by_key.setdefault(key, [])
        if what not in by_key[key]:
            by_key[key].append(what)
        got.setdefault(key, e.get("input"))
    lines = []
    for key, whats in by_key.items():
        if not key:  # a cross-section check of the root model: its message names the keys
            lines += whats
            continue
        origin = state.get(key.split("[")[0], (None, "override"))[1]
        where = f" (in {origin})" if not origin.startswith("override") else ""
        if len(whats) > 1 and all(w.startswith("expected ") for w in whats):
            whats = ["expected " + " or ".join(w.removeprefix("expected ") for w in whats)]
        lines.append(f"{key}: {' or '.join(whats)}, got {got[key]!r}{where}")
    return ConfigError("\n".join(lines))


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _validate(tree: dict[str, Any], state: dict[str, tuple[Any, str]]) -> RelayConfig:
    try:
        return RelayConfig.model_validate(tree)
    except ValidationError as e:
        raise _translate(e, state) from None


def load_config(presets: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> RelayConfig:
    """Layer ``presets`` (later wins), then ``overrides`` (``key=value``), validate and
    ``derive``. Raises ``ConfigError`` naming the key, override or file at fault."""
    state: dict[str, tuple[Any, str]] = {}
    for preset in presets:
        for key, value, origin in _read_preset(resolve_preset(preset)):
            _set(state, key, value, origin)
    for text in overrides:
        key, value, origin = _parse_override(text)
        for k, v in _flatten({key: value}) if isinstance(value, dict) else [(key, value)]:
            _set(state, k, v, origin)
    cfg = _validate(_unflatten({k: v for k, (v, _) in state.items()}), state)
    return derive(cfg)


# --------------------------------------------------------------------------- derived values


def derive(cfg: RelayConfig) -> RelayConfig:
    """The one place values that follow from other values are computed. Returns a new,
    validated config; idempotent.

    - ``trainer.default_local_dir``: ``{project_name}``/``{experiment_name}`` filled in;
    - ``actor_rollout_ref.actor.clip_ratio_low``/``_high``: ``clip_ratio`` when None;
    - ``critic.model.path``: the policy's ``actor_rollout_ref.model.path`` when None;
    - ``critic.ppo_mini_batch_size``/``ppo_micro_batch_size_per_gpu``: the actor's when None;
    - ``transport.weights_dir``: ``<run dir>/weights`` when None.
    """
    d = cfg.model_dump()
    trainer, actor, critic = d["trainer"], d["actor_rollout_ref"]["actor"], d["critic"]
    run_dir = (
        trainer["default_local_dir"]
        .replace("{project_name}", trainer["project_name"])
        .replace("{experiment_name}", trainer["experiment_name"])
    )
    trainer["default_local_dir"] = run_dir
    for bound in ("clip_ratio_low", "clip_ratio_high"):
        if actor[bound] is None:
            actor[bound] = actor["clip_ratio"]
    if critic["model"]["path"] is None:
        critic["model"]["path"] = d["actor_rollout_ref"]["model"]["path"]
    for size in ("ppo_mini_batch_size", "ppo_micro_batch_size_per_gpu"):
        if critic[size] is None:
            critic[size] = actor[size]
    if d["transport"]["weights_dir"] is None:
        d["transport"]["weights_dir"] = f"{run_dir}/weights"
    return _validate(d, {})


def dump_config(cfg: RelayConfig) -> str:
    """The config as YAML (canonical keys, schema order); loading it back gives ``cfg``."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------- no-effect notes


def _changed(cfg: RelayConfig, key: str) -> bool:
    return _get(cfg, key) != _schema_default(key)


def no_effect_notes(cfg: RelayConfig, has_gpu: bool) -> list[str]:
    """One line per key that is accepted but does nothing on this hardware or with these
    settings, for the launcher to log once. ``has_gpu``: a CUDA device is visible."""
    gpu = has_gpu and cfg.trainer.device != "cpu"
    arr = cfg.actor_rollout_ref
    vllm = arr.rollout.name == "vllm"
    notes: list[str] = []

    def note(key: str, why: str) -> None:
        value = yaml.safe_dump(_get(cfg, key), default_flow_style=True).strip().removesuffix("...").strip()
        notes.append(f"{key}={value}: {why}")

    if not gpu:
        note("trainer.n_gpus_per_node", "on CPU this is the number of CPU learner processes per node")
        for key in (
            "actor_rollout_ref.actor.fsdp_config.param_offload",
            "actor_rollout_ref.actor.fsdp_config.optimizer_offload",
            "actor_rollout_ref.ref.fsdp_config.param_offload",
        ):
            if _get(cfg, key):
                note(key, "no effect on CPU (already in host memory)")
        if arr.model.use_remove_padding:
            note("actor_rollout_ref.model.use_remove_padding", "no effect on CPU (padding-free attention needs flash-attention on GPU)")
        if arr.rollout.tensor_model_parallel_size > 1:
            note("actor_rollout_ref.rollout.tensor_model_parallel_size", "no effect on CPU (one process per actor)")
        if _changed(cfg, "actor_rollout_ref.rollout.gpu_memory_utilization"):
            note("actor_rollout_ref.rollout.gpu_memory_utilization", "no effect on CPU (vLLM on CPU uses cpu_kvcache_space_gb)")
    else:
        if _changed(cfg, "actor_rollout_ref.rollout.cpu_kvcache_space_gb"):
            note("actor_rollout_ref.rollout.cpu_kvcache_space_gb", "no effect on GPU (vLLM sizes its cache by gpu_memory_utilization)")
        if not vllm:
            if arr.rollout.tensor_model_parallel_size > 1:
                note("actor_rollout_ref.rollout.tensor_model_parallel_size", "only used by rollout.name=vllm")
            if _changed(cfg, "actor_rollout_ref.rollout.gpu_memory_utilization"):
                note("actor_rollout_ref.rollout.gpu_memory_utilization", "only used by rollout.name=vllm")
    if not vllm and not gpu and _changed(cfg, "actor_rollout_ref.rollout.cpu_kvcache_space_gb"):
        note("actor_rollout_ref.rollout.cpu_kvcache_space_gb", "only used by rollout.name=vllm")

    if not cfg.algorithm.use_kl_in_reward:
        for key in ("algorithm.kl_penalty", "algorithm.kl_ctrl.type", "algorithm.kl_ctrl.kl_coef",
                    "algorithm.kl_ctrl.target_kl", "algorithm.kl_ctrl.horizon"):
            if _changed(cfg, key):
                note(key, "no effect: algorithm.use_kl_in_reward is false")
    elif cfg.algorithm.kl_ctrl.type == "fixed":
        for key in ("algorithm.kl_ctrl.target_kl", "algorithm.kl_ctrl.horizon"):
            if _changed(cfg, key):
                note(key, "no effect: algorithm.kl_ctrl.type is fixed")
    if not arr.actor.use_kl_loss:
        for key in ("actor_rollout_ref.actor.kl_loss_coef", "actor_rollout_ref.actor.kl_loss_type"):
            if _changed(cfg, key):
                note(key, "no effect: actor_rollout_ref.actor.use_kl_loss is false")
    if cfg.algorithm.off_policy_correction == "none" and _changed(cfg, "algorithm.tis_cap"):
        note("algorithm.tis_cap", "no effect: algorithm.off_policy_correction is none")
    if arr.model.lora_rank == 0:
        for key in ("actor_rollout_ref.model.lora_alpha", "actor_rollout_ref.model.target_modules"):
            if _changed(cfg, key):
                note(key, "no effect: actor_rollout_ref.model.lora_rank is 0")
    if cfg.algorithm.adv_estimator != "gae":
        derived = {"critic.model.path", "critic.ppo_mini_batch_size", "critic.ppo_micro_batch_size_per_gpu"}
        for key in _leaf_fields():
            if key.startswith("critic.") and key not in derived and _changed(cfg, key):
                note(key, f"no effect: the critic is only used by adv_estimator=gae (got {cfg.algorithm.adv_estimator})")
        if cfg.trainer.critic_warmup:
            note("trainer.critic_warmup", "no effect without a critic (adv_estimator is not gae)")
    if cfg.trainer.total_training_steps is not None and _changed(cfg, "trainer.total_epochs"):
        note("trainer.total_epochs", "no effect: trainer.total_training_steps is set")
    if cfg.transport.weights != "filesystem" and cfg.transport.weights_dir != f"{cfg.trainer.default_local_dir}/weights":
        note("transport.weights_dir", f"no effect: transport.weights is {cfg.transport.weights}")
    return notes
