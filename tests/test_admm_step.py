"""The ADMM penalty, and its place in the train step's gradient, against float64 numpy.

    penalty(W, state) = sum_l rho_l / 2 * ||W_l - Z_l + U_l||^2
    one SGD step:  W_l <- W_l - lr * (dL/dW_l + rho_l (W_l - Z_l + U_l))   (compressed l)
                   W   <- W   - lr * dL/dW                                  (the others)

Each check is computed without `admm.penalty`, so a step that dropped the penalty from
its loss fails them (the penalty gradients here are much larger than the tolerances).
"""
import functools

import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st

from robust_admm.compression import admm
from robust_admm.compression import rules as rules_lib
from robust_admm.compression import transforms
from robust_admm.data.batching import batch_indices, to_pixels
from robust_admm.models import apply_model, get_model
from robust_admm.training.attack import TrainAttack
from robust_admm.training.state import TrainState
from robust_admm.training.step import make_train_step

EPS32 = float(np.finfo(np.float32).eps)


def np_penalty(w, z, u, rho):
    """sum_l rho_l / 2 ||W_l - Z_l + U_l||^2 in float64 over the dicts' common keys."""
    return sum(0.5 * np.float64(rho[p]) * np.sum(
        (np.asarray(w[p], np.float64) - np.asarray(z[p], np.float64)
         + np.asarray(u[p], np.float64)) ** 2) for p in z)


# -- the penalty ------------------------------------------------------------------------

FLOATS = st.floats(-8.0, 8.0, width=32, allow_subnormal=False)


@st.composite
def admm_problems(draw):
    """(params, state): 1-3 compressed kernels of random shape (W, Z, U drawn
    elementwise, so zeros, ties and W = Z - U all occur) and random rho, and a bias per
    layer that is not compressed (it must not count)."""
    params, z, u, rho = {}, {}, {}, {}
    for i in range(draw(st.integers(1, 3))):
        shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5))
        arrays = [draw(hnp.arrays(np.float32, shape, elements=FLOATS)) for _ in range(3)]
        name = f"layer{i}"
        params[name] = {"kernel": arrays[0],
                        "bias": draw(hnp.arrays(np.float32, (2,), elements=FLOATS))}
        path = f"{name}/kernel"
        z[path], u[path] = arrays[1], arrays[2]
        rho[path] = np.float32(draw(st.floats(1e-3, 10.0)))
    state = admm.AdmmState(z={p: jnp.asarray(v) for p, v in z.items()},
                           u={p: jnp.asarray(v) for p, v in u.items()},
                           rho={p: jnp.asarray(v) for p, v in rho.items()})
    return params, state


@given(admm_problems())
@settings(max_examples=40, deadline=None)
def test_penalty_is_half_rho_times_the_squared_distance_summed_over_compressed_leaves(
        problem):
    params, state = problem
    w = {f"{name}/kernel": layer["kernel"] for name, layer in params.items()}
    expected = np_penalty(w, state.z, state.u, state.rho)
    got = float(admm.penalty(jax.tree_util.tree_map(jnp.asarray, params), state))
    # float32 rounding: each residual W - Z + U is off by at most ~2 eps (|W|+|Z|+|U|),
    # the sum by its terms' count times eps.
    scale = np_penalty({p: np.abs(v) for p, v in w.items()},
                       {p: -np.abs(np.asarray(v)) for p, v in state.z.items()},
                       {p: np.abs(np.asarray(v)) for p, v in state.u.items()}, state.rho)
    assert abs(got - expected) <= 1e-5 * expected + 1e-6 * scale, (got, expected)


# -- the penalty in the train step's gradient ---------------------------------------------

class OneDense(nn.Module):
    """Logits x W + b of the flattened pixels: a gradient to write by hand."""
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        return nn.Dense(self.num_classes, name="fc")(x.reshape(x.shape[0], -1))


def make_data(n, seed, shape=(8, 8, 1)):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape)).astype(np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int32)
    return images, labels


def make_state(params, inner, specs, rng, rho, step, key):
    """(tx, state): `inner` under `admm_phase` (Z/U not due in these steps), all masks True
    and an ADMM state far from its init: Z and U drawn at random (nonzero), rho per leaf
    from `rho`."""
    tx = transforms.admm_phase(inner, specs, update_every=10**6, rho=1.0)
    opt_state = tx.init(params)
    st_admm = opt_state.admm.replace(
        z={p: jnp.asarray(rng.normal(size=v.shape), jnp.float32)
           for p, v in opt_state.admm.z.items()},
        u={p: jnp.asarray(rng.normal(size=v.shape), jnp.float32)
           for p, v in opt_state.admm.u.items()},
        rho={p: jnp.asarray(r, jnp.float32) for p, r in zip(opt_state.admm.rho, rho)})
    opt_state = opt_state._replace(admm=st_admm, count=jnp.asarray(step, jnp.int32))
    return tx, TrainState(step=jnp.asarray(step, jnp.int32), params=params, batch_stats={},
                          opt_state=opt_state,
                          masks=jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, bool), params),
                          key=key)


def host64(tree):
    """A float64 numpy copy (taken before the step donates the state's buffers)."""
    return jax.tree_util.tree_map(lambda a: np.array(a, np.float64), tree)


def the_batch(state, images, labels, batch_size):
    """The step's batch, recomputed: batch_indices(fold_in(key, 0), step, n, batch)."""
    idx = np.asarray(batch_indices(jax.random.fold_in(state.key, 0), state.step,
                                   labels.shape[0], batch_size))
    return images[idx], labels[idx]


def check_sgd_update(before, after, data_grad, admm_state, lr, rtol=1e-5):
    """after - before == -lr * (data_grad + rho (W - Z + U)) on the compressed leaves and
    -lr * data_grad on the others, elementwise within float32 rounding: `rtol` of the
    terms summed (of the leaf's largest data gradient, for cancellation in the data
    gradient's own sums) plus the rounding of W + update. Returns the penalty gradients."""
    w, g = admm.leaves_by_path(before), admm.leaves_by_path(data_grad)
    new = admm.leaves_by_path(after)
    pen_grad = {p: np.float64(admm_state.rho[p]) * (
        w[p] - np.asarray(admm_state.z[p], np.float64) + np.asarray(admm_state.u[p], np.float64))
        for p in admm_state.z}
    assert set(pen_grad) < set(w)  # some leaves are not compressed
    for p in w:
        pg = pen_grad.get(p, 0.0)
        expected = -lr * (g[p] + pg)
        delta = np.asarray(new[p], np.float64) - w[p]
        tol = (rtol * lr * (np.abs(g[p]) + np.abs(pg) + np.abs(g[p]).max())
               + EPS32 * np.abs(np.asarray(new[p], np.float64)))
        err = np.abs(delta - expected)
        assert np.all(err <= tol), (p, float((err / (tol + 1e-30)).max()),
                                    float(np.abs(expected).max()))
    return pen_grad


def test_lenet_sgd_step_is_the_data_gradient_plus_rho_times_the_admm_residual():
    """LeNet (two convs, two dense layers; three kernels compressed, fc2 and the biases
    not) and plain SGD, the natural setting: the update against jax.grad of the data loss
    on the step's own batch plus rho (W - Z + U), and the step's metrics."""
    model = get_model("lenet_digits", 10, 1)
    images, labels = make_data(48, seed=0)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    specs = rules_lib.match_rules(params, {"conv*": {"kind": "irregular", "ratio": 0.5},
                                           "fc1": {"kind": "irregular", "ratio": 0.75}})
    assert sorted(specs) == ["conv1/kernel", "conv2/kernel", "fc1/kernel"]
    lr, batch = 0.5, 16
    rng = np.random.default_rng(1)
    tx, state = make_state(params, optax.sgd(lr), specs, rng, rho=(0.3, 1.7, 0.8), step=4,
                           key=jax.random.PRNGKey(3))
    x_u8, y = the_batch(state, images, labels, batch)

    def data_loss(p):
        logits, _ = apply_model(model, p, {}, to_pixels(jnp.asarray(x_u8)), True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()

    ce, data_grad = jax.jit(jax.value_and_grad(data_loss))(params)
    before, data_grad = host64(params), host64(data_grad)
    admm64 = host64(transforms.admm_state(state.opt_state))
    step = make_train_step(model, tx, TrainAttack(None), batch)
    new_state, metrics = step(state, (jnp.asarray(images), jnp.asarray(labels)))

    pen_grad = check_sgd_update(before, new_state.params, data_grad, admm64, lr)
    assert int(new_state.step) == 5
    pen = np_penalty(admm.leaves_by_path(before), admm64.z, admm64.u, admm64.rho)
    np.testing.assert_allclose(float(metrics["admm_penalty"]), pen, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ce"]), float(ce), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(ce) + pen, rtol=1e-5)
    # grad_norm: the loss's gradient, before `admm_phase` adds the penalty's.
    g = admm.leaves_by_path(data_grad)
    assert all(np.abs(pen_grad[p]).max() > 1e-2 for p in pen_grad)
    norm = np.sqrt(sum(np.sum(g[p] ** 2) for p in g))
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)


DENSE_SPECS = {"fc/kernel": {"kind": "irregular", "ratio": 0.5}}


@functools.lru_cache(maxsize=None)
def dense_step(lr, batch):
    """One compiled step per (lr, batch) for all examples: rho, Z, U, W and the data are
    values of the state and arguments, not constants of the program."""
    tx = transforms.admm_phase(optax.sgd(lr), DENSE_SPECS, update_every=10**6, rho=1.0)
    return make_train_step(OneDense(), tx, TrainAttack(None), batch)


@given(seed=st.integers(0, 2 ** 16), rho=st.floats(0.05, 5.0), step=st.integers(0, 20))
@settings(max_examples=12, deadline=None)
def test_one_dense_layer_sgd_step_equals_the_hand_computed_gradient(seed, rho, step):
    """Logits z = x W + b, mean cross-entropy over the batch, W compressed, b not:
    dL/dW = x^T (softmax(z) - onehot(y)) / B + rho (W - Z + U),  dL/db = mean(softmax(z) -
    onehot(y)), written out in float64 numpy."""
    lr, batch, n = 0.25, 8, 40
    train_step = dense_step(lr, batch)
    images, labels = make_data(n, seed)
    rng = np.random.default_rng(seed + 1)
    params = {"fc": {"kernel": jnp.asarray(rng.normal(0, 0.1, (64, 10)), jnp.float32),
                     "bias": jnp.asarray(rng.normal(0, 0.1, 10), jnp.float32)}}
    _, state = make_state(params, optax.sgd(lr), DENSE_SPECS, rng, rho=(rho,), step=step,
                          key=jax.random.PRNGKey(seed))
    x_u8, y = the_batch(state, images, labels, batch)
    before, admm64 = host64(params), host64(transforms.admm_state(state.opt_state))

    x = x_u8.reshape(batch, -1).astype(np.float64) / 255.0
    w, b = before["fc"]["kernel"], before["fc"]["bias"]
    logits = x @ w + b
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    onehot = np.eye(10)[y]
    err = np.exp(logp) - onehot
    ce = -np.mean(np.sum(onehot * logp, 1))
    data_grad = {"fc": {"kernel": x.T @ err / batch, "bias": err.mean(0)}}
    pen_grad = float(admm64.rho["fc/kernel"]) * (
        w - admm64.z["fc/kernel"] + admm64.u["fc/kernel"])
    pen = 0.5 * float(admm64.rho["fc/kernel"]) * np.sum(
        (w - admm64.z["fc/kernel"] + admm64.u["fc/kernel"]) ** 2)

    new_state, metrics = train_step(state, (jnp.asarray(images), jnp.asarray(labels)))

    np.testing.assert_allclose(np.asarray(new_state.params["fc"]["kernel"], np.float64) - w,
                               -lr * (data_grad["fc"]["kernel"] + pen_grad),
                               rtol=1e-5, atol=4 * EPS32)
    np.testing.assert_allclose(np.asarray(new_state.params["fc"]["bias"], np.float64) - b,
                               -lr * data_grad["fc"]["bias"], rtol=1e-5, atol=4 * EPS32)
    check_sgd_update(before, new_state.params, data_grad, admm64, lr)
    np.testing.assert_allclose(float(metrics["ce"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["admm_penalty"]), pen, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), ce + pen, rtol=1e-5)
