"""Image datasets read from disk, streamed: ImageNet, or any folder of images in the
ImageFolder layout (DIR/train/<class>/*, DIR/val/<class>/*; JPEG, PNG) or the shards
`robust-admm shards` writes from one. The data folder is given on the command line:

    python -m robust_admm.train --config configs/imagenet.py:smoke --workdir W \
        --config.data.dir=DIR [--config.data.source=shards]

Presets:
- `smoke`: a small ResNet (resnet8: 16-32-64 channels) at 64 px, PGD-2 training at eps
  4/255, pretrain 2 epochs, ADMM 1 (filter pruning of every conv, 50%), masked retrain 1;
  evaluation under PGD-3 after each phase (AutoAttack: `python -m robust_admm.eval`).
  For tests and for trying the streamed path on any folder: on 2 CPU cores it trains a
  few hundred 64 px images a minute.
The ImageNet recipes (ResNet-18/50, VGG-16-BN, AlexNet-BN at 224 px, the original's prune
ratios and schedules) are not presets yet: asking for one is an error.
"""
from robust_admm.experiments.config_base import base_config

PRESETS = ("smoke",)


def get_config(preset: str = ""):
    if preset not in PRESETS:
        if preset == "":
            raise NotImplementedError(
                "configs/imagenet.py: the ImageNet recipes (224 px ResNet, VGG, AlexNet) "
                "are not implemented yet; the preset available is 'smoke' "
                "(--config configs/imagenet.py:smoke)")
        raise ValueError(f"configs/imagenet.py: unknown preset {preset!r}; allowed: "
                         f"{', '.join(PRESETS)}")
    c = base_config()
    c.data.name = "imagenet"
    c.data.source = "folder"
    c.data.image_size = 64
    c.model.name = "resnet8"
    c.batch_size = 16
    c.log_every_steps = 2
    c.checkpoint.every_steps = 4
    c.attack.epsilon = c.eval.epsilon = 4 / 255
    c.attack.num_steps, c.attack.step_size = 2, 2.5 / 255
    c.eval.num_steps, c.eval.step_size, c.eval.batch_size = 3, 2 / 255, 16
    c.eval.every_epochs = 100  # at the end of each phase
    c.prune.kind = "filter"
    c.prune.ratios = "*conv*=0.5"
    for s in (c.pretrain, c.admm, c.retrain):
        s.optimizer, s.lr, s.schedule = "sgd", 0.05, "cosine"
    c.pretrain.epochs, c.admm.epochs, c.retrain.epochs = 2, 1, 1
    c.admm.update_every_epochs, c.admm.rho = 1, 1e-3
    return c
