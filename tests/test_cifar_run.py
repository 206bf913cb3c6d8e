"""CIFAR-10 end to end. A compiled training step (attack, ADMM penalty, update, crop and
flip) of each CIFAR architecture, each objective, on TFDS's mock CIFAR-10; and on tiny
generated binary files, `configs/cifar10.py:smoke` (a WideResNet, pretrain, admm, retrain)
through the CLI, which, killed with SIGKILL in its augmented pretrain phase and rerun,
ends bit for bit where the uninterrupted run ends."""
import json
import os
import signal
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from helpers import ROOT, assert_same_results, cli_command, has_checkpoint, make_cifar, run_and_signal
from robust_admm import data
from robust_admm.compression import admm
from robust_admm.compression import rules as rules_lib
from robust_admm.compression import transforms
from robust_admm.data import sources
from robust_admm.data.batching import to_pixels
from robust_admm.experiments import run as run_lib
from robust_admm.experiments import workdir as workdir_lib
from robust_admm.models import VGG, ResNet, apply_model, get_model
from robust_admm.runtime import logs
from robust_admm.training.attack import make_attack
from robust_admm.training.state import TrainState
from robust_admm.training.step import make_train_step

# Each CIFAR architecture at a test's size (the full-size ones differ only in widths and
# depths; tests/test_models.py checks their parameter counts). The WideResNet's PGD-AT step
# runs compiled in the :smoke program below, on CIFAR files.
ARCHITECTURES = {
    "vgg": lambda: VGG(cfg=(8, "M", 16, "M")),
    "resnet": lambda: ResNet(stage_sizes=(1, 1), stage_features=(8, 16), stem_features=8),
}


@pytest.mark.parametrize("arch,objective", [("vgg", "trades"), ("resnet", "mart")])
def test_a_compiled_step_of_each_architecture_and_objective_on_mock_tfds_cifar10(
        tfds_mock, monkeypatch, tmp_path, arch, objective):
    monkeypatch.setattr(sources, "_tfds_is_prepared", lambda name, data_dir: True)
    with tfds_mock.testing.mock_data(num_examples=32,
                                     policy=tfds_mock.testing.MockPolicy.USE_CODE):
        ds = data.load_dataset("cifar10", "tfds", data_dir=str(tmp_path))
    model = ARCHITECTURES[arch]()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    params, stats = variables["params"], variables["batch_stats"]
    specs = rules_lib.match_rules(params, {"*conv*": {"kind": "irregular", "ratio": 0.5}})
    tx = transforms.admm_phase(optax.sgd(0.01, momentum=0.9), specs, update_every=100,
                               rho=0.01)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                       opt_state=tx.init(params),
                       masks=jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, bool), params),
                       key=jax.random.PRNGKey(1))
    attack = make_attack(ml_collections.ConfigDict(dict(
        epsilon=8 / 255, step_size=2 / 255, num_steps=2, random_start=True, loss="ce",
        unroll=1)), "adversarial", objective=objective)
    step = make_train_step(model, tx, attack, 16, objective=objective, augmentation="crop_flip")
    kernels = lambda p: {k: v for k, v in admm.leaves_by_path(p).items()  # noqa: E731
                         if k.endswith("kernel")}
    before = jax.tree_util.tree_map(np.array, (kernels(params), stats))
    for _ in range(2):
        # The penalty of the state the step starts from, sum rho/2 ||W - Z + U||^2 in
        # float64 (copied first: the step donates the state). Half of every conv kernel is
        # away from its projection, so it is far from 0 and the check is not vacuous.
        w = {p: np.array(v, np.float64) for p, v in admm.leaves_by_path(state.params).items()}
        a = transforms.admm_state(state.opt_state)
        penalty = sum(0.5 * float(a.rho[p]) * np.sum(
            (w[p] - np.asarray(a.z[p], np.float64) + np.asarray(a.u[p], np.float64)) ** 2)
            for p in specs)
        state, metrics = step(state, (jnp.asarray(ds.train.images), jnp.asarray(ds.train.labels)))
        assert np.isfinite(float(metrics["loss"])) and not int(metrics["nonfinite"])
        np.testing.assert_allclose(float(metrics["admm_penalty"]), penalty, rtol=1e-5)
    assert step.compilations() == len(step.parts)
    after = (kernels(state.params), state.batch_stats)
    for old, new in zip(*map(jax.tree_util.tree_leaves, (before, after))):
        assert not np.array_equal(old, np.asarray(new))  # every kernel and statistic moved


CONFIG = "configs/cifar10.py:smoke"
# Log every step (16 per phase), checkpoint every 3, and an attack long enough that a
# signal lands inside the phase it was meant for.
RUN_FLAGS = ["--config.log_every_steps=1", "--config.checkpoint.every_steps=3",
             "--config.attack.num_steps=12"]


@pytest.fixture(scope="module")
def cifar_flags(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar")
    make_cifar(folder / "cifar-10-batches-bin", counts=(52,) * 5, n_test=64, seed=0)
    return ["--config.data.source=files", f"--config.data.dir={folder}", *RUN_FLAGS]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cifar_flags):
    workdir = str(tmp_path_factory.mktemp("cifar_reference"))
    r = subprocess.run(cli_command(workdir, *cifar_flags, config=CONFIG), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir, r.stdout + r.stderr


def assert_natural_accuracy_is_the_saved_states(workdir, stage, nat_acc):
    """`nat_acc` is the accuracy of `stage`'s saved final state (BatchNorm on its running
    averages) on the run's test split, computed here with the model alone, in the eval's
    batches of 32; examples whose top two logits lie within 1e-4 may go either way."""
    cfg = workdir_lib.read_config(workdir)
    _, _, test = run_lib.load_data(cfg)
    model = get_model(cfg.model.name, 10, cfg.model.width, cfg.model.dtype)
    state = workdir_lib.load_final_state(workdir, stage)
    apply = jax.jit(lambda x: apply_model(model, state["params"], state["batch_stats"],
                                          to_pixels(x), train=False)[0])
    logits = np.concatenate([np.asarray(apply(test.images[i:i + 32]))
                             for i in range(0, len(test.labels), 32)])
    top2 = np.sort(logits, axis=1)[:, -2:]
    near_ties = int(np.sum(top2[:, 1] - top2[:, 0] < 1e-4))
    correct = int(np.sum(logits.argmax(1) == test.labels))
    assert abs(nat_acc * len(test.labels) - correct) <= near_ties + 1e-9, (
        stage, nat_acc, correct, len(test.labels), near_ties)


def test_the_smoke_program_runs_every_phase_to_its_rules(reference):
    workdir, log = reference
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        stages = json.load(f)["stages"]
    assert list(stages) == ["pretrain", "admm", "retrain"]
    records = logs.read_jsonl(workdir_lib.metrics_path(workdir))
    for name, r in stages.items():
        # The summary reports the phase's final evaluation, and its natural accuracy is
        # the saved final state's, evaluated here directly.
        evals = [e for e in records if e.get("stage") == name and e["kind"] == "eval"]
        assert (r["nat_acc"], r["adv_acc"]) == (evals[-1]["nat_acc"], evals[-1]["adv_acc"])
        assert evals[-1]["eval_examples"] == 64
        assert_natural_accuracy_is_the_saved_states(workdir, name, r["nat_acc"])
        # The speed is the median of the rates logged each step (an uninterrupted run),
        # over every step of the phase (1 epoch of 256 / 16 steps).
        trains = [t for t in records if t.get("stage") == name and t["kind"] == "train"]
        assert [t["step"] for t in trains] == list(range(1, 17)), (name, trains)
        assert r["speed"]["steps"] == 16, (name, r["speed"])
        assert r["speed"]["img_per_s"] == np.median([t["img_per_s"] for t in trains])
        assert f"[{name}] projected:" in log
    # Every kernel of WRN-10-1 at the paper's 16x (irregular 0.9375): a 1/16 of each kept,
    # rounded half up. Its kernels: conv1; two convs per block, one block per group, a
    # shortcut conv where the width or stride changes (groups 2 and 3); the classifier.
    layers = stages["retrain"]["sparsity"]
    assert len(layers) == 1 + 3 * 2 + 2 + 1, sorted(layers)
    for name, layer in layers.items():
        assert layer["nonzero"] == np.floor(layer["size"] / 16 + 0.5), (name, layer)


def test_sigkill_in_the_augmented_phase_then_resume_is_bitwise_identical(
        tmp_path, cifar_flags, reference):
    workdir = str(tmp_path / "killed")
    code, out = run_and_signal(workdir, cifar_flags, "pretrain", 7, signal.SIGKILL,
                               after_checkpoint=True, config=CONFIG)
    assert code == -signal.SIGKILL, out[-3000:]
    saved = has_checkpoint(workdir, "pretrain")
    r = subprocess.run(cli_command(workdir, *cifar_flags, config=CONFIG), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert saved and "[pretrain] resuming from step" in r.stdout, r.stdout[-2000:]
    assert_same_results(workdir, reference[0])
