"""The offline quick start: the 8x8 handwritten digits that ship inside scikit-learn
(1,797 real images, no download), all three stages in a couple of minutes on 2 CPU cores.

Presets: (none) the quick start; `smoke` a shorter run for tests. Both evaluate on the
whole test split (297 images) natural accuracy and PGD-20 (step 0.025): the quick start
every 10 epochs and at the end of each phase, `smoke` at the end of each phase only.
"""
from robust_admm.experiments.config_base import base_config


def get_config(preset: str = ""):
    c = base_config()
    c.data.name = "digits"
    c.data.source = "files"  # ignored: the digits ship with scikit-learn
    c.model.name = "lenet_digits"
    c.model.width = 4  # conv 8 -> conv 16 -> fc 64
    c.batch_size = 64
    c.log_every_steps = 20
    c.attack.epsilon = c.eval.epsilon = 0.15  # ~2.5 of the 17 grey levels of these digits
    c.attack.num_steps, c.attack.step_size = 10, 0.05
    c.eval.num_steps, c.eval.step_size, c.eval.batch_size = 20, 0.025, 300
    c.eval.every_epochs = 10
    c.prune.kind = "irregular"
    c.prune.ratios = "conv1=0.5,conv2=0.875,fc1=0.875,fc2=0.5"
    for s in (c.pretrain, c.admm, c.retrain):
        s.optimizer, s.lr = "adam", 3e-3
    c.pretrain.epochs = 40
    c.admm.epochs, c.admm.update_every_epochs = 20, 4
    c.admm.rho, c.admm.rho_growth = 0.1, 1.5
    c.retrain.epochs, c.retrain.lr, c.retrain.schedule = 15, 1e-3, "cosine"
    if preset == "smoke":
        c.pretrain.epochs, c.admm.epochs, c.retrain.epochs = 3, 2, 2
        c.admm.update_every_epochs = 1
        c.eval.every_epochs = 100
    elif preset:
        raise ValueError(f"configs/digits.py: unknown preset {preset!r}; allowed: '', smoke")
    return c
