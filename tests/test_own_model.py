"""Your own model from the command line (`model.name='module:Class'`, `model.kwargs`,
models/external.py): every bad import path or argument refused naming the value, models
with and without `train` and BatchNorm called as flax calls them, and short natural and
adversarial programs on a user's models through `train_and_evaluate`, the CLI and the
eval command."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT, primitives
from robust_admm.compression import projections
from robust_admm.compression.rules import match_rules
from robust_admm.experiments import evaluate, export, migrate, validation
from robust_admm.experiments import run as run_lib
from robust_admm.experiments import workdir as workdir_lib
from robust_admm.experiments.config_base import base_config
from robust_admm.models import (apply_model, check_model, get_model, init_variables,
                                takes_train)
from robust_admm.models.cpu_forms import with_cpu_forms

sys.path.insert(0, ROOT)
from configs import digits as digits_config  # noqa: E402

USER_MODELS = '''
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class BNNet(nn.Module):
    """A required `train` argument and BatchNorm; num_classes from the data."""
    features: int = 4
    num_classes: int = 10
    dtype: Any = None

    def __post_init__(self):
        if self.features < 1:
            raise ValueError(f"features={self.features} must be >= 1")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(self.features, (3, 3), dtype=self.dtype, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn")(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


class PlainNet(nn.Module):
    """Neither `train` nor BatchNorm; its class count is its own field `outputs`."""
    hidden: tuple = (16,)
    outputs: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for i, h in enumerate(self.hidden):
            x = nn.relu(nn.Dense(h, name=f"fc{i}")(x))
        return nn.Dense(self.outputs, name="out")(x)


class PoolNet(nn.Module):
    """A narrow stem and a max-pool as flax writes them (nn.Conv, nn.max_pool)."""
    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(8, (5, 5), padding="SAME")(x)), (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class StatsWithoutTrain(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.BatchNorm(use_running_average=False)(x.reshape(x.shape[0], -1))
        return nn.Dense(10)(x)


class Counts(nn.Module):
    @nn.compact
    def __call__(self, x):
        calls = self.variable("counters", "calls", jnp.zeros, ())
        return nn.Dense(10)(x.reshape(x.shape[0], -1)) + 0 * calls.value


class OwnWeights(nn.Module):
    """Its weight is a leaf named 'w', not 'kernel'."""
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 10))
        return x @ w


def not_a_class():
    return PlainNet()


INSTANCE = PlainNet()
'''


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    """A folder with the user's modules, on sys.path (and on PYTHONPATH for the CLI)."""
    folder = tmp_path_factory.mktemp("user_models")
    (folder / "own_models.py").write_text(textwrap.dedent(USER_MODELS))
    (folder / "own_broken.py").write_text("import a_dependency_not_installed\n")
    sys.path.insert(0, str(folder))
    yield str(folder)
    sys.path.remove(str(folder))


BAD = [
    # (get_model's arguments, pattern of the error)
    (dict(name="own_broken:Net"), r"model.name='own_broken:Net': module 'own_broken' does not "
                                  r"import: ModuleNotFoundError: No module named "
                                  r"'a_dependency_not_installed'"),
    (dict(name="no_such_module:Net"), "module 'no_such_module' does not import"),
    (dict(name="own_models:Missing"), r"'own_models' has no attribute 'Missing'; its "
                                      r"flax.linen.Module classes: \['BNNet', 'Counts', "
                                      r"'OwnWeights', 'PlainNet', 'PoolNet', "
                                      r"'StatsWithoutTrain'\]"),
    (dict(name="own_models:not_a_class"), "is an instance of function, not a flax.linen.Module"),
    (dict(name="own_models:INSTANCE"), "is an instance of PlainNet, not a flax.linen.Module "
                                       "subclass"),
    (dict(name="own_models:Any"), "not a flax.linen.Module subclass"),
    (dict(name="own_models:"), r"model.name='own_models:' is not an import path 'module:Class'"),
    (dict(name=":BNNet"), "is not an import path"),
    (dict(name="own_models:BNNet", kwargs='{"feature": 4}'),
     r"refuses model.kwargs='\{\"feature\": 4\}': TypeError: .*unexpected keyword argument "
     r"'feature'; its fields: \['features', 'num_classes', 'dtype'\]"),
    (dict(name="own_models:BNNet", kwargs='{"features": 0}'),
     "refuses model.kwargs=.*ValueError: features=0 must be >= 1"),
    (dict(name="own_models:BNNet", kwargs='{"num_classes": 3}'),
     "gives num_classes: the class count comes from the data"),
    (dict(name="own_models:BNNet", kwargs='{features: 4}'), "model.kwargs=.* is not valid JSON"),
    (dict(name="own_models:BNNet", kwargs='[4]'), "is a JSON list, not an object"),
    (dict(name="own_models:BNNet", width=2), "model.width=2 with model.name='own_models:BNNet'"),
    (dict(name="own_models:BNNet", normalize="imagenet"), "model.normalize='imagenet' with"),
    (dict(name="own_models:PlainNet", dtype="bfloat16"),
     "model.dtype='bfloat16' with model.name='own_models:PlainNet': PlainNet has no `dtype` "
     "field"),
    (dict(name="lenet5", kwargs='{"features": 4}'), "model.kwargs=.* with model.name='lenet5': "
                                                    "constructor arguments are for a model "
                                                    "given by import path"),
]


@pytest.mark.parametrize("args,pattern", BAD)
def test_a_bad_import_path_or_argument_is_refused_naming_it(user_dir, args, pattern):
    with pytest.raises(ValueError, match=pattern):
        get_model(**args)


def test_the_data_gives_num_classes_the_dtype_is_cloned_and_json_arrays_are_tuples(user_dir):
    m = get_model("own_models:BNNet", 7, kwargs='{"features": 3}')
    assert (m.features, m.num_classes, m.dtype) == (3, 7, None)
    assert get_model("own_models:BNNet", 7, dtype="bfloat16").dtype == jnp.bfloat16
    p = get_model("own_models:PlainNet", 7, kwargs='{"hidden": [5, 6], "outputs": 7}')
    assert p.hidden == (5, 6) and p.outputs == 7 and hash(p)  # no num_classes field: unset


def test_models_with_and_without_train_and_batchnorm_are_called_as_flax_calls_them(user_dir):
    """apply_model and init_variables against flax's own calls with the arguments each
    model takes (the reference), those calls in the CPU forms a user's model is computed in
    (`with_cpu_forms`, bit for bit) and as they are (to float rounding)."""
    x = np.random.default_rng(1).uniform(size=(4, 6, 6, 1)).astype(np.float32)
    key = jax.random.PRNGKey(0)
    bn = get_model("own_models:BNNet", 5)
    assert takes_train(bn) and takes_train(get_model("lenet5"))

    def flax_calls(v, x):
        return (bn.apply(v, x, train=True, mutable=["batch_stats"]), bn.apply(v, x, train=False))

    @jax.jit
    def bn_calls(x):
        v = init_variables(bn, key, x)  # `train` has no default: initialised with train=False
        ref = bn.init(key, x, train=False)
        ours = (apply_model(bn, v["params"], v["batch_stats"], x, train=True),
                apply_model(bn, v["params"], v["batch_stats"], x, train=False))
        return v, ref, ours, with_cpu_forms(flax_calls)(v, x), flax_calls(v, x)

    v, ref, ours, in_forms, as_is = bn_calls(x)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, v, ref))
    for flax_, exact in ((in_forms, True), (as_is, False)):
        ((logits, stats), (eval_logits, same)) = ours
        ((ref_logits, ref_new), ref_eval) = flax_
        check = (np.testing.assert_array_equal if exact else
                 lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6))
        check(logits, ref_logits)
        check(stats["bn"]["mean"], ref_new["batch_stats"]["bn"]["mean"])
        check(eval_logits, ref_eval)
    assert not np.allclose(stats["bn"]["mean"], v["batch_stats"]["bn"]["mean"])
    np.testing.assert_array_equal(same["bn"]["var"], v["batch_stats"]["bn"]["var"])

    plain = get_model("own_models:PlainNet")
    assert not takes_train(plain)

    @jax.jit
    def plain_calls(x):
        v = init_variables(plain, key, x)
        return v, [apply_model(plain, v["params"], {}, x, train=t) for t in (True, False)], (
            plain.apply(v, x))

    v, ours, ref = plain_calls(x)
    assert set(v) == {"params"}
    for logits, stats in ours:
        np.testing.assert_array_equal(logits, ref)  # dense layers only: nothing rewritten
        assert stats == {}
    check_model(bn, "bn", (1, 6, 6, 1), 5)
    check_model(plain, "plain", (1, 6, 6, 1), 10)


def test_a_users_model_is_computed_in_the_cpu_forms_the_zoos_in_its_own(user_dir):
    """On CPU a user's model (here nn.Conv 1 -> 8 and nn.max_pool) goes through
    `with_cpu_forms` wherever the run calls it (`apply_model`: training, its attack,
    evaluation): no native convolution or reduce_window left, the same logits and input
    gradient as flax's own call to float rounding; a zoo model is called as it is."""
    from robust_admm.models.apply import is_zoo_model

    x = np.random.default_rng(2).uniform(size=(3, 28, 28, 1)).astype(np.float32)
    y = jnp.asarray([1, 4, 7])
    user = get_model("own_models:PoolNet")
    v = init_variables(user, jax.random.PRNGKey(0), x)
    ours = lambda x: apply_model(user, v["params"], {}, x, train=True)[0]
    flax_ = lambda x: user.apply(v, x)
    assert {"conv_general_dilated", "reduce_window_max"} <= set(primitives(flax_, x))
    assert not {"conv_general_dilated", "reduce_window_max"} & set(primitives(ours, x))
    loss = lambda f: jax.jit(jax.value_and_grad(
        lambda x: -jnp.take_along_axis(jax.nn.log_softmax(f(x)), y[:, None], 1).sum()))
    for a, b in zip(loss(ours)(x), loss(flax_)(x)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(ours)(x), jax.jit(flax_)(x), rtol=1e-5, atol=1e-5)
    assert not is_zoo_model(user) and is_zoo_model(get_model("lenet_adv", 10, 4))


@pytest.mark.parametrize("name,classes,pattern", [
    ("own_models:PlainNet", 3, r"the output is \(2, 10\); it must be logits of shape "
                               r"\(batch, classes\) = \(2, 3\)"),
    ("own_models:StatsWithoutTrain", 10, "has BatchNorm statistics but its __call__ takes no "
                                         "`train` argument"),
    ("own_models:Counts", 10, r"variable collections \['counters'\]; a run carries only"),
])
def test_a_model_the_run_cannot_carry_is_refused_on_the_data_shapes(user_dir, name, classes,
                                                                    pattern):
    with pytest.raises(ValueError, match=pattern):
        check_model(get_model(name, classes), name, (1, 6, 6, 1), classes)


def test_rules_on_a_model_without_kernel_leaves_name_the_leaves_it_has(user_dir):
    m = get_model("own_models:OwnWeights")
    params = init_variables(m, jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)))["params"]
    with pytest.raises(ValueError, match=r"rule 'w' matches no kernel leaf; available layers: "
                                         r"\[\] \(candidate leaf paths: \[\]\); only leaves "
                                         r"named 'kernel' .*nn.Dense and nn.Conv.* other "
                                         r"leaves: \['w'\]"):
        match_rules(params, {"w": {"kind": "irregular", "ratio": 0.5}})


def test_an_old_config_json_reads_with_no_model_kwargs():
    new = base_config().to_dict()
    old = json.loads(json.dumps(new))
    del old["model"]["kwargs"]
    assert validation.config_differences(old, new) == ["model.kwargs: '<absent>' -> ''"]
    upgraded = migrate.upgrade_config_dict(old)
    assert upgraded["model"]["kwargs"] == ""
    assert validation.config_differences(upgraded, new) == []
    # The same JSON object written differently is no change; another value is.
    a = dict(new, model=dict(new["model"], kwargs='{"a": [1, 2], "b": 3}'))
    b = dict(new, model=dict(new["model"], kwargs='{"b":3,"a":[1,2]}'))
    assert validation.config_differences(a, b) == []
    c = dict(new, model=dict(new["model"], kwargs='{"a": [1, 2], "b": 4}'))
    assert validation.config_differences(a, c) == [
        "model.kwargs: '{\"a\": [1, 2], \"b\": 3}' -> '{\"a\": [1, 2], \"b\": 4}'"]


def user_config(name, kwargs="", rules="conv=0.5,head=0.75"):
    c = digits_config.get_config("smoke")
    c.model.name, c.model.width, c.model.kwargs, c.prune.ratios = name, 1, kwargs, rules
    c.program, c.admm.epochs, c.retrain.epochs = "admm,retrain", 2, 1
    c.attack.num_steps, c.eval.num_steps = 2, 2
    return c


def test_validation_refuses_a_bad_model_before_anything_runs(user_dir, tmp_path):
    c = user_config("own_broken:Net")
    with pytest.raises(ValueError, match="module 'own_broken' does not import"):
        run_lib.train_and_evaluate(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")  # refused before the workdir was made


def kept_exactly(params, ratios):
    for layer, ratio in ratios.items():
        w = np.asarray(params[layer]["kernel"])
        assert np.count_nonzero(w) == projections.kept_count(w.size, ratio), layer


@pytest.mark.slow
def test_adversarial_program_on_own_model_and_own_arrays_then_eval_and_resume(user_dir,
                                                                              tmp_path):
    """BNNet (required `train`, BatchNorm) on float arrays k/255 in an .npz (NHW): ADMM
    and retraining adversarially, the rules on its own layer names, the eval command's
    natural accuracy against the checkpoint's model applied by flax on the test images
    (the reference), a rerun that resumes from config.json, and the export rebuilt from its
    files alone."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 160)
    x = np.clip(rng.integers(0, 90, (160, 8, 8)) + 80 * y[:, None, None], 0, 255)
    npz = str(tmp_path / "mine.npz")
    np.savez(npz, x_train=x[:128] / 255.0, y_train=y[:128], x_test=x[128:] / 255.0,
             y_test=y[128:])
    c = user_config("own_models:BNNet", '{"features": 3}')
    c.data.name, c.data.source, c.data.dir = "mine", "npz", npz
    c.eval.batch_size = 32
    workdir = str(tmp_path / "run")
    summary = run_lib.train_and_evaluate(c, workdir)
    assert list(summary["stages"]) == ["admm", "retrain"]
    saved = workdir_lib.read_config(workdir)
    assert (saved.model.name, saved.model.kwargs) == ("own_models:BNNet", '{"features": 3}')
    state = workdir_lib.load_final_state(workdir, "retrain")
    kept_exactly(state["params"], {"conv": 0.5, "head": 0.75})
    assert state["params"]["head"]["kernel"].shape == (8 * 8 * 3, 3)  # 3 classes in the data

    out = evaluate.evaluate_workdir(workdir, attacks="pgd2", n=0, batch=32, checks=False)
    model = get_model("own_models:BNNet", 3, kwargs='{"features": 3}')
    logits = model.apply({"params": state["params"], "batch_stats": state["batch_stats"]},
                         jnp.asarray(x[128:, :, :, None] / 255.0, jnp.float32), train=False)
    reference = float(np.mean(np.argmax(logits, -1) == y[128:]))
    assert out["n"] == 32 and out["natural_acc"] == pytest.approx(reference, abs=1e-9)
    assert out["attacks"]["pgd2"]["robust_acc"] <= out["natural_acc"]

    again = run_lib.train_and_evaluate(saved, workdir)  # config.json rebuilds the model
    assert again["stages"]["retrain"] == summary["stages"]["retrain"]

    side = export.write_export(workdir, "retrain", str(tmp_path / "export" / "model"))
    assert side["model"]["kwargs"] == '{"features": 3}' and side["model"]["num_classes"] == 3
    rebuilt, variables = export.rebuild(str(tmp_path / "export" / "model.npz"),
                                        str(tmp_path / "export" / "model.json"))
    np.testing.assert_array_equal(rebuilt.apply(variables, jnp.asarray(
        x[128:, :, :, None] / 255.0, jnp.float32), train=False), logits)


@pytest.mark.slow
def test_natural_program_on_a_model_without_train_or_batchnorm_through_the_cli(user_dir,
                                                                               tmp_path):
    """PlainNet (no `train`, no BatchNorm, its class count given as `outputs`) on the
    digits through `robust_admm.train` (a one-phase program: pruned, then trained with its
    masks), then `robust_admm.eval` on the result: its natural accuracy on the whole test
    split is the run's own final evaluation's."""
    workdir = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([user_dir, ROOT]))
    r = subprocess.run(
        [sys.executable, "-m", "robust_admm.train", "--config=configs/digits.py:smoke",
         f"--workdir={workdir}", "--config.model.name=own_models:PlainNet",
         "--config.model.width=1", '--config.model.kwargs={"hidden": [32], "outputs": 10}',
         "--config.prune.ratios=fc0=0.5,out=0.5", "--config.setting=natural",
         "--config.objective=natural", "--config.program=retrain",
         "--config.retrain.epochs=3", "--config.retrain.lr=0.003"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(os.path.join(workdir, "summary.json"), encoding="utf-8"))
    kept_exactly(workdir_lib.load_final_state(workdir, "retrain")["params"],
                 {"fc0": 0.5, "out": 0.5})
    r = subprocess.run([sys.executable, "-m", "robust_admm.eval", f"--workdir={workdir}",
                        "--attacks=fgsm", "--n=0", "--checks=false"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.load(open(os.path.join(workdir, "eval", "retrain.json"), encoding="utf-8"))
    assert out["n"] == 297
    assert out["natural_acc"] == pytest.approx(summary["stages"]["retrain"]["nat_acc"])
    assert out["natural_acc"] > 0.6  # it learnt the digits (chance: 0.1)
