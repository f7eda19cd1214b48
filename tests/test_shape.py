"""The run's shape when the config leaves it open: fitted to the cores and GPUs, values given kept."""

from launcher.shape import fit_shape


def test_two_cores_get_one_learner_rank_and_one_actor():
    ranks, actors, note = fit_shape(None, None, cores=2, gpus=0)
    assert (ranks, actors) == (1, 1)
    assert "trainer.n_gpus_per_node=1" in note and "num_actors=1" in note and "2 CPU core(s)" in note


def test_more_cores_and_gpus():
    assert fit_shape(None, None, cores=16, gpus=0)[:2] == (2, 7)
    assert fit_shape(None, None, cores=64, gpus=8)[:2] == (8, 1)


def test_values_given_are_kept_and_not_announced():
    assert fit_shape(2, None, cores=2, gpus=0)[:2] == (2, 1)
    assert fit_shape(2, 3, cores=2, gpus=0) == (2, 3, "")
