"""configs/imagenet.py: every full preset is a valid config whose rules land on the model's
layers at the original's ratios (checked on the model's shapes at 224 px, nothing trained),
every recipe's program shape runs end to end at toy size from a generated folder, and the
eval command's ImageNet protocol (eps 4/255, 5,000 images spread over the split)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import imagenet
from helpers import write_images
from robust_admm.experiments import evaluate as evaluate_lib
from robust_admm.experiments import run as run_lib
from robust_admm.experiments.validation import validate_config
from robust_admm.models import get_model
from robust_admm.training import program as program_lib

FULL = [f"{m},{r}" for m in imagenet.MODELS for r in imagenet.RECIPES
        if r != "progressive" or m == "resnet50"]


def _specs(preset):
    """The config and {phase: {layer path: spec}} its rules resolve to on the model's
    parameter shapes at 224 px and 1,000 classes."""
    c = imagenet.get_config(preset)
    c.data.dir = "/nonexistent"  # validation does not read the data
    phases, _ = validate_config(c)
    model = get_model(c.model.name, 1000, c.model.width, c.model.dtype, c.model.normalize)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 224, 224, 3))))["params"]
    return c, params, program_lib.phase_specs(c, phases, params, 1000, (1, 224, 224, 3))


def _convs(params) -> list:
    """Paths of every conv kernel (4-D) of a params tree."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return sorted("/".join(k.key for k in path) for path, leaf in flat
                  if path[-1].key == "kernel" and len(leaf.shape) == 4)


@pytest.mark.parametrize("preset", FULL)
def test_every_full_preset_is_valid_and_follows_the_recipe(preset):
    model, recipe = preset.split(",")
    c, params, specs = _specs(preset)
    assert c.data.image_size == 224 and c.batch_size == 256 and c.model.dtype == "bfloat16"
    assert c.model.normalize == "imagenet"
    assert c.attack.epsilon == c.eval.epsilon == 4 / 255
    for name in program_lib.comma_list(c.program):
        phase = c[name]
        assert (phase.optimizer, phase.momentum, phase.weight_decay) == ("sgd", 0.9, 1e-4)
        if phase.kind == "admm":
            assert (phase.update_every_epochs, phase.rho, phase.rho_growth) == (10, 1e-3, 1.3)
    if recipe == "adversarial":
        assert c.setting == "adversarial" and c.attack.num_steps == 2
        assert c.eval.num_steps == 10
    else:
        assert c.setting == "natural" and c.eval.num_steps == 0
    ratios = {path: spec["ratio"] for path, spec in specs["retrain"].items()}
    convs = _convs(params)
    if recipe == "progressive":
        rates = [{p: s["ratio"] for p, s in specs[f"retrain{t}"].items()} for t in ("", 2, 3)]
        for rate, r in zip(rates, imagenet.PROGRESSIVE_RATES):
            assert rate == {**{p: r for p in convs if p != "conv1/kernel"}, "fc/kernel": r}
        return
    expected = {
        "resnet18": {p: 0.9375 for p in convs},
        "resnet50": {p: 0.75 for p in convs if p != "conv1/kernel"},
        "vgg16_bn": {p: 0.9375 for p in convs},
        "alexnet_bn": dict(zip([f"conv{i}/kernel" for i in range(1, 6)],
                               (0.16, 0.65, 0.67, 0.66, 0.66))),
    }[model]
    assert ratios == expected
    assert {s["kind"] for s in specs["retrain"].values()} == {"irregular"}
    assert len(convs) == {"resnet18": 20, "resnet50": 53, "vgg16_bn": 13,
                          "alexnet_bn": 5}[model]


@pytest.mark.parametrize("preset, message", [
    ("", "names no model"),
    ("natural", "names no model"),
    ("resnet50,resnet18", "two model tokens"),
    ("resnet18,progressive", "progressive recipe is the ResNet-50"),
    ("resnet50,free", "unknown preset token 'free'"),
])
def test_a_bad_preset_is_refused_naming_it(preset, message):
    with pytest.raises(ValueError, match=message):
        imagenet.get_config(preset)


def test_smoke_alone_is_the_adversarial_shape():
    assert imagenet.get_config("smoke") == imagenet.get_config("smoke,adversarial")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(str(tmp_path_factory.mktemp("images")), per_class=(6, 3))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["natural", "progressive"])
def test_each_recipe_shape_runs_end_to_end_at_toy_size(images, tmp_path, monkeypatch, recipe):
    """The natural and progressive programs (the adversarial one is configs/imagenet.py:smoke,
    tests/test_streamed_run.py) from a folder: every phase ends on its rules, the training's
    evaluations run no attack and report natural accuracy only (no robust figure)."""
    c = imagenet.get_config(f"smoke,{recipe}")
    c.data.dir, c.data.image_size = images, 32
    workdir = str(tmp_path / "w")
    run_lib.train_and_evaluate(c, workdir)
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    phases = program_lib.comma_list(c.program)
    assert list(summary["stages"]) == phases
    if recipe == "progressive":
        assert phases == ["pretrain", "admm", "retrain", "admm2", "retrain2"]
    for name in phases:
        stage = summary["stages"][name]
        assert 0 <= stage["nat_acc"] <= 1
        # No attack in the training's evaluations: natural accuracy only, never 'PGD-0'.
        assert "adv_acc" not in stage and "adv_attack" not in stage
    last = summary["stages"][phases[-1]]["size"]
    convs = {k: v for k, v in last["layers"].items() if "conv" in k}
    assert convs  # the last round's rate (0.75 in both) on every conv, to a weight
    for layer in convs.values():
        assert layer["nonzero"] == pytest.approx(0.25 * layer["size"], abs=1)
    # The eval command's ImageNet protocol: eps 4/255 by default, and n images spread over
    # the split (5,000 by default; 4 here).
    monkeypatch.setattr(evaluate_lib, "IMAGENET_DEFAULT_N", 4)
    result = evaluate_lib.evaluate_workdir(workdir, attacks="pgd2", checks=False, batch=4)
    assert result["n"] == 4 and result["epsilon"] == pytest.approx(4 / 255)


def test_the_eval_protocol_defaults_by_dataset():
    c = imagenet.get_config("resnet50,natural")
    assert evaluate_lib.default_epsilon(c, "linf") == 4 / 255
    assert evaluate_lib.default_count(c) == 5000
    c.data.name = "imagenet2012"
    assert evaluate_lib.default_count(c) == 5000
    c.data.name = "flowers"
    assert evaluate_lib.default_count(c) == 0


@pytest.mark.slow
def test_the_readme_command_starts_from_torchvision_weights(images, tmp_path):
    """The README's ImageNet command shape (a preset, init.pretrained, program=admm,retrain)
    on a generated torchvision ResNet-18 checkpoint, at 32 px on 3 classes (a new head):
    the ADMM phase (the first of the program, run alone here for time) starts from the
    file's weights: at lr 1e-9 it ends on them."""
    from safetensors.numpy import save_file
    from test_pretrained import torchvision_state

    from robust_admm.experiments import workdir as workdir_lib
    path = str(tmp_path / "resnet18.safetensors")
    state = torchvision_state("imagenet_resnet18")
    save_file(state, path)
    c = imagenet.get_config("resnet18,natural")
    c.data.dir, c.data.image_size, c.data.num_workers = images, 32, 0
    c.model.dtype, c.batch_size, c.eval.batch_size = "float32", 9, 9
    c.init.pretrained, c.init.pretrained_head = path, "new"
    c.program = "admm,retrain"
    c.admm.epochs = c.retrain.epochs = c.admm.update_every_epochs = 1
    c.admm.lr, c.stages = 1e-9, "admm"
    workdir = str(tmp_path / "w")
    run_lib.train_and_evaluate(c, workdir)
    admm = workdir_lib.load_final_state(workdir, "admm")["params"]
    jnp_close = dict(rtol=0, atol=1e-6)
    np.testing.assert_allclose(admm["conv1"]["kernel"],
                               state["conv1.weight"].transpose(2, 3, 1, 0), **jnp_close)
    np.testing.assert_allclose(admm["layer4_1"]["conv2"]["kernel"],
                               state["layer4.1.conv2.weight"].transpose(2, 3, 1, 0),
                               **jnp_close)
