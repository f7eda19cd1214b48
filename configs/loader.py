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
   Hydra's config-group selection ``+experiment=NAME`` (``experiment=NAME``)
   reads the bundled preset ``experiment/NAME`` after the presets, before the
   other overrides.
3. Every key goes through ``ALIASES`` (AgentFly, verl and Agent-Tunix
   spellings) to its canonical key. Keys in ``NO_EFFECT`` (verl options Relay
   has no use for) are accepted with a one-line note. Unknown keys fail, with
   a "did you mean" only when a key is close (same last part, or a last part
   at least 80% alike). Later values win.
4. The dotted keys are nested again and validated by the pydantic schema;
   validation errors are translated to ``<dotted.key>: expected ..., got ...``.
5. ``derive`` fills in the values that follow from others.

Every problem of a command is reported at once: the ``ConfigError`` raised for
bad input has one line per problem.
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from configs.schema import RelayConfig
from learner.algos import registry as algo_registry

CONFIG_DIR = Path(__file__).resolve().parent
"""Directory of the bundled presets; preset names like ``demo`` resolve here."""


class ConfigError(ValueError):
    """Any problem with a config: unknown key, wrong type, unreadable preset."""


# --------------------------------------------------------------------------- aliases

AGENTFLY_ALIASES: dict[str, str] = {
    # the agent's constructor and run arguments, flattened or nested as AgentFly versions have them
    "agent.init_args.*": "agent.*",
    "agent.init_config.*": "agent.*",
    "agent.run_config.*": "agent.*",
    "agent.max_steps": "agent.max_turns",
    "agent.model_name_or_path": "actor_rollout_ref.model.path",
    "agent.backend": "actor_rollout_ref.rollout.name",
    "agent.backend_config.backend": "agent.backend",
    "agent.max_model_len": "actor_rollout_ref.rollout.max_model_len",
    "agent.generation_config.max_tokens": "agent.max_tokens_per_turn",
    "agent.generation_config.temperature": "actor_rollout_ref.rollout.temperature",
}
"""AgentFly spellings (its ``agent`` section: ``init_args``/``init_config``/``run_config``)."""

VERL_ALIASES: dict[str, str] = {
    # samples per prompt is the agent's group size
    "actor_rollout_ref.rollout.n": "agent.num_chains",
    # keys whose value Relay keeps in one place
    "actor_rollout_ref.rollout.val_kwargs.temperature": "actor_rollout_ref.rollout.val_temperature",
    "actor_rollout_ref.rollout.val_kwargs.do_sample": "actor_rollout_ref.rollout.val_do_sample",
    "actor_rollout_ref.rollout.val_kwargs.n": "actor_rollout_ref.rollout.val_n",
    "actor_rollout_ref.rollout.prompt_length": "data.max_prompt_length",
    "data.max_response_length": "actor_rollout_ref.rollout.response_length",
    "actor_rollout_ref.rollout.multi_turn.enable": "agent.use_agent",
    "actor_rollout_ref.rollout.multi_turn.max_assistant_turns": "agent.max_turns",
    # algorithm choices (learner.algos.registry)
    "actor_rollout_ref.actor.policy_loss.loss_mode": "actor_rollout_ref.actor.loss_mode",
    "actor_rollout_ref.actor.policy_loss.clip_cov_ratio": "actor_rollout_ref.actor.clip_cov_ratio",
    "actor_rollout_ref.actor.policy_loss.clip_cov_lb": "actor_rollout_ref.actor.clip_cov_lb",
    "actor_rollout_ref.actor.policy_loss.clip_cov_ub": "actor_rollout_ref.actor.clip_cov_ub",
    "actor_rollout_ref.actor.policy_loss.kl_cov_ratio": "actor_rollout_ref.actor.kl_cov_ratio",
    "actor_rollout_ref.actor.policy_loss.ppo_kl_coef": "actor_rollout_ref.actor.kl_cov_coef",
    "reward_model.overlong_buffer.len": "algorithm.overlong_buffer_len",
    "reward_model.overlong_buffer.penalty_factor": "algorithm.overlong_penalty_factor",
}
"""verl spellings that differ from Relay's (most verl keys are Relay's own)."""

TUNIX_ALIASES: dict[str, str] = {
    "grpo.num_generations": "agent.num_chains",
    "grpo.beta": "actor_rollout_ref.actor.kl_loss_coef",
    "grpo.epsilon": "actor_rollout_ref.actor.clip_ratio",
    "optimizer.learning_rate": "actor_rollout_ref.actor.optim.lr",
    "optimizer.warmup_ratio": "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio",
    "optimizer.max_grad_norm": "actor_rollout_ref.actor.grad_clip",
    "optimizer.weight_decay": "actor_rollout_ref.actor.optim.weight_decay",
    "model.lora_rank": "actor_rollout_ref.model.lora_rank",
    "model.lora_alpha": "actor_rollout_ref.model.lora_alpha",
    "generation.temperature": "actor_rollout_ref.rollout.temperature",
    "generation.top_k": "actor_rollout_ref.rollout.top_k",
    "generation.top_p": "actor_rollout_ref.rollout.top_p",
    "generation.max_generation_steps": "actor_rollout_ref.rollout.response_length",
    "generation.max_prompt_length": "data.max_prompt_length",
    "training.micro_batch_size": "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
    "training.num_epochs": "trainer.total_epochs",
}
"""Agent-Tunix training-guide keys (``grpo.*``, ``optimizer.*``, ``generation.*``, ``training.*``)."""

ALIASES: dict[str, str] = {
    k: v for table in (AGENTFLY_ALIASES, VERL_ALIASES, TUNIX_ALIASES) for k, v in table.items() if k != v
}
"""Alias dotted key -> canonical dotted key. A key ending in ``.*`` is a prefix:
``agent.init_args.X`` becomes ``agent.X``. Aliases chain (``agent.init_args.max_steps``
-> ``agent.max_steps`` -> ``agent.max_turns``)."""

ALIAS_ALSO: dict[str, tuple[str, str]] = {
    "grpo.beta": ("actor_rollout_ref.actor.use_kl_loss", "a non-zero beta turns the KL loss on, 0 turns it off"),
}
"""Aliases that also set a second key: alias -> (key, rule). ``grpo.beta=B`` sets
``kl_loss_coef=B`` and ``use_kl_loss = (B != 0)``, as Tunix's GRPO does."""


@dataclass(frozen=True)
class NoEffect:
    """A key from another framework that Relay accepts but does not use."""

    why: str
    """The note shown once at start-up (after ``key=value: ``)."""
    quiet: tuple = ()
    """Values that match what Relay does anyway: no note."""
    allowed: tuple | None = None
    """If set, any other value is an error (``error`` says why)."""
    error: str = ""


_NO_DYNAMIC_BSZ = ("no effect: the critic's passes hold critic.ppo_micro_batch_size_per_gpu trajectories "
                   "(the policy's and the log-prob passes follow their use_dynamic_bsz)")

NO_EFFECT: dict[str, NoEffect] = {
    "actor_rollout_ref.actor.strategy": NoEffect(
        "no effect: Relay's learner always trains with its own FSDP setup", quiet=("fsdp",),
        allowed=("fsdp", "fsdp2"), error="Relay's learner trains with FSDP only"),
    "critic.strategy": NoEffect(
        "no effect: Relay's learner always trains with its own FSDP setup", quiet=("fsdp",),
        allowed=("fsdp", "fsdp2"), error="Relay's learner trains with FSDP only"),
    "critic.use_dynamic_bsz": NoEffect(_NO_DYNAMIC_BSZ, quiet=(False,)),
    "critic.ppo_max_token_len_per_gpu": NoEffect(_NO_DYNAMIC_BSZ),
    "critic.forward_max_token_len_per_gpu": NoEffect(_NO_DYNAMIC_BSZ),
    "actor_rollout_ref.actor.ulysses_sequence_parallel_size": NoEffect(
        "no effect: Relay has no sequence parallelism", quiet=(1,)),
    "actor_rollout_ref.rollout.free_cache_engine": NoEffect(
        "no effect: Relay's actors are their own processes and keep their engine and KV cache between updates"),
    "actor_rollout_ref.rollout.mode": NoEffect(
        "no effect: Relay's actors always run asynchronously from the learner "
        "(algorithm.max_staleness=0 for on-policy training)", allowed=("sync", "async"),
        error="verl's rollout modes are sync and async"),
    "actor_rollout_ref.rollout.enable_chunked_prefill": NoEffect("no effect: vLLM's own default is used"),
    "actor_rollout_ref.rollout.load_format": NoEffect(
        "no effect: actors load the model from actor_rollout_ref.model.path, then the learner's weights (transport.weights)"),
    "actor_rollout_ref.rollout.val_kwargs.top_p": NoEffect(
        "no effect: validation samples at val_temperature with top_p=1", quiet=(1, 1.0)),
    "actor_rollout_ref.rollout.val_kwargs.top_k": NoEffect(
        "no effect: validation samples at val_temperature with top_k=-1", quiet=(-1, 0)),
    "actor_rollout_ref.hybrid_engine": NoEffect(
        "no effect: actors and learner are always separate processes", quiet=(True,)),
    "reward_model.enable": NoEffect(
        "", quiet=(False,), allowed=(False,),
        error="Relay has no learned reward model; score episodes with agent.reward_name or "
              "custom_reward_function.path/name"),
    "reward_model.reward_manager": NoEffect(
        "no effect: every episode is scored by agent.reward_name when it ends", quiet=("naive",)),
    "agent.context_config.resource_backend": NoEffect(
        "no effect: tools run in each actor's sandbox (envs/sandbox.py)", quiet=("local",)),
    "agent.tool_parser_name": NoEffect("no effect: each agent type parses its own tool calls (agent.agent_type)"),
    "agent.max_concurrent_chains": NoEffect(
        "no effect: episodes running at once are capped per actor by actor_rollout_ref.rollout.max_concurrent_episodes",
        quiet=(None,)),
    "data.return_raw_chat": NoEffect("no effect: the agent always renders prompts from the chat messages"),
    "data.filter_overlong_prompts_workers": NoEffect("no effect: the filter runs in the learner once, at start-up"),
    "trainer.default_hdfs_dir": NoEffect("no effect: checkpoints go to trainer.default_local_dir only", quiet=(None,)),
    "trainer.balance_batch": NoEffect("no effect: actors stream episodes; there is no batch to balance"),
}
"""Keys of other frameworks accepted with a one-line note because Relay has no such option."""

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
def _dict_fields() -> frozenset[str]:
    """Leaf keys whose value is a mapping with free keys (``agent.tool_configs``): their
    sub-keys (``agent.tool_configs.search.corpus``) are settings of their own."""
    return frozenset(k for k, f in _leaf_fields().items() if getattr(f.annotation, "__origin__", None) is dict)


def _dict_field_of(key: str) -> str | None:
    """The dict field ``key`` lies under (``agent.tool_configs`` for ``agent.tool_configs.search.top_k``)."""
    return next((d for d in _dict_fields() if key.startswith(d + ".")), None)


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


@functools.cache
def _all_keys_cached(aliases: bool) -> tuple[str, ...]:
    return tuple(all_keys(aliases))


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


def schema_default(key: str) -> Any:
    """The schema default of a canonical key (or of the key an alias lands on)."""
    return _leaf_fields()[canonical_key(key)].get_default(call_default_factory=True)


_schema_default = schema_default


def _get(cfg: BaseModel, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def suggest_key(key: str) -> str | None:
    """The valid (or alias) key ``key`` was probably meant to be, or None when none is close:
    a key with the same last part, or one whose last part is at least 80% alike
    (``difflib`` ratio); among several, the one most like ``key`` as a whole."""
    leaf = key.rsplit(".", 1)[-1]
    best: tuple[float, float, str] | None = None
    for k in (*_all_keys_cached(True), *NO_EFFECT):
        other = k.rsplit(".", 1)[-1]
        leaf_ratio = 1.0 if other == leaf else difflib.SequenceMatcher(None, leaf, other).ratio()
        if leaf_ratio < 0.8:
            continue
        score = (round(leaf_ratio, 2), difflib.SequenceMatcher(None, key, k).ratio(), k)
        best = score if best is None or score[:2] > best[:2] else best
    return None if best is None else best[2]


def _unknown_key(key: str) -> ConfigError:
    near = suggest_key(key)
    if near:
        return ConfigError(f"unknown config key '{key}'; did you mean '{near}'?")
    sections = sorted({k.split(".")[0] for k in _leaf_fields()})
    return ConfigError(
        f"unknown config key '{key}'; no key is named like it (top-level sections: {', '.join(sections)}; "
        f"`relay keys WORD` lists keys)"
    )


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
        canon = canonical_key(key)
        if isinstance(value, dict) and (canon not in _leaf_fields() or canon in _dict_fields() or _dict_field_of(canon)):
            if not value and (canon in _dict_fields() or _dict_field_of(canon)):
                yield key, value  # `agent.tool_configs: {}` empties the mapping
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


def _yaml_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _same(value: Any, other: Any) -> bool:
    """Equal and both booleans or both not (``1`` is not ``true`` here)."""
    return isinstance(value, bool) == isinstance(other, bool) and value == other


def _set(state: dict[str, tuple[Any, str]], key: str, value: Any, origin: str, notes: dict[str, str]) -> None:
    """Record one setting under its canonical key (later wins), checking the key; a
    ``NO_EFFECT`` key records its note in ``notes`` instead."""
    chain = _alias_chain(key)
    canon = chain[-1]
    where = f" (in {origin})" if not origin.startswith("override") else ""
    if canon in NO_EFFECT:
        rule = NO_EFFECT[canon]
        if value is _RESET:
            notes.pop(canon, None)
            return
        if rule.allowed is not None and not any(_same(value, v) for v in rule.allowed):
            raise ConfigError(f"{key}={_yaml_text(value)}: {rule.error}{where}")
        if any(_same(value, q) for q in rule.quiet):
            notes.pop(canon, None)
        else:
            notes[canon] = f"{key}={_yaml_text(value)}: {rule.why}"
        return
    dict_field = canon if canon in _dict_fields() else _dict_field_of(canon)
    if canon not in _leaf_fields() and dict_field is None:
        if canon in _sections():
            if value is None or value is _RESET:
                if value is _RESET:
                    for k in [k for k in state if k.startswith(canon + ".")]:
                        del state[k]
                return
            first = next(k for k in _leaf_fields() if k.startswith(canon + "."))
            raise ConfigError(f"'{key}' is a section, not a value; set its keys, e.g. '{first}'{where}")
        raise ConfigError(f"{_unknown_key(key)}{where}")
    if dict_field is not None:
        # a mapping field is kept as its dotted sub-keys; setting one replaces what was below
        # it and any plain value above it
        for k in list(state):
            if k == canon or k.startswith(canon + ".") or (k.startswith(dict_field) and canon.startswith(k + ".")):
                del state[k]
        if value is _RESET:
            return
        if isinstance(value, dict) and not value:
            if canon == dict_field:
                state[canon] = ({}, origin)
            return
        state[canon] = (value, origin)
        return
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
    for alias in chain:
        if alias in ALIAS_ALSO and isinstance(value, (int, float)) and not isinstance(value, bool):
            state[ALIAS_ALSO[alias][0]] = (value != 0, origin)


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


def _group_selection(text: str) -> str | None:
    """The bundled preset a Hydra config-group override selects (``+experiment=quick_test``
    -> ``experiment/quick_test``), or None when ``text`` is an ordinary override."""
    body = text.strip().lstrip("+")
    group, sep, name = body.partition("=")
    group = group.strip()
    if not sep or "." in group or not group or group in _sections() or not (CONFIG_DIR / group).is_dir():
        return None
    name = name.strip().strip("'\"").removesuffix(".yaml")
    if not (CONFIG_DIR / group / f"{name}.yaml").is_file():
        names = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        raise ConfigError(f"override '{text}': no preset '{group}/{name}'; {group} presets: {', '.join(names)}")
    return f"{group}/{name}"


def load_config_with_notes(
    presets: Sequence[str | Path] = (), overrides: Sequence[str] = ()
) -> tuple[RelayConfig, list[str]]:
    """``load_config``, plus one note per ``NO_EFFECT`` key that was set (to show once)."""
    state: dict[str, tuple[Any, str]] = {}
    notes: dict[str, str] = {}
    problems: list[str] = []

    def settle(key: str, value: Any, origin: str) -> None:
        try:
            _set(state, key, value, origin, notes)
        except ConfigError as e:
            problems.append(str(e))

    groups, plain = [], []
    for text in overrides:
        try:
            selected = _group_selection(text)
        except ConfigError as e:
            problems.append(str(e))
            continue
        (groups if selected else plain).append(selected or text)
    for preset in [*presets, *groups]:
        try:
            entries = _read_preset(resolve_preset(preset))
        except ConfigError as e:
            problems.append(str(e))
            continue
        for key, value, origin in entries:
            settle(key, value, origin)
    for text in plain:
        try:
            key, value, origin = _parse_override(text)
        except ConfigError as e:
            problems.append(str(e))
            continue
        if isinstance(value, dict) and value and (canonical_key(key) in _dict_fields() or _dict_field_of(canonical_key(key))):
            settle(key, _RESET, origin)  # `agent.tool_configs.search={...}` replaces that level
        for k, v in _flatten({key: value}) if isinstance(value, dict) else [(key, value)]:
            settle(k, v, origin)
    try:
        cfg = _validate(_unflatten({k: v for k, (v, _) in state.items()}), state)
    except ConfigError as e:
        problems.append(str(e))
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))
    return derive(cfg), list(notes.values())


def load_config(presets: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> RelayConfig:
    """Layer ``presets`` (later wins), then ``overrides`` (``key=value``), validate and
    ``derive``. Raises ``ConfigError`` with one line per problem, each naming the key,
    override or file at fault."""
    return load_config_with_notes(presets, overrides)[0]


# --------------------------------------------------------------------------- derived values


def derive(cfg: RelayConfig) -> RelayConfig:
    """The one place values that follow from other values are computed. Returns a new,
    validated config; idempotent.

    - ``trainer.default_local_dir``: ``{project_name}``/``{experiment_name}`` filled in;
    - ``actor_rollout_ref.actor.clip_ratio_low``/``_high``: ``clip_ratio`` when None;
    - ``actor_rollout_ref.actor.loss_agg_horizon``: ``rollout.response_length`` when None;
    - ``critic.model.path``: the policy's ``actor_rollout_ref.model.path`` when None;
    - ``critic.ppo_mini_batch_size``/``ppo_micro_batch_size_per_gpu``: the actor's when None;
    - ``rollout.log_prob_use_dynamic_bsz``/``log_prob_max_token_len_per_gpu`` and the ``ref.`` ones:
      the actor's ``use_dynamic_bsz``/``ppo_max_token_len_per_gpu`` when None (as verl's defaults);
    - ``transport.weights_dir``: ``<run dir>/weights`` when None;
    - ``agent.reward_name``: ``<path>:<name>`` when ``custom_reward_function.path`` is set;
    - ``actor_rollout_ref.rollout.val_temperature``: 0 when ``val_do_sample`` is false.
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
    if actor["loss_agg_horizon"] is None:
        actor["loss_agg_horizon"] = d["actor_rollout_ref"]["rollout"]["response_length"]
    if critic["model"]["path"] is None:
        critic["model"]["path"] = d["actor_rollout_ref"]["model"]["path"]
    for size in ("ppo_mini_batch_size", "ppo_micro_batch_size_per_gpu"):
        if critic[size] is None:
            critic[size] = actor[size]
    for section in (d["actor_rollout_ref"]["rollout"], d["actor_rollout_ref"]["ref"]):
        if section["log_prob_use_dynamic_bsz"] is None:
            section["log_prob_use_dynamic_bsz"] = actor["use_dynamic_bsz"]
        if section["log_prob_max_token_len_per_gpu"] is None:
            section["log_prob_max_token_len_per_gpu"] = actor["ppo_max_token_len_per_gpu"]
    if d["transport"]["weights_dir"] is None:
        d["transport"]["weights_dir"] = f"{run_dir}/weights"
    custom = d["custom_reward_function"]
    if custom["path"]:
        d["agent"]["reward_name"] = f"{custom['path']}:{custom['name']}"
    rollout = d["actor_rollout_ref"]["rollout"]
    if not rollout["val_do_sample"]:
        rollout["val_temperature"] = 0.0
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

    if not gpu and cfg.trainer.n_gpus_per_node is not None:
        note("trainer.n_gpus_per_node", "on CPU this is the number of CPU learner processes per node")
        for key in (
            "actor_rollout_ref.actor.fsdp_config.param_offload",
            "actor_rollout_ref.actor.fsdp_config.optimizer_offload",
            "actor_rollout_ref.ref.fsdp_config.param_offload",
        ):
            if _get(cfg, key):
                note(key, "no effect on CPU (already in host memory)")
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
    if not vllm:
        for key in ("actor_rollout_ref.rollout.enforce_eager", "actor_rollout_ref.rollout.max_num_batched_tokens"):
            if _get(cfg, key) is not None:
                note(key, "only used by rollout.name=vllm")
    if arr.rollout.val_n > 1 and arr.rollout.val_temperature == 0:
        note("actor_rollout_ref.rollout.val_n", "greedy validation (val_temperature 0): the samples of a prompt are alike; "
             "set val_kwargs.do_sample=true and val_kwargs.temperature")
    if cfg.data.filter_overlong_prompts and cfg.data.truncation != "error":
        note("data.truncation", "no effect while data.filter_overlong_prompts is true (overlong prompts are dropped first)")
    if cfg.custom_reward_function.path is None and _changed(cfg, "custom_reward_function.name"):
        note("custom_reward_function.name", "no effect: custom_reward_function.path is not set")

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
    for key, why in algo_registry.unused_parameters(cfg, lambda k: _changed(cfg, k)):
        note(key, why)  # a correction parameter the chosen correction does not read
    if arr.model.lora_rank == 0:
        for key in ("actor_rollout_ref.model.lora_alpha", "actor_rollout_ref.model.target_modules"):
            if _changed(cfg, key):
                note(key, "no effect: actor_rollout_ref.model.lora_rank is 0")
    estimator = algo_registry.ESTIMATORS[cfg.algorithm.adv_estimator]
    if not estimator.needs_critic:
        with_critic = ", ".join(c.name for c in algo_registry.ESTIMATORS.choices if c.needs_critic)
        derived = {"critic.model.path", "critic.ppo_mini_batch_size", "critic.ppo_micro_batch_size_per_gpu"}
        for key in _leaf_fields():
            if key.startswith("critic.") and key not in derived and _changed(cfg, key):
                note(key, f"no effect: the critic is only used by adv_estimator={with_critic} (got {estimator.name})")
        if cfg.trainer.critic_warmup:
            note("trainer.critic_warmup", f"no effect without a critic (adv_estimator {estimator.name} has none)")
    if cfg.trainer.total_training_steps is not None and _changed(cfg, "trainer.total_epochs"):
        note("trainer.total_epochs", "no effect: trainer.total_training_steps is set")
    if cfg.transport.weights != "filesystem" and cfg.transport.weights_dir != f"{cfg.trainer.default_local_dir}/weights":
        note("transport.weights_dir", f"no effect: transport.weights is {cfg.transport.weights}")
    return notes
