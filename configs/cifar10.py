"""CIFAR-10: VGG-16-BN, ResNet-18 and WideResNets with PGD-10 training and ADMM compression.

The preset after the path is a comma-separated list of tokens, at most one of each kind
(`--config configs/cifar10.py:wrn28_4,irregular99,trades`):
- model: `vgg16` (default), `resnet18`, `wrn28_4`, `wrn34_10`.
- compression, as the adversarial-pruning benchmark sets it (every kernel at one rate):
  `irregular90`, `irregular95`, `irregular99` (unstructured, of the weights) or
  `filter50`, `filter75`, `filter90` (structured, of each conv's filters; the classifier
  irregular at the same rate). Default: the paper's 16x irregular on every layer.
- objective: `trades` (beta 6, as HYDRA and HARP train); default PGD-AT.
- `smoke`: a few steps on 256 images, a small WideResNet (WRN-10-1); for tests; evaluated
  (natural and PGD-3) on its 64 test images at the end of each one-epoch phase.

The recipe is the paper's (Ye et al. 2019): eps 8/255, PGD-10 at step 2/255 from a random
start; pretrain 200 epochs SGD lr 0.1 cosine, weight decay 5e-4; admm 200 epochs lr 0.01,
Z/U every 20 epochs, rho 1e-3 growing 1.3x; retrain 200 epochs lr 0.01; batch 128; random
crop and flip. Evaluation during training, every 10 epochs and at the end of each phase,
on the whole test split: natural accuracy and PGD-20 at step 2/255 (AutoAttack: `python
-m robust_admm.eval`). It needs a GPU: about 600 epochs of 11 forward-backward passes.
"""
from robust_admm.experiments.config_base import base_config

MODELS = ("vgg16", "resnet18", "wrn28_4", "wrn34_10")
SPARSITY = {f"irregular{p}": ("irregular", p / 100) for p in (90, 95, 99)}
SPARSITY.update({f"filter{p}": ("filter", p / 100) for p in (50, 75, 90)})
OBJECTIVES = ("trades",)


def sparsity_rules(kind: str, ratio: float) -> str:
    """Every kernel at one rate: irregular everywhere, or filters of every conv (the
    classifier, whose outputs are the classes, irregular at the same rate)."""
    if kind == "irregular":
        return f"*={kind}:{ratio!r}"
    return f"*conv*={kind}:{ratio!r},fc=irregular:{ratio!r}"


def parse_preset(preset: str) -> dict:
    """'wrn28_4,irregular99,trades' -> {'model': ..., 'sparsity': ..., ...}; each token
    known, each kind at most once."""
    kinds = {"model": MODELS, "sparsity": tuple(SPARSITY), "objective": OBJECTIVES,
             "size": ("smoke",)}
    chosen = {}
    for token in [t.strip() for t in (preset or "").split(",") if t.strip()]:
        kind = next((k for k, allowed in kinds.items() if token in allowed), None)
        if kind is None:
            allowed = ", ".join(t for ts in kinds.values() for t in ts)
            raise ValueError(f"configs/cifar10.py: unknown preset token {token!r} in "
                             f"{preset!r}; allowed: {allowed}")
        if kind in chosen:
            raise ValueError(f"configs/cifar10.py: preset {preset!r} names two {kind} tokens: "
                             f"{chosen[kind]!r} and {token!r}")
        chosen[kind] = token
    return chosen


def get_config(preset: str = ""):
    chosen = parse_preset(preset)
    c = base_config()
    c.data.name = "cifar10"
    c.data.augment = "crop_flip"
    c.model.name = chosen.get("model", "vgg16")
    c.model.width = 1
    c.batch_size = 128
    c.log_every_steps = 100
    c.attack.epsilon = c.eval.epsilon = 8 / 255
    c.attack.num_steps, c.attack.step_size = 10, 2 / 255
    c.eval.num_steps, c.eval.step_size, c.eval.batch_size = 20, 2 / 255, 500
    c.eval.every_epochs = 10
    # The paper's CIFAR rate: 16x irregular on every layer.
    kind, ratio = SPARSITY.get(chosen.get("sparsity"), ("irregular", 0.9375))
    c.prune.to_width = 0
    c.admm.rules = sparsity_rules(kind, ratio)
    for s in (c.pretrain, c.admm, c.retrain):
        s.optimizer, s.epochs, s.weight_decay, s.schedule = "sgd", 200, 5e-4, "cosine"
    c.pretrain.lr, c.admm.lr, c.retrain.lr = 0.1, 0.01, 0.01
    c.admm.schedule = "periodic"
    c.admm.update_every_epochs, c.admm.rho, c.admm.rho_growth = 20, 1e-3, 1.3
    if chosen.get("objective") == "trades":
        c.objective, c.objective_beta = "trades", 6.0
    if chosen.get("size") == "smoke":
        if "model" not in chosen:
            c.model.name = "wrn10_1"
        c.batch_size = 16
        c.data.train_examples, c.data.test_examples = 256, 64
        c.attack.num_steps, c.eval.num_steps, c.eval.batch_size = 2, 3, 32
        c.log_every_steps = 4
        for s in (c.pretrain, c.admm, c.retrain):
            s.epochs = 1
        c.admm.update_every_epochs = 1
    return c
