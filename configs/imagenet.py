"""ImageNet (or any folder of images in its layout): the original's natural-setting recipes,
the progressive paper's ResNet-50 8x, and an adversarial recipe; streamed from disk.

    python -m robust_admm.train --config configs/imagenet.py:resnet50,natural --workdir W \
        --config.data.dir=DIR [--config.data.source=shards|tfds]

The preset after the path is a comma-separated list of tokens, at most one of each kind:
- model: `resnet18`, `resnet50`, `vgg16_bn`, `alexnet_bn` (torchvision's layouts; the
  original's AlexNet with BatchNorm). Required, except with `smoke`.
- recipe: `natural` (default), `progressive` (ResNet-50 only), `adversarial`.
- `smoke`: the recipe's program at toy size (a small ResNet at 64 px, a few images); for
  tests and for trying the streamed path on any folder. `smoke` alone is the adversarial
  recipe's shape (PGD-2 at eps 4/255, filter pruning 50%). Evaluated at the end of each
  phase on the whole (toy) val split: natural and PGD-3 (adversarial), natural only
  (natural, progressive).

Recipes (224 px, batch 256, SGD momentum 0.9, weight decay 1e-4, label smoothing 0):
- `natural`, the original code's ImageNet setting: per-layer irregular prune ratios
  (ResNet-18 every conv 0.9375; ResNet-50 conv1 kept dense and every other conv 0.75;
  VGG-16-BN every conv 0.9375; AlexNet-BN conv1..5 0.16/0.65/0.67/0.66/0.66; classifiers
  dense), ADMM 30 epochs at lr 0.01 (cosine restarting at each Z/U update, every 10 epochs;
  rho 1e-3 growing 1.3x), masked retraining 30 epochs at lr 0.01 cosine. The original starts
  from torchvision's trained weights: do the same with `--config.init.pretrained=FILE
  --config.program=admm,retrain` (README, "ImageNet"); without them the program first
  trains the dense model with torchvision's recipe (90 epochs, lr 0.1, cosine).
  Training-time evaluation: natural top-1 and top-5 on the whole val split at the end of
  each phase, no attack (`eval.num_steps=0`: natural accuracy only, no robust figure);
  attacks with `robust_admm.eval` after.
- `progressive` (ResNet-50): three ADMM + retrain rounds at rising irregular rates on every
  conv but conv1 and on fc (0.5, 0.75, 0.875 of the weights: 2x, 4x, 8x), 20 + 20 epochs
  each, natural setting, the zeros of a round kept in the next; evaluated as `natural`.
- `adversarial`: PGD-2 at eps 4/255 (step 2.5/255, random start) in every phase, with the
  model's natural-recipe ratios; evaluation under PGD-10 (step 1/255) at the end of each
  phase (natural top-1 and top-5 too, on the whole val split). Few-step PGD, not free adversarial training: free-AT replays each batch m times
  with a perturbation carried across batches, which our epoch and checkpoint semantics
  (a step is a batch, resumable bit for bit) do not have; PGD-2 costs 3 passes per image
  (free-AT with m = 4 costs 4 per replayed image over epochs / 4), and at 4/255 two steps
  of 2.5/255 reach the corners of the ball as free-AT's and FGSM-RS's single steps do.

Hardware and time (estimates, not measured here: no ImageNet and no GPU on our machines;
from NVIDIA's published ResNet-50 mixed-precision training rate on one A100, about 2,500
img/s, and the models' FLOPs): an epoch of 1.28M images is about 9 min for ResNet-50 on
one A100 in bfloat16 (ResNet-18 about 4 min, VGG-16-BN about 35 min, AlexNet-BN input-
bound: budget 5 CPU cores per GPU for decoding), so `resnet50,natural` from pretrained
weights (60 epochs) is about 9 GPU-hours, about 1.2 h on 8 GPUs; `progressive` (120 epochs)
twice that; `adversarial` is 3x the passes of natural training. Use `model.dtype=bfloat16`
(set by every recipe) and `launch.sh` for pods and Slurm.
"""
from robust_admm.experiments.config_base import base_config, phase_config

MODELS = {  # preset token -> model.name
    "resnet18": "imagenet_resnet18",
    "resnet50": "imagenet_resnet50",
    "vgg16_bn": "imagenet_vgg16_bn",
    "alexnet_bn": "alexnet_bn",
}
RECIPES = ("natural", "progressive", "adversarial")

# The original's per-layer prune ratios (irregular), as rules over our layer names.
RATIOS = {
    "resnet18": "*conv*=irregular:0.9375",
    "resnet50": "layer*=irregular:0.75",  # conv1 (the stem) stays dense
    "vgg16_bn": "conv*=irregular:0.9375",
    "alexnet_bn": ("conv1=irregular:0.16,conv2=irregular:0.65,conv3=irregular:0.67,"
                   "conv4=irregular:0.66,conv5=irregular:0.66"),
}
# The progressive paper's ResNet-50 8x: rounds of rising rates on every conv but the stem,
# and on the classifier.
PROGRESSIVE_RATES = (0.5, 0.75, 0.875)


def parse_preset(preset: str) -> dict:
    """'resnet50,natural' -> {'model': 'resnet50', 'recipe': 'natural'}; each token known,
    each kind at most once, a model unless `smoke`."""
    kinds = {"model": tuple(MODELS), "recipe": RECIPES, "size": ("smoke",)}
    chosen = {}
    for token in [t.strip() for t in (preset or "").split(",") if t.strip()]:
        kind = next((k for k, allowed in kinds.items() if token in allowed), None)
        if kind is None:
            allowed = ", ".join(t for ts in kinds.values() for t in ts)
            raise ValueError(f"configs/imagenet.py: unknown preset token {token!r} in "
                             f"{preset!r}; allowed: {allowed}")
        if kind in chosen:
            raise ValueError(f"configs/imagenet.py: preset {preset!r} names two {kind} "
                             f"tokens: {chosen[kind]!r} and {token!r}")
        chosen[kind] = token
    if "model" not in chosen and "size" not in chosen:
        raise ValueError(f"configs/imagenet.py: preset {preset!r} names no model; give one "
                         f"of {', '.join(MODELS)} and a recipe ({', '.join(RECIPES)}), e.g. "
                         f"--config configs/imagenet.py:resnet50,natural (or 'smoke')")
    if chosen.get("recipe") == "progressive" and chosen.get("model", "resnet50") != "resnet50":
        raise ValueError(f"configs/imagenet.py: the progressive recipe is the ResNet-50 8x "
                         f"one; preset {preset!r} names {chosen['model']!r}")
    return chosen


def get_config(preset: str = ""):
    chosen = parse_preset(preset)
    if chosen.get("size") == "smoke":
        return _smoke(chosen.get("recipe", "adversarial"))
    return _full(chosen["model"], chosen.get("recipe", "natural"))


def _common():
    c = base_config()
    c.data.name = "imagenet"
    c.data.source = "folder"
    c.attack.epsilon = c.eval.epsilon = 4 / 255
    c.eval.every_epochs = 100  # at the end of each phase
    return c


def _full(model: str, recipe: str):
    c = _common()
    c.data.image_size = 224
    c.data.num_workers = 4
    c.model.name = MODELS[model]
    c.model.dtype = "bfloat16"
    c.model.normalize = "imagenet"  # ImageNet's mean and std, inside the model
    c.batch_size = 256
    c.log_every_steps = 100
    c.checkpoint.every_steps = 1000
    c.eval.batch_size = 250
    c.attack.num_steps, c.attack.step_size = 2, 2.5 / 255
    c.eval.num_steps, c.eval.step_size = 10, 1 / 255
    c.prune.kind = "irregular"
    for s in (c.pretrain, c.admm, c.retrain):
        s.optimizer, s.momentum, s.weight_decay, s.schedule = "sgd", 0.9, 1e-4, "cosine"
    c.pretrain.epochs, c.pretrain.lr = 90, 0.1
    c.admm.epochs, c.admm.lr, c.admm.schedule = 30, 0.01, "periodic"
    c.admm.update_every_epochs, c.admm.rho, c.admm.rho_growth = 10, 1e-3, 1.3
    c.retrain.epochs, c.retrain.lr = 30, 0.01
    c.admm.rules = RATIOS[model]
    if recipe == "adversarial":
        return c
    c.setting = "natural"
    c.eval.num_steps = 0  # natural accuracy (top-1, top-5) during training
    if recipe == "progressive":
        _progressive(c, [_resnet50_rate(r) for r in PROGRESSIVE_RATES], epochs=20, lr=0.01)
    return c


def _resnet50_rate(rate: float) -> str:
    return f"layer*=irregular:{rate!r},fc=irregular:{rate!r}"


def _progressive(c, rules: list, epochs: int, lr: float, update_every: int = 10):
    """Rounds of admm + retrain phases, one per rules string, after the dense phase."""
    program = ["pretrain"]
    for i, round_rules in enumerate(rules, 1):
        tag = "" if i == 1 else str(i)
        admm = phase_config("admm", epochs=epochs, lr=lr, rules=round_rules, schedule="periodic")
        admm.weight_decay = 1e-4
        admm.update_every_epochs, admm.rho, admm.rho_growth = update_every, 1e-3, 1.3
        retrain = phase_config("retrain", epochs=epochs, lr=lr)
        retrain.weight_decay = 1e-4
        c[f"admm{tag}"], c[f"retrain{tag}"] = admm, retrain
        program += [f"admm{tag}", f"retrain{tag}"]
    c.program = ",".join(program)


def _smoke(recipe: str):
    """The recipe's program at toy size: resnet8 at 64 px, a few steps per phase."""
    c = _common()
    c.data.image_size = 64
    c.model.name = "resnet8"
    c.batch_size = 16
    c.log_every_steps = 2
    c.checkpoint.every_steps = 4
    c.attack.num_steps, c.attack.step_size = 2, 2.5 / 255
    c.eval.num_steps, c.eval.step_size, c.eval.batch_size = 3, 2 / 255, 16
    c.prune.kind = "filter"
    c.prune.ratios = "*conv*=0.5"
    for s in (c.pretrain, c.admm, c.retrain):
        s.optimizer, s.lr, s.schedule = "sgd", 0.05, "cosine"
    c.pretrain.epochs, c.admm.epochs, c.retrain.epochs = 2, 1, 1
    c.admm.update_every_epochs, c.admm.rho = 1, 1e-3
    if recipe == "adversarial":
        return c
    c.setting = "natural"
    c.eval.num_steps = 0
    c.prune.kind, c.prune.ratios = "irregular", "*conv*=0.75"
    if recipe == "progressive":
        c.pretrain.epochs = 1
        _progressive(c, [f"*conv*=irregular:{r!r}" for r in (0.5, 0.75)], epochs=1, lr=0.05,
                     update_every=1)
    return c
