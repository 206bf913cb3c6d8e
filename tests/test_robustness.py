"""Robust accuracy as AutoAttack counts it, on a small model trained in the test: the
attacks' ordering, epsilon 0 and 1, the host driver that regroups the points still
robust against the compiled one, and the gradient-masking warnings."""
import jax
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from robust_admm import data
from robust_admm.attacks import ApgdCe, ApgdT, FabT, Pgd, Square, suite
from robust_admm.evaluation import masking
from robust_admm.evaluation.robustness import TAIL_GRANULE, Evaluator, LogitsEvaluator
from robust_admm.evaluation.robustness import make_fooled_fn
from robust_admm.evaluation.robustness import robust_accuracy
from robust_admm.models import get_model


@pytest.fixture(scope="module")
def trained():
    """LeNet_digits w=2 trained naturally on the 8x8 digits (about 95% on the test split)."""
    ds = data.load_dataset("digits", "files")
    model = get_model("lenet_digits", 10, 2)
    x = ds.train.images.astype(np.float32) / 255.0
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt, xb, yb):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p}, xb), yb).mean()
        g = jax.grad(loss)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt

    opt = tx.init(params)
    rng = np.random.default_rng(0)
    for _ in range(400):
        b = rng.integers(0, len(x), 128)
        params, opt = step(params, opt, x[b], ds.train.labels[b])
    xt = ds.test.images[:200].astype(np.float32) / 255.0
    return model, params, xt, ds.test.labels[:200]


def _evaluator(trained, **kw):
    model, params, _, _ = trained
    return Evaluator(model, params, {}, batch=kw.pop("batch", 128), log=lambda m: None, **kw)


def test_attacks_order_as_their_strength_on_a_trained_model(trained):
    _, _, x, y = trained
    ev = _evaluator(trained)
    r = robust_accuracy(ev, x, y, suite.parse("fgsm,pgd40,apgd-ce,aa-standard"), 0.1,
                        jax.random.PRNGKey(0))
    acc = {k: v["robust_acc"] for k, v in r["attacks"].items()}
    assert r["natural_acc"] > 0.9
    assert acc["aa-standard"] <= acc["apgd-ce"] <= acc["pgd40"] <= acc["fgsm"] < r["natural_acc"]
    assert acc["fgsm"] - acc["aa-standard"] > 0.05  # the attacks differ on this model
    # The ensemble's APGD-CE runs first on the same points with the same key.
    assert r["attacks"]["aa-standard"]["after"]["apgd-ce"] == acc["apgd-ce"]
    after = list(r["attacks"]["aa-standard"]["after"].values())
    assert after == sorted(after, reverse=True)


def test_epsilon_zero_gives_the_natural_accuracy_and_one_gives_about_zero(trained):
    _, _, x, y = trained
    ev = _evaluator(trained)
    items = suite.parse("fgsm,pgd20,apgd-ce,apgd-t,fab-t,square")
    zero = robust_accuracy(ev, x, y, items, 0.0, jax.random.PRNGKey(1))
    natural = float((ev.correct(x, y)).mean())
    assert all(v["robust_acc"] == natural for v in zero["attacks"].values())
    one = robust_accuracy(ev, x[:64], y[:64], items, 1.0, jax.random.PRNGKey(1))
    for label, v in one["attacks"].items():
        assert v["robust_acc"] <= 0.02, label


@pytest.mark.parametrize("attack", [
    Pgd(epsilon=0.08, step_size=0.02, num_steps=6, restarts=2),
    ApgdCe(epsilon=0.08, num_steps=30),
    ApgdT(epsilon=0.08, num_steps=20, n_target_classes=3, restarts=3),
    FabT(epsilon=0.08, num_steps=20, n_target_classes=2, restarts=2),
    Square(epsilon=0.08, num_steps=300),
], ids=lambda a: type(a).__name__)
def test_regrouping_host_driver_fools_the_same_points_as_the_compiled_loop(trained, attack):
    model, params, x, y = trained
    x, y = x[:48], y[:48]
    bucket = lambda n: 1 << max(0, int(n - 1).bit_length())
    key = jax.random.PRNGKey(2)
    fori = make_fooled_fn(model, attack, loop="fori")((params, {}), x, y, key)
    host = make_fooled_fn(model, attack, loop="host", bucket=bucket)((params, {}), x, y, key)
    np.testing.assert_array_equal(host, fori)
    assert 0 < fori.sum() < len(y)


def test_masking_warnings_name_the_numbers():
    result = {"attacks": {"fgsm": {"robust_acc": 0.40, "members": ["fgsm"]},
                          "pgd40": {"robust_acc": 0.45, "members": ["pgd40"]},
                          "aa-standard": {"robust_acc": 0.3, "members": list(suite.STANDARD),
                                          "after": {"apgd-ce": 0.44, "apgd-t": 0.3}}}}
    at_1 = {"attacks": {"pgd20": {"robust_acc": 0.2, "members": ["pgd20"]}}}
    curve = [{"epsilon": 0.1, "attacks": {"pgd40": {"robust_acc": 0.5}}},
             {"epsilon": 0.2, "attacks": {"pgd40": {"robust_acc": 0.6}}}]
    w = masking.masking_warnings(result, at_1, curve)
    assert len(w) == 3
    assert "fgsm (40.00%) beats the stronger pgd40 (45.00%)" in w[0]
    assert "pgd20 leaves 20.00%" in w[1]
    assert "from 50.00% at epsilon 0.1 to 60.00% at 0.2" in w[2]
    result["attacks"]["fgsm"]["robust_acc"] = 0.5
    assert masking.masking_warnings(result) == []
    # The black-box Square finding more than a point beyond the gradient attacks.
    result["attacks"]["aa-standard"]["after"].update({"fab-t": 0.3, "square": 0.25})
    w = masking.masking_warnings(result)
    assert len(w) == 1 and "black-box square lowers accuracy from 30.00% (after fab-t) " \
        "to 25.00%" in w[0]
    result["attacks"]["aa-standard"]["after"]["square"] = 0.295
    assert masking.masking_warnings(result) == []


@pytest.mark.parametrize("spec,match", [("pgd", "'pgd' is not known"),
                                        ("fgsm,fgsm", "twice"), ("", "names no attack")])
def test_attack_lists_are_checked(spec, match):
    with pytest.raises(ValueError, match=match):
        suite.parse(spec)


@settings(max_examples=200, deadline=None)
@given(count=st.integers(1, 5000), batch=st.integers(1, 600), devices=st.sampled_from([1, 2, 8]))
def test_the_points_are_shared_evenly_over_as_few_batches_as_the_batch_allows(count, batch,
                                                                               devices):
    """`batches_for`: ceil(count / batch) batches of one size, at most `batch`, a multiple
    of the device count, less than a granule (TAIL_GRANULE and the device count's least
    common multiple) above the even share."""
    batch = -(-batch // devices) * devices  # the evaluator refuses other batches on a mesh
    ev = LogitsEvaluator(None, None, batch)
    ev.mesh = type("Mesh", (), {"size": devices})()  # only its size is read
    number, size = ev.batches_for(count)
    assert number == -(-count // batch)
    assert number * size >= count and (number - 1) * size < count
    assert size <= batch and size % devices == 0
    share = -(-count // number)
    assert 0 <= size - share < np.lcm(TAIL_GRANULE, devices)
