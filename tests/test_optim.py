"""Learning-rate schedules against their closed forms."""
import math

import numpy as np
import pytest

from robust_admm.experiments.config_base import stage_config
from robust_admm.training import optim


def lr_at(cfg, steps_per_epoch, steps, period=None):
    sched = optim.make_schedule(cfg, steps_per_epoch, period)
    return np.array([float(sched(s)) for s in steps])


def test_cosine_with_warmup():
    cfg = stage_config(epochs=10, lr=0.1, schedule="cosine")
    cfg.warmup_epochs = 2
    lr = lr_at(cfg, 10, [0, 10, 20, 60, 100])
    expected = [0.0, 0.05, 0.1, 0.1 * 0.5 * (1 + math.cos(math.pi * 40 / 80)), 0.0]
    np.testing.assert_allclose(lr, expected, atol=1e-7)


def test_multistep():
    cfg = stage_config(epochs=4, lr=0.1, schedule="multistep")
    cfg.milestones, cfg.gamma = "0.5,0.75", 0.1
    np.testing.assert_allclose(lr_at(cfg, 10, [0, 19, 20, 29, 30, 39]),
                               [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_periodic_restarts_at_every_admm_update():
    cfg = stage_config(epochs=6, lr=0.1, schedule="periodic")
    lr = lr_at(cfg, 10, [0, 10, 19, 20, 40, 59], period=2)
    assert lr[0] == pytest.approx(0.1) and lr[3] == pytest.approx(0.1) and lr[4] == pytest.approx(0.1)
    assert lr[1] == pytest.approx(0.05, rel=1e-5)  # half way through the first period
    assert lr[2] < 0.001 and lr[5] < 0.001


@pytest.mark.parametrize("field,value,match", [
    ("schedule", "linear", "schedule='linear'"),
    ("optimizer", "rmsprop", "optimizer='rmsprop'"),
    ("lr", 0.0, "lr=0.0"),
    ("milestones", "0.5,2", "milestones"),
])
def test_bad_optimisation_settings_are_named(field, value, match):
    cfg = stage_config(epochs=2, lr=0.1, schedule="multistep")
    cfg[field] = value
    with pytest.raises(ValueError, match=match):
        optim.make_optimizer(cfg, optim.make_schedule(cfg, 10))


def test_periodic_needs_an_admm_interval():
    cfg = stage_config(epochs=2, lr=0.1, schedule="periodic")
    with pytest.raises(ValueError, match="periodic"):
        optim.make_schedule(cfg, 10)
