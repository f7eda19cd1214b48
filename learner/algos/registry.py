"""Every algorithm choice Relay offers, by name, with its rules, formula and source.

One `Registry` per choice: advantage estimator, policy loss, off-policy
correction, KL estimator, loss aggregation mode, loss filter. Each `Choice` carries what
the rest of the system needs to know about it:

- the config schema's allowed values (``Registry.literal()``: the schema holds
  no copy of the names) and its cross-section checks (``needs_critic``,
  ``min_group_size``, ``needs_logits``, ...: `config_problems`);
- the keys it reads (``reads``), so the loader can say which settings have no
  effect with the choice made;
- its formula and source, which docs/algorithms.md lists (``markdown_table``;
  a test checks the docs carry every table as generated).

The implementations live in the torch modules next to this one and attach
themselves with ``@REGISTRY.implementation(name)``; ``implementations()``
refuses a registry with a choice that has none. A new loss is one function
plus one `Choice` here.

Torch-free: ``configs/schema.py`` imports this module, and the CLI imports the
schema before torch (``learner/algos/__init__.py`` loads its torch modules
lazily for the same reason).

Print the docs tables with ``python -m learner.algos.registry``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal


@dataclass(frozen=True)
class Choice:
    """One registered option and the rules that come with it."""

    name: str
    formula: str
    """What it computes (plain text, shown in docs/algorithms.md)."""
    source: str
    """Paper and/or reference implementation."""
    needs_critic: bool = False
    """Advantage estimator that needs critic values (trains the value model)."""
    needs_greedy_baseline: bool = False
    """Advantage estimator that needs one greedy rollout per prompt (ReMax)."""
    min_group_size: int = 1
    """Episodes per prompt (``agent.num_chains``) it needs to compare within a group."""
    needs_logits: bool = False
    """KL estimator that needs the full logits (cannot be used in the reward)."""
    reads: tuple[str, ...] = ()
    """Config keys (dotted) only this choice reads among its registry's parameters."""


@dataclass
class Registry:
    """The choices for one config key, in the order the docs list them."""

    kind: str
    """What is chosen, for messages ("advantage estimator")."""
    key: str
    """The config key that chooses (dotted)."""
    choices: list[Choice]
    _impls: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        names = [c.name for c in self.choices]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.kind}: duplicate names in {names}")

    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.choices)

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __getitem__(self, name: str) -> Choice:
        for c in self.choices:
            if c.name == name:
                return c
        raise ValueError(f"unknown {self.kind} {name!r} ({self.key}); valid: {list(self.names())}")

    def literal(self) -> Any:
        """``Literal[name, ...]`` for a pydantic field."""
        return Literal[self.names()]  # type: ignore[valid-type]

    def parameters(self) -> tuple[str, ...]:
        """Every key some choice ``reads``, in order."""
        return tuple(dict.fromkeys(k for c in self.choices for k in c.reads))

    def implementation(self, *names: str) -> Callable:
        """Decorator: the function (or object) implementing ``names``."""

        def attach(impl):
            self.bind(impl, *names)
            return impl

        return attach

    def bind(self, impl: Any, *names: str) -> Any:
        """Register ``impl`` for ``names`` (each must be a registered choice)."""
        for name in names:
            self[name]  # a ValueError for a name with no Choice
            if name in self._impls:
                raise ValueError(f"{self.kind} {name!r} implemented twice")
            self._impls[name] = impl
        return impl

    def implementations(self) -> dict[str, Any]:
        """Name -> implementation for every choice, in registry order; an error if one has none."""
        missing = [n for n in self.names() if n not in self._impls]
        if missing:
            raise RuntimeError(f"{self.kind}: no implementation registered for {missing}")
        return {n: self._impls[n] for n in self.names()}

    def markdown_table(self) -> str:
        """The docs table: name, formula, rules, source."""
        rows = [f"| `{self.key}` | formula | needs | source |", "|---|---|---|---|"]
        for c in self.choices:
            needs = ", ".join(_needs(c)) or "-"
            rows.append(f"| `{c.name}` | {c.formula} | {needs} | {c.source} |")
        return "\n".join(rows)


def _needs(c: Choice) -> list[str]:
    out = []
    if c.needs_critic:
        out.append("a critic (`critic.*`)")
    if c.needs_greedy_baseline:
        out.append("a greedy rollout per prompt")
    if c.min_group_size > 1:
        out.append(f"`agent.num_chains >= {c.min_group_size}`")
    if c.needs_logits:
        out.append("logits (not in the reward)")
    out += [f"`{k}`" for k in c.reads]
    return out


# --------------------------------------------------------------------------- the registries

ESTIMATORS = Registry("advantage estimator", "algorithm.adv_estimator", [
    Choice("gae", "GAE(`gamma`, `lam`) on critic values over sampled tokens (observation tokens skipped), "
           "whitened over the batch; returns = advantages + values",
           "Schulman et al. 2016 (GAE); verl `compute_gae_advantage_return`", needs_critic=True),
    Choice("grpo", "(score - group mean) / (group std + eps); `norm_adv_by_std_in_grpo=false` drops the std "
           "(Dr. GRPO)", "Shao et al. 2024 (DeepSeekMath); Liu et al. 2025 (Dr. GRPO); verl", min_group_size=2),
    Choice("rloo", "score - mean of the other scores of the group", "Ahmadian et al. 2024; verl", min_group_size=2),
    Choice("reinforce_plus_plus", "discounted reward-to-go over sampled tokens (`gamma`), whitened over the batch; "
           "the return carries across observation tokens (see below)", "Hu 2025 (REINFORCE++); verl, OpenRLHF"),
    Choice("reinforce_plus_plus_baseline", "score - group mean, whitened over the batch", "Hu 2025; verl"),
    Choice("remax", "score - reward of the prompt's greedy rollout", "Li et al. 2023 (ReMax); verl",
           needs_greedy_baseline=True),
    Choice("opo", "score - length-weighted group mean sum_j n_j score_j / sum_j n_j (n_j sampled tokens)",
           "Hao et al. 2025 (OPO, optimal reward baseline); verl `compute_opo_outcome_advantage`", min_group_size=2),
    Choice("grpo_passk", "best episode of the group: (best - second-best score) / (group std + eps); others 0",
           "verl `compute_grpo_passk_outcome_advantage` (pass@k training)", min_group_size=2),
    Choice("gpg", "alpha (score - group mean), alpha = B / (episodes of the batch with a non-zero score); no std",
           "Chu et al. 2025 (GPG); verl `compute_gpg_outcome_advantage`", min_group_size=2),
])

POLICY_LOSSES = Registry("policy loss", "actor_rollout_ref.actor.loss_mode", [
    Choice("vanilla", "max(-A r, -A clip(r, 1 - low, 1 + high)); for A < 0 at most -A `clip_ratio_c` (dual clip)",
           "Schulman et al. 2017 (PPO); Ye et al. 2020 (dual clip); Yu et al. 2025 (DAPO clip-higher); verl"),
    Choice("gspo", "the same clip (no dual clip) on the episode ratio s = exp(mean_t log r_t); gradient "
           "s * grad log pi_t per token", "Zheng et al. 2025 (GSPO); verl `compute_policy_loss_gspo`"),
    Choice("cispo", "-A sg(clip(r, 1 - low, 1 + high)) log pi: every token keeps a gradient",
           "MiniMax 2025 (MiniMax-M1, CISPO)"),
    Choice("clip_cov", "`vanilla` without dual clip; a random `clip_cov_ratio` of the unclipped tokens whose "
           "covariance (A - mean A)(log pi - mean log pi) is in (`clip_cov_lb`, `clip_cov_ub`) get no gradient "
           "(covariance over the micro-batch, so not split-invariant)",
           "Cui et al. 2025 (The Entropy Mechanism of RL for Reasoning LMs); verl `compute_policy_loss_clip_cov`",
           reads=("actor_rollout_ref.actor.clip_cov_ratio", "actor_rollout_ref.actor.clip_cov_lb",
                  "actor_rollout_ref.actor.clip_cov_ub")),
    Choice("kl_cov", "-A r (no clip), plus `kl_cov_coef` * abs(log r) on the `kl_cov_ratio` of the tokens with the "
           "largest covariance (over the micro-batch)",
           "Cui et al. 2025; verl `compute_policy_loss_kl_cov`",
           reads=("actor_rollout_ref.actor.kl_cov_ratio", "actor_rollout_ref.actor.kl_cov_coef")),
])

_TIS, _BEHAV = "algorithm.tis_cap", "algorithm.behav_imp_weight_cap"
OFF_POLICY_CORRECTIONS = Registry("off-policy correction", "algorithm.off_policy_correction", [
    Choice("none", "ratio against the actor's log-probs; w = 1", "plain PPO"),
    Choice("decoupled", "ratio against the proximal log-probs; w = rho_t, tokens with rho_t > cap masked",
           "Hilton et al. 2021 (decoupled PPO); Fu et al. 2025 (AReaL, `behav_imp_weight_cap`)", reads=(_BEHAV,)),
    Choice("tis", "proximal anchor; w = min(rho_t, `tis_cap`)",
           "Yao et al. 2025 (truncated IS for the train-inference mismatch); verl", reads=(_TIS,)),
    Choice("seq_tis", "proximal anchor; w = min(prod_t rho_t, `tis_cap`) on every token of the episode",
           "Liu et al. 2025 (sequence-level IS for the mismatch); verl rollout correction", reads=(_TIS,)),
    Choice("seq_mis", "proximal anchor; w = prod_t rho_t, episodes with weight > `seq_mis_cap` masked",
           "Liu et al. 2025 (seq-MIS); verl rollout correction", reads=("algorithm.seq_mis_cap",)),
    Choice("geo_mis", "proximal anchor; w = rho_t, episodes whose exp(mean_t log rho_t) is outside "
           "[1/`geo_mis_bound`, `geo_mis_bound`] masked", "Liu et al. 2025 (geometric-mean rejection); verl",
           reads=("algorithm.geo_mis_bound",)),
    Choice("icepop", "proximal anchor; w = rho_t, tokens with rho_t outside [1/`icepop_beta`, `icepop_beta`] masked",
           "Ling Team 2025 (IcePop, Ring-1T)", reads=("algorithm.icepop_beta",)),
])

_KL_SOURCE = "Schulman 2020 (Approximating KL divergence); verl `kl_penalty`"
KL_ESTIMATORS = Registry("KL estimator", "actor_rollout_ref.actor.kl_loss_type / algorithm.kl_penalty", [
    Choice("kl", "d = log pi - log ref", _KL_SOURCE),
    Choice("k1", "d (alias of `kl`)", _KL_SOURCE),
    Choice("abs", "abs(d)", _KL_SOURCE),
    Choice("mse", "d^2 / 2", _KL_SOURCE),
    Choice("k2", "d^2 / 2 (alias of `mse`)", _KL_SOURCE),
    Choice("low_var_kl", "exp(-d) + d - 1, clamped to [-10, 10]", _KL_SOURCE),
    Choice("k3", "alias of `low_var_kl`", _KL_SOURCE),
    Choice("k1+", "value d, gradient d (that of d^2 / 2): straight-through", "verl `kl_penalty` (`+` suffix)"),
    Choice("k3+", "value of `k3`, gradient d (that of d^2 / 2): straight-through", "verl `kl_penalty` (`+` suffix)"),
    Choice("full", "sum_v pi(v) (log pi(v) - log ref(v)) over the vocabulary", "exact; verl", needs_logits=True),
])

LOSS_AGG_MODES = Registry("loss aggregation mode", "actor_rollout_ref.actor.loss_agg_mode", [
    Choice("token-mean", "sum_bt m L / sum_bt m over the mini-batch", "Yu et al. 2025 (DAPO); verl"),
    Choice("seq-mean-token-sum", "mean over episodes of sum_t m L", "verl"),
    Choice("seq-mean-token-mean", "mean over episodes of sum_t m L / n_b", "Shao et al. 2024 (GRPO); verl"),
    Choice("seq-mean-token-sum-norm", "mean over episodes of sum_t m L / H, H = `loss_agg_horizon` (constant)",
           "Liu et al. 2025 (Dr. GRPO); verl `loss_scale_factor`",
           reads=("actor_rollout_ref.actor.loss_agg_horizon",)),
])

SAMPLE_FILTERS = Registry("loss filter", "algorithm.loss_filters", [
    Choice("overlong", "episodes truncated by the token budget or a turn's token limit leave the policy loss "
           "and its normaliser", "Yu et al. 2025 (DAPO overlong filtering)"),
    Choice("zero_variance", "episodes of groups whose rewards are all equal leave the policy loss and its "
           "normaliser (the batch is not refilled)", "Yu et al. 2025 (DAPO dynamic sampling, learner side)",
           min_group_size=2),
])

REGISTRIES = (ESTIMATORS, POLICY_LOSSES, OFF_POLICY_CORRECTIONS, KL_ESTIMATORS, LOSS_AGG_MODES, SAMPLE_FILTERS)


# --------------------------------------------------------------------------- rules


def config_problems(cfg: Any) -> list[str]:
    """What the chosen options need and ``cfg`` (a ``RelayConfig``) does not give; one line each."""
    alg = cfg.algorithm
    est = ESTIMATORS[alg.adv_estimator]
    problems = []
    if cfg.agent.num_chains < est.min_group_size:
        problems.append(
            f"algorithm.adv_estimator={est.name} compares episodes of one prompt: agent.num_chains "
            f"(actor_rollout_ref.rollout.n) must be >= {est.min_group_size}, got {cfg.agent.num_chains}"
        )
    for name in alg.loss_filters:
        if cfg.agent.num_chains < SAMPLE_FILTERS[name].min_group_size:
            problems.append(
                f"algorithm.loss_filters={name} compares episodes of one prompt: agent.num_chains must be "
                f">= {SAMPLE_FILTERS[name].min_group_size}, got {cfg.agent.num_chains}"
            )
    budget = cfg.actor_rollout_ref.rollout.response_length
    if alg.overlong_buffer_len > budget:
        problems.append(
            f"algorithm.overlong_buffer_len ({alg.overlong_buffer_len}) must not exceed the response budget "
            f"actor_rollout_ref.rollout.response_length ({budget})"
        )
    if alg.use_kl_in_reward and KL_ESTIMATORS[alg.kl_penalty].needs_logits:
        problems.append(
            f"algorithm.kl_penalty={alg.kl_penalty} needs logits of the whole batch and is not supported in the "
            "reward; use it as actor_rollout_ref.actor.kl_loss_type or pick k1/k2/k3"
        )
    return problems


def unused_parameters(cfg: Any, changed: Callable[[str], bool]) -> list[tuple[str, str]]:
    """(key, why) for each correction or policy-loss parameter set away from its default that
    the chosen correction / policy loss does not read. (The aggregation's horizon is filled in by ``derive`` for every
    mode, so it is always "set"; it is not reported.)"""
    chosen = [
        (OFF_POLICY_CORRECTIONS, cfg.algorithm.off_policy_correction),
        (POLICY_LOSSES, cfg.actor_rollout_ref.actor.loss_mode),
    ]
    out = []
    for reg, name in chosen:
        reads = reg[name].reads
        for key in reg.parameters():
            if key not in reads and changed(key):
                users = [c.name for c in reg.choices if key in c.reads]
                out.append((key, f"no effect: {reg.key} is {name} (read by {', '.join(users)})"))
    return out


if __name__ == "__main__":
    for registry in REGISTRIES:
        print(registry.markdown_table(), end="\n\n")
