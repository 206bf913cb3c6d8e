"""`robust_admm.autoattack` and `robust_admm.attack` on any JAX classifier: the eval
command's result bit for bit on a model it trained; on linear models (pure jnp, Flax NNX)
the robust points are those whose L-inf / L2 distance to the decision boundary, derived in
float64, exceeds epsilon; every bad input refused with a message naming it."""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import robust_admm
from robust_admm import data
from robust_admm.evaluation import autoattack_api
from robust_admm.experiments import evaluate
from robust_admm.experiments import run as run_lib
from robust_admm.experiments import workdir as workdir_lib
from robust_admm.models import get_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import digits as digits_config  # noqa: E402


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A run of the digits quick start's model, trained by the CLI's own loop (natural,
    the pretrain stage, 2 epochs: seconds, and a model most attacks fool at eps 0.15)."""
    config = digits_config.get_config("smoke")
    config.setting, config.stages, config.pretrain.epochs = "natural", "pretrain", 2
    config.eval.num_steps = 0  # the run's own evaluation: natural only
    workdir = str(tmp_path_factory.mktemp("digits"))
    run_lib.train_and_evaluate(config, workdir)
    return workdir


@pytest.mark.slow
def test_autoattack_gives_the_eval_commands_accuracy_bit_for_bit(digits_run):
    """Same images, epsilon and key: the same clean, per-member and robust accuracy. The
    model is called as a user would call it, through a bound linen module."""
    n = 32
    out = evaluate.evaluate_workdir(digits_run, attacks="aa-standard", n=n, checks=False)
    config = workdir_lib.read_config(digits_run)
    params = workdir_lib.load_final_state(digits_run, "pretrain")["params"]
    model = get_model(config.model.name, 10, config.model.width)
    test = data.load_dataset("digits", "files").test
    x, y = test.images[:n].astype(np.float32) / 255.0, test.labels[:n]
    result = robust_admm.autoattack(
        functools.partial(model.bind({"params": params}), train=False), x, y,
        epsilon=0.15, key=jax.random.PRNGKey(0))
    cli = out["attacks"]["aa-standard"]
    assert result.clean_accuracy == out["natural_acc"]
    assert result.accuracy_after == cli["after"]
    assert result.robust_accuracy == cli["robust_acc"]
    assert list(result.accuracy_after) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert result.robust_accuracy < result.clean_accuracy  # the attacks did something
    assert (result.n, result.norm, result.epsilon, result.version) == (n, "linf", 0.15,
                                                                         "standard")


# ----------------------------------------------------------------------------- linear models
# For z = x @ w + b, the smallest perturbation within [0, 1] that makes a class k score
# at least the label y's is found per pair in float64: the independent reference.

@pytest.fixture(scope="module")
def digits():
    """The digits (8x8x1 pixels in [0, 1]): train and the first 64 test images."""
    ds = data.load_dataset("digits", "files")
    scale = lambda split: (split.images.astype(np.float32) / 255.0, split.labels.astype(np.int32))
    x, y = scale(ds.test)
    return scale(ds.train), (x[:64], y[:64])


def softmax_regression(x, y, steps=300, lr=0.5):
    """w (64, 10), b (10,) fitted by gradient descent on the cross-entropy."""
    xf = jnp.asarray(x.reshape(len(x), -1))
    onehot = jax.nn.one_hot(y, 10)
    loss = lambda p: -(jax.nn.log_softmax(xf @ p["w"] + p["b"]) * onehot).sum(-1).mean()
    step = jax.jit(lambda p: jax.tree_util.tree_map(lambda a, g: a - lr * g, p,
                                                    jax.grad(loss)(p)))
    params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
    for _ in range(steps):
        params = step(params)
    return params


def boundary_distance(w, b, x, y, norm):
    """Per example (float64), the smallest `norm` radius at which some point of [0, 1]^d
    within it scores a class k != y at least as high as y (inf where none does), and the
    clean margin's sign. Pair (y, k), v = w_k - w_y, need = z_y - z_k: a step d within
    the box raises v.d by at most g(t) = sum_i |v_i| min(t, room_i) at L-inf radius t
    (room_i: the distance to the face v_i points to), and, at L2, the KKT step
    d_i = clip(a v_i, -x_i, 1 - x_i) with v.d(a) = need; both bisected."""
    w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    z = x @ w + b
    v = w.T[None, :, :] - w.T[y][:, None, :]                 # (n, classes, d)
    need = (z[np.arange(len(y)), y][:, None] - z)[..., None]  # (n, classes, 1)
    xb = x[:, None, :]
    room = np.where(v > 0, 1 - xb, xb)
    if norm == "linf":
        rise = lambda t: (np.abs(v) * np.minimum(t, room)).sum(-1, keepdims=True)
        step_norm = lambda t: t
        hi = np.ones_like(need)
    else:
        step = lambda a: np.clip(a * v, -xb, 1 - xb)
        rise = lambda a: (v * step(a)).sum(-1, keepdims=True)
        step_norm = lambda a: np.sqrt((step(a) ** 2).sum(-1, keepdims=True))
        hi = np.full_like(need, 1e6)
    lo = np.zeros_like(need)
    for _ in range(100):
        mid = (lo + hi) / 2
        ok = rise(mid) >= need
        lo, hi = np.where(ok, lo, mid), np.where(ok, mid, hi)
    dist = np.where(rise(hi) >= need, step_norm(hi), np.inf)[..., 0]
    dist[np.arange(len(y)), y] = np.inf
    return dist.min(1), z.argmax(1) == y


def check_against_boundary(result, dist, clean, epsilon):
    """Robust exactly where the boundary lies beyond epsilon, but for a 2% band at it:
    certified points cannot fall (a bug in the counting or the ball), the others must
    (a weak attack)."""
    np.testing.assert_array_equal(result.clean, clean)
    assert not np.any(result.robust & ~result.clean)
    assert np.all(result.robust[clean & (dist > 1.02 * epsilon)])
    assert not np.any(result.robust[dist < 0.98 * epsilon])
    assert 0.1 < result.robust.mean() < result.clean.mean() - 0.1  # both kinds present
    assert result.robust_accuracy == result.robust.mean()
    after = list(result.accuracy_after.values())
    assert after == sorted(after, reverse=True) and after[-1] == result.robust_accuracy


@pytest.mark.slow
def test_autoattack_on_a_pure_jnp_model_is_exact_where_the_boundary_is_known(digits):
    (x_train, y_train), (x, y) = digits
    params = softmax_regression(x_train, y_train)
    logits = lambda p, images: images.reshape(len(images), -1) @ p["w"] + p["b"]
    result = robust_admm.autoattack(functools.partial(logits, params), x, y, epsilon=0.1)
    dist, clean = boundary_distance(params["w"], params["b"], x, y, "linf")
    check_against_boundary(result, dist, clean, 0.1)
    assert result.attacks == ("apgd-ce", "apgd-t", "fab-t", "square")


class LinearBN(nnx.Module):
    """A linear classifier with BatchNorm on its logits: affine once in eval mode."""

    def __init__(self, rngs):
        self.linear = nnx.Linear(64, 10, rngs=rngs)
        self.bn = nnx.BatchNorm(10, momentum=0.5, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.linear(x.reshape(x.shape[0], -1)))


@pytest.mark.slow
def test_autoattack_on_a_flax_nnx_model_in_l2(digits):
    """An NNX model trained a few steps (its BatchNorm's running averages move), then
    attacked in eval mode: its effective affine map, derived from the parameters in
    float64, gives the reference."""
    import optax
    (x_train, y_train), (x, y) = digits
    model = LinearBN(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, xb, yb):
        loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()
        optimizer.update(model, nnx.grad(loss)(model))

    for i in range(60):
        b = slice(64 * i % 1344, 64 * i % 1344 + 64)
        step(model, optimizer, x_train[b], y_train[b])
    model.eval()
    bn, lin = model.bn, model.linear
    scale = np.asarray(bn.scale[...], np.float64) / np.sqrt(
        np.asarray(bn.var[...], np.float64) + bn.epsilon)
    w = np.asarray(lin.kernel[...], np.float64) * scale
    b = (np.asarray(lin.bias[...], np.float64) - np.asarray(bn.mean[...])) * scale \
        + np.asarray(bn.bias[...], np.float64)
    assert np.abs(np.asarray(bn.mean[...])).max() > 0.1  # the running averages moved
    result = robust_admm.autoattack(model, x, y, epsilon=0.5, norm="l2",
                                    attacks="apgd-ce,fab-t")
    dist, clean = boundary_distance(w, b, x, y, "l2")
    check_against_boundary(result, dist, clean, 0.5)
    assert (result.version, result.norm) == ("custom", "l2")


# ----------------------------------------------------------------------------- one attack

def fgsm_reference(w, b, x, y, epsilon):
    """FGSM on z = x @ w + b in float64: x + epsilon * sign(d CE / d x), clipped to
    [0, 1]; and whether it is misclassified."""
    w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
    xf = np.asarray(x, np.float64).reshape(len(x), -1)
    z = xf @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = (p - np.eye(w.shape[1])[y]) @ w.T
    x_adv = np.clip(xf + epsilon * np.sign(grad), 0, 1)
    return x_adv.reshape(x.shape), (x_adv @ w + b).argmax(1) != y


@pytest.mark.parametrize("bounds", [(0.0, 1.0), (-1.0, 1.0)])
def test_a_single_attack_returns_its_images_and_whom_they_fool(digits, bounds):
    """FGSM on the linear model against its float64 re-derivation; in bounds (-1, 1) the
    same attack on the same pixels (x -> 2x - 1, epsilon doubled)."""
    (x_train, y_train), (x, y) = digits
    params = softmax_regression(x_train, y_train, steps=100)
    lo, hi = bounds
    to01 = lambda images: (images - lo) / (hi - lo)
    logits = lambda images: to01(images).reshape(len(images), -1) @ params["w"] + params["b"]
    adversarial, fooled = robust_admm.attack(
        "fgsm", logits, lo + (hi - lo) * x, y, epsilon=0.05 * (hi - lo), bounds=bounds)
    x_ref, fooled_ref = fgsm_reference(params["w"], params["b"], x, y, 0.05)
    assert adversarial.shape == x.shape and adversarial.dtype == np.float32
    np.testing.assert_allclose(to01(adversarial), x_ref, atol=1e-6)
    np.testing.assert_array_equal(fooled, fooled_ref)
    assert 0 < fooled.mean() < 1


def test_single_attack_options_and_the_boundary(digits):
    """FAB-T (exact on a linear model) fools exactly the points whose boundary lies within
    epsilon, stays in the ball; options change the attack's fields, unknown ones are
    refused."""
    (x_train, y_train), (x, y) = digits
    params = softmax_regression(x_train, y_train)
    logits = functools.partial(lambda p, images: images.reshape(len(images), -1) @ p["w"]
                               + p["b"], params)
    adversarial, fooled = robust_admm.attack("fab-t", logits, x, y, epsilon=0.1,
                                             num_steps=20)
    dist, clean = boundary_distance(params["w"], params["b"], x, y, "linf")
    assert np.all(fooled[dist < 0.98 * 0.1]) and not np.any(fooled[dist > 1.02 * 0.1])
    assert np.abs(adversarial - x).max() <= 0.1 + 1e-6
    assert 0 <= adversarial.min() and adversarial.max() <= 1
    with pytest.raises(ValueError, match=r"fab-t: option\(s\) steps not known; allowed: "
                                         r"num_steps, n_target_classes, restarts"):
        robust_admm.attack("fab-t", logits, x, y, epsilon=0.1, steps=20)


def test_the_adversarial_images_are_the_same_from_the_host_and_the_compiled_loop(digits):
    """`attack` drives the steps from the host on CPU and in one compiled loop on GPU/TPU:
    the same images (PGD, two restarts: the pick of the first that fools included)."""
    from robust_admm.attacks import Pgd
    from robust_admm.evaluation import robustness
    (x_train, y_train), (x, y) = digits
    params = softmax_regression(x_train, y_train, steps=100)
    apply, arrays = autoattack_api.split_logits_fn(functools.partial(
        lambda p, images: images.reshape(len(images), -1) @ p["w"] + p["b"], params))
    pgd = Pgd(epsilon=0.05, step_size=0.02, num_steps=3, restarts=2)
    images = {loop: robustness.LogitsEvaluator(apply, arrays, 32, loop=loop).adversarial(
        pgd, x, y, jax.random.PRNGKey(0)) for loop in ("host", "fori")}
    np.testing.assert_allclose(images["host"], images["fori"], atol=1e-6)
    assert np.abs(images["host"] - x).max() == pytest.approx(0.05)


# ----------------------------------------------------------------------------- bad input

W = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
LINEAR = lambda images: images.reshape(len(images), -1) @ W
X = np.random.default_rng(1).uniform(0, 1, (6, 8, 8, 1)).astype(np.float32)
Y = np.array([0, 1, 2, 3, 4, 9])


@pytest.mark.parametrize("change, error, match", [
    (dict(logits_fn=lambda images: images.reshape(len(images), -1).sum(1)), ValueError,
     r"logits_fn returned shape \(8,\), dtype float32 for a batch of images of shape "
     r"\(8, 8, 8, 1\) \(the attacks call it on batches\); allowed: floating logits of "
     r"shape \(batch, classes\) = \(8, classes >= 2\)"),
    (dict(logits_fn=lambda images: LINEAR(images)[:1]), ValueError,
     r"logits_fn returned shape \(1, 10\).*= \(8, classes >= 2\)"),
    (dict(logits_fn=lambda images: (LINEAR(images), 0)), ValueError,
     r"logits_fn returned tuple"),
    (dict(logits_fn=lambda images: LINEAR(images).astype(jnp.int32)), ValueError,
     r"logits_fn returned shape \(8, 10\), dtype int32"),
    (dict(logits_fn="model"), TypeError, r"logits_fn='model' is not callable"),
    (dict(logits_fn=None), TypeError, r"logits_fn=None is not callable; allowed: a function"),
    (dict(images=(X * 255).astype(np.uint8)), TypeError,
     r"images have dtype uint8; allowed: a floating dtype"),
    (dict(images=X * 2), ValueError, r"images hold values in \[0.0\d+, 1.9\d+\]; allowed: "
                                     r"within bounds=\(0, 1\)"),
    (dict(images=np.where(X > 0.5, np.nan, X)), ValueError, r"images hold values in"),
    (dict(images=X.reshape(-1)), ValueError, r"images have shape \(384,\); allowed: \(batch, "
                                             r"\.\.\.\) with batch >= 1"),
    (dict(images=X[:0], labels=Y[:0]), ValueError, r"images have shape \(0, 8, 8, 1\)"),
    (dict(labels=np.array([0, 1, 2, 3, 4, 10])), ValueError,
     r"labels hold values in \[0, 10\]; allowed: \[0, 10\) for the 10 classes"),
    (dict(labels=np.array([-1, 1, 2, 3, 4, 5])), ValueError, r"labels hold values in \[-1, 5\]"),
    (dict(labels=Y.astype(np.float32)), TypeError, r"labels have dtype float32; allowed: integer"),
    (dict(labels=Y[:5]), ValueError, r"labels have shape \(5,\); allowed: \(6,\), one per image"),
    (dict(epsilon=0.0), ValueError, r"epsilon=0.0; allowed: a finite number > 0"),
    (dict(epsilon=-0.1), ValueError, r"epsilon=-0.1; allowed: a finite number > 0"),
    (dict(epsilon=float("inf")), ValueError, r"epsilon=inf; allowed"),
    (dict(epsilon=float("nan")), ValueError, r"epsilon=nan; allowed"),
    (dict(norm="l1"), ValueError, r"norm='l1' is not known; allowed: linf, l2"),
    (dict(version="plus"), NotImplementedError, r"version='plus' \(AutoAttack's APGD-DLR.*not "
                                                r"implemented; allowed: standard or a custom"),
    (dict(version="fast"), ValueError, r"version='fast' is not known; allowed: standard"),
    (dict(attacks=["apgd-ce", "pgd"]), ValueError, r"attack 'pgd' is not known; allowed: fgsm"),
    (dict(attacks="apgd-ce,aa-standard"), ValueError, r"names 'apgd-ce' twice"),
    (dict(attacks=["fgsm"], version="rand"), ValueError, r"a custom list makes the 'custom'"),
    (dict(bounds=(1.0, 0.0)), ValueError, r"bounds=\(1.0, 0.0\); allowed: \(low, high\)"),
    (dict(batch_size=0), ValueError, r"batch_size=0; allowed: an integer >= 1"),
    (dict(logits_fn=lambda images: LINEAR(images)[:, :3], labels=Y % 3), ValueError,
     r"apgd-t needs at least 4 classes; the model has 3"),
    (dict(images=X.reshape(6, 64), logits_fn=lambda images: images @ W), ValueError,
     r"square needs images of shape \(batch, height, width, channels\); got \(6, 64\)"),
])
def test_bad_input_is_refused_naming_the_value_and_what_is_allowed(change, error, match):
    args = {**dict(logits_fn=LINEAR, images=X, labels=Y, epsilon=0.1), **change}
    with pytest.raises(error, match=match):
        robust_admm.autoattack(args.pop("logits_fn"), args.pop("images"), args.pop("labels"),
                               **args)


def test_an_unbound_linen_module_and_an_unknown_attack_are_refused():
    model = get_model("lenet_digits", 10, 1)
    with pytest.raises(TypeError, match=r"unbound flax.linen module \(LeNet\).*allowed: "
                                        r"model.bind\(variables\)"):
        robust_admm.autoattack(model, X, Y, epsilon=0.1)
    with pytest.raises(ValueError, match=r"attack 'pgd-40' is not known"):
        robust_admm.attack("pgd-40", LINEAR, X, Y, epsilon=0.1)


def test_the_arrays_of_a_model_become_arguments():
    """A bound linen module's variables, an NNX module's state, a partial's arrays: lifted
    out (so the compiled attacks take them as arguments); a closure keeps its own."""
    params = {"w": jnp.asarray(W), "b": jnp.zeros(10)}
    linear = lambda p, images: images.reshape(len(images), -1) @ p["w"] + p["b"]
    apply, arrays = autoattack_api.split_logits_fn(functools.partial(linear, params))
    assert len(arrays) == 2
    np.testing.assert_array_equal(jax.jit(apply)(arrays, X), jax.jit(linear)(params, X))
    apply, arrays = autoattack_api.split_logits_fn(lambda images: linear(params, images))
    assert arrays == []
    model = LinearBN(nnx.Rngs(0))
    model.eval()
    apply, arrays = autoattack_api.split_logits_fn(model)
    assert {a.shape for a in arrays} >= {(64, 10), (10,)}
    np.testing.assert_array_equal(jax.jit(apply)(arrays, X), nnx.jit(lambda m: m(X))(model))
    lenet = get_model("lenet_digits", 10, 1)
    variables = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                       jax.eval_shape(lenet.init, jax.random.PRNGKey(0), X))
    apply, arrays = autoattack_api.split_logits_fn(
        functools.partial(lenet.bind(variables), train=False))
    assert len(arrays) == len(jax.tree_util.tree_leaves(variables)) == 8
    assert jax.eval_shape(apply, arrays, X).shape == (6, 10)


# ----------------------------------------------------------------------------- example

def test_the_autoattack_example_runs():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "autoattack_any_model.py")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    clean = float(lines[0].split("clean accuracy: ")[1].split("%")[0])
    robust = float(lines[-1].split("robust accuracy: ")[1].split("%")[0])
    assert [l.split(":")[0].strip() for l in lines[1:-1]] == [
        "after apgd-ce", "after apgd-t", "after fab-t", "after square"]
    assert clean > 80 and 0 < robust < clean
