"""configs/cifar10.py: every preset combination validates and its rules resolve on its
model; bad preset tokens are named."""
import itertools
import sys

import pytest

from helpers import ROOT
from robust_admm.compression import rules as rules_lib
from robust_admm.experiments import validation
from robust_admm.training import program

sys.path.insert(0, ROOT)
from configs import cifar10  # noqa: E402

CIFAR_INPUT = (1, 32, 32, 3)


@pytest.mark.parametrize("model", cifar10.MODELS)
def test_every_preset_validates_and_its_rules_resolve_on_its_model(model):
    shapes = rules_lib._kernel_shapes(model, 10, 1, CIFAR_INPUT)
    n_kernels = sum(1 for p in rules_lib.kernel_entries(shapes))
    for sparsity, objective in itertools.product(["", *cifar10.SPARSITY], ["", "trades"]):
        preset = ",".join(t for t in (model, sparsity, objective) if t)
        cfg = cifar10.get_config(preset)
        validation.validate_config(cfg, device_count=1)
        assert (cfg.model.name, cfg.objective) == (model, objective or "pgd_at")
        assert cfg.attack.epsilon == cfg.eval.epsilon == pytest.approx(8 / 255)
        for phase in program.parse_program(cfg):
            if phase.compresses:
                specs = rules_lib.resolve_rules(phase.rules, shapes, cfg.model, 10, CIFAR_INPUT)
                assert len(specs) == n_kernels  # every kernel, once
                kinds = {s["kind"] for s in specs.values()}
                assert kinds == ({"filter", "irregular"} if sparsity.startswith("filter")
                                 else {"irregular"})


def test_smoke_preset_is_small_and_the_paper_recipe_is_the_default():
    smoke, paper = cifar10.get_config("smoke"), cifar10.get_config("")
    validation.validate_config(smoke, device_count=1)
    assert smoke.model.name == "wrn10_1" and smoke.data.train_examples == 256
    assert (paper.model.name, paper.batch_size, paper.attack.num_steps) == ("vgg16", 128, 10)
    assert (paper.pretrain.epochs, paper.pretrain.lr, paper.admm.update_every_epochs) == (
        200, 0.1, 20)
    assert paper.data.augment == "crop_flip"


@pytest.mark.parametrize("preset,message", [
    ("vgg19", "unknown preset token 'vgg19'"),
    ("vgg16,resnet18", "names two model tokens: 'vgg16' and 'resnet18'"),
    ("irregular90,filter50", "names two sparsity tokens"),
])
def test_bad_preset_tokens_are_named(preset, message):
    with pytest.raises(ValueError, match=message):
        cifar10.get_config(preset)
