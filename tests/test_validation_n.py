"""verl's ``val_kwargs.n``: every validation prompt is sampled ``rollout.val_n`` times, metrics are mean@n."""

import threading

import pytest

from configs.loader import load_config
from learner.validation import Validator
from tests.test_checkpoint_coordinator import ask, coordinator, traj


def test_val_n_samples_every_prompt_n_times_and_averages():
    cfg = load_config([], ["actor_rollout_ref.rollout.val_kwargs.n=3", "actor_rollout_ref.rollout.val_kwargs.do_sample=true",
                           "actor_rollout_ref.rollout.val_kwargs.temperature=0.7"])
    assert (cfg.actor_rollout_ref.rollout.val_n, cfg.actor_rollout_ref.rollout.val_temperature) == (3, 0.7)
    c = coordinator()
    validator = Validator(cfg)  # no coordinator: nothing loaded
    validator.coordinator, validator.rows = c, [{"question": "a"}, {"question": "b"}]
    out = {}
    runner = threading.Thread(target=lambda: out.update(validator.run(0)))
    runner.start()
    granted = []
    for _ in range(200):  # the validator queues its round, then an actor on v0 takes it
        granted += [i for i in ask(c, 0, n=10).items if i.validation]
        if len(granted) == 6:
            break
        runner.join(0.05)
    assert sorted(i.sample_id for i in granted) == [f"val0:{r}:{k}" for r in range(2) for k in range(3)]
    assert all(i.row["question"] == ("a" if i.sample_id.startswith("val0:0") else "b") for i in granted)
    for item in granted:  # prompt a: 2 of 3 samples right; prompt b: none
        right = item.sample_id in ("val0:0:0", "val0:0:2")
        c.on_trajectory(traj(item.sample_id, 0, 0, reward=float(right), validation=True))
    runner.join(10)
    assert not runner.is_alive()
    assert out["val/n"] == 6 and out["val/accuracy"] == pytest.approx(2 / 6)


def test_one_sample_keeps_the_plain_sample_ids():
    cfg = load_config()
    c = coordinator()
    validator = Validator(cfg)
    validator.coordinator, validator.rows = c, [{"question": "a"}]
    runner = threading.Thread(target=validator.run, args=(0,))
    runner.start()
    granted = []
    for _ in range(200):
        granted += [i for i in ask(c, 0, n=10).items if i.validation]
        if granted:
            break
        runner.join(0.05)
    assert [i.sample_id for i in granted] == ["val0:0"]
    c.on_trajectory(traj("val0:0", 0, 0, validation=True))
    runner.join(10)
    assert not runner.is_alive()
