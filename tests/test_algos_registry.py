"""The algorithm registries: every choice implemented, the config's allowed values and rules taken
from them, the docs listing every one as generated."""

import subprocess
import sys
import typing
from pathlib import Path

import pytest

from configs.loader import ConfigError, list_presets, load_config, no_effect_notes
from configs.schema import ActorConfig, AlgorithmConfig
from learner.algos import registry

REPO = Path(__file__).resolve().parents[1]


def test_every_choice_has_an_implementation():
    from learner.algos import advantages, episodes, kl, losses

    assert list(advantages.ADVANTAGE_ESTIMATORS) == list(registry.ESTIMATORS.names())
    assert list(losses.POLICY_LOSSES) == list(registry.POLICY_LOSSES.names())
    assert list(losses.OFF_POLICY_CORRECTIONS) == list(registry.OFF_POLICY_CORRECTIONS.names())
    assert list(losses.LOSS_AGG_MODES) == list(registry.LOSS_AGG_MODES.names())
    assert set(kl.KL_PENALTIES) | {"full"} == set(registry.KL_ESTIMATORS.names())
    assert list(episodes.SAMPLE_FILTERS) == list(registry.SAMPLE_FILTERS.names())
    for reg in registry.REGISTRIES:
        assert reg.implementations()


def test_a_choice_without_an_implementation_is_refused():
    reg = registry.Registry("thing", "x.thing", [registry.Choice("a", "f", "s"), registry.Choice("b", "f", "s")])
    reg.bind(len, "a")
    with pytest.raises(RuntimeError, match=r"no implementation registered for \['b'\]"):
        reg.implementations()
    with pytest.raises(ValueError, match="unknown thing 'c'"):
        reg.bind(len, "c")
    with pytest.raises(ValueError, match="implemented twice"):
        reg.bind(len, "a")


@pytest.mark.parametrize(
    "model, field, reg",
    [
        (AlgorithmConfig, "adv_estimator", registry.ESTIMATORS),
        (AlgorithmConfig, "off_policy_correction", registry.OFF_POLICY_CORRECTIONS),
        (AlgorithmConfig, "kl_penalty", registry.KL_ESTIMATORS),
        (ActorConfig, "loss_mode", registry.POLICY_LOSSES),
        (ActorConfig, "loss_agg_mode", registry.LOSS_AGG_MODES),
        (ActorConfig, "kl_loss_type", registry.KL_ESTIMATORS),
    ],
)
def test_schema_allowed_values_are_the_registry(model, field, reg):
    assert typing.get_args(model.model_fields[field].annotation) == reg.names()


def test_rules_come_from_the_registry():
    with pytest.raises(ConfigError, match=r"adv_estimator=rloo compares episodes.*must be >= 2, got 1"):
        load_config([], ["algorithm.adv_estimator=rloo", "agent.num_chains=1"])
    assert load_config([], ["algorithm.adv_estimator=reinforce_plus_plus_baseline", "agent.num_chains=1"])
    with pytest.raises(ConfigError, match="kl_penalty=full needs logits"):
        load_config([], ["algorithm.use_kl_in_reward=true", "algorithm.kl_penalty=full"])
    assert load_config([], ["actor_rollout_ref.actor.use_kl_loss=true", "actor_rollout_ref.actor.kl_loss_type=full"])


def test_correction_parameters_are_checked_and_noted_when_unused():
    with pytest.raises(ConfigError, match=r"^algorithm\.tis_cap: must be greater than or equal to 1, got 0\.5"):
        load_config([], ["algorithm.tis_cap=0.5"])
    with pytest.raises(ConfigError, match=r"^algorithm\.behav_imp_weight_cap: must be greater than 1"):
        load_config([], ["algorithm.behav_imp_weight_cap=0.5"])
    assert load_config([], ["algorithm.behav_imp_weight_cap=null"]).algorithm.behav_imp_weight_cap is None
    notes = no_effect_notes(load_config([], ["algorithm.tis_cap=3", "algorithm.icepop_beta=4"]), has_gpu=False)
    assert "algorithm.tis_cap=3.0: no effect: algorithm.off_policy_correction is decoupled (read by tis, seq_tis)" in notes
    assert any(n.startswith("algorithm.icepop_beta=4.0: no effect") for n in notes)
    used = no_effect_notes(load_config([], ["algorithm.off_policy_correction=tis", "algorithm.tis_cap=3"]), has_gpu=False)
    assert not any("tis_cap" in n for n in used)


def test_verl_spellings_of_the_new_choices():
    cfg = load_config([], ["actor_rollout_ref.actor.policy_loss.loss_mode=gspo", "reward_model.overlong_buffer.len=32",
                           "reward_model.overlong_buffer.penalty_factor=0.5"])
    assert cfg.actor_rollout_ref.actor.loss_mode == "gspo"
    assert (cfg.algorithm.overlong_buffer_len, cfg.algorithm.overlong_penalty_factor) == (32, 0.5)
    with pytest.raises(ConfigError, match="must not exceed the response budget"):
        load_config([], ["algorithm.overlong_buffer_len=300", "actor_rollout_ref.rollout.response_length=256"])


def test_every_preset_still_loads():
    for preset in list_presets():
        assert load_config([preset]).algorithm.adv_estimator in registry.ESTIMATORS


def test_dr_grpo_horizon_defaults_to_the_response_budget():
    cfg = load_config([], ["actor_rollout_ref.rollout.response_length=300"])
    assert cfg.actor_rollout_ref.actor.loss_agg_horizon == 300
    cfg = load_config([], ["actor_rollout_ref.actor.loss_agg_horizon=64"])
    assert cfg.actor_rollout_ref.actor.loss_agg_horizon == 64


def test_registry_imports_without_torch():
    code = "import sys, learner.algos.registry, configs.schema; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_docs_list_every_choice_as_generated():
    """docs/algorithms.md carries each registry's table exactly as `python -m learner.algos.registry` prints it."""
    docs = (REPO / "docs" / "algorithms.md").read_text()
    for reg in registry.REGISTRIES:
        assert reg.markdown_table() in docs, f"docs/algorithms.md is missing the current {reg.kind} table"
