"""`models.cpu_forms.with_cpu_forms`: a user's model with its convolutions and tiling
max-pools in the zoo's CPU forms. The max-pools against the primitives they replace, bit
for bit in value and gradient (ties included: reduce_window gives the first maximal entry
the gradient, reduce_max shares it); the convolutions against XLA's own to float
rounding; what the rewrite leaves alone; the AutoAttack API with and without it."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import robust_admm
from helpers import primitives
from robust_admm.models import get_model
from robust_admm.models.cpu_forms import with_cpu_forms


def tied(rng, shape):
    """Small integers, half of them clipped to 0: most windows hold ties."""
    return jnp.asarray(np.maximum(rng.integers(-3, 4, shape), 0).astype(np.float32))


def same_value_and_gradient(f, x, rng):
    """Values and input gradients of f and with_cpu_forms(f) equal bit for bit, both run
    op by op and both compiled (compiled, XLA may round a division differently from op by
    op: the two are compared under the same mode)."""
    g = with_cpu_forms(f)
    out = f(x)
    cotangent = jnp.asarray(rng.normal(size=out.shape).astype(np.float32))
    vjp = lambda fn: (lambda c: jax.vjp(fn, x)[1](c)[0])
    np.testing.assert_array_equal(np.asarray(g(x)), np.asarray(out))
    np.testing.assert_array_equal(np.asarray(jax.jit(g)(x)), np.asarray(jax.jit(f)(x)))
    np.testing.assert_array_equal(np.asarray(vjp(g)(cotangent)), np.asarray(vjp(f)(cotangent)))
    np.testing.assert_array_equal(np.asarray(jax.jit(vjp(g))(cotangent)),
                                  np.asarray(jax.jit(vjp(f))(cotangent)))


@settings(max_examples=25, deadline=None)
@given(k=st.sampled_from([2, 3, 4]), n=st.integers(1, 3), hk=st.integers(1, 3),
       wk=st.integers(1, 3), c=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_a_tiling_max_pool_is_reduce_windows_value_and_gradient_bit_for_bit(k, n, hk, wk, c,
                                                                            seed):
    """`reduce_window` max (what nnx/linen max_pool bind) with window = stride: the
    gradient goes to the first maximal entry of each window, as the primitive's own."""
    rng = np.random.default_rng(seed)
    x = tied(rng, (n, hk * k, wk * k, c))
    f = lambda v: nnx.max_pool(v, (k, k), (k, k))
    assert "reduce_window_max" not in primitives(with_cpu_forms(f), x)
    same_value_and_gradient(f, x, rng)


@settings(max_examples=25, deadline=None)
@given(k=st.sampled_from([2, 3]), n=st.integers(1, 3), hk=st.integers(1, 3),
       wk=st.integers(1, 3), c=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_a_max_over_small_axes_is_reduce_maxs_value_and_gradient_bit_for_bit(k, n, hk, wk, c,
                                                                             seed):
    """A max-pool written as a reshape and `max`: the gradient shared among ties as
    `reduce_max`'s own rule shares it (g / count on each)."""
    rng = np.random.default_rng(seed)
    x = tied(rng, (n, hk * k, wk * k, c))
    f = lambda v: jax.nn.relu(v).reshape(n, hk, k, wk, k, c).max(axis=(2, 4))
    assert "reduce_max" not in primitives(with_cpu_forms(f), x)
    same_value_and_gradient(f, x, rng)


def test_what_the_rewrite_leaves_alone_stays_the_primitive():
    """Overlapping or padded windows, windows of more than 16 entries, large reductions
    and max-pools inside control flow keep their primitives; results unchanged."""
    rng = np.random.default_rng(0)
    x = tied(rng, (2, 10, 10, 3))
    overlapping = lambda v: nnx.max_pool(v, (3, 3), (2, 2), padding="SAME")
    wide = lambda v: nnx.max_pool(v, (5, 5), (5, 5))  # 25 entries a window
    large = lambda v: v.reshape(2, -1).max(axis=1)  # 300 entries per output
    for f, kept in ((overlapping, "reduce_window_max"), (wide, "reduce_window_max"),
                    (large, "reduce_max")):
        assert kept in primitives(with_cpu_forms(f), x)
        same_value_and_gradient(f, x, rng)
    pool = lambda v: nnx.max_pool(v, (2, 2), (2, 2))
    in_cond = lambda v: (lax.cond(v.sum() > 0, pool, lambda u: 2 * pool(u), v)
                         + v.reshape(2, 5, 2, 5, 2, 3).max(axis=(2, 4)))
    names = primitives(with_cpu_forms(in_cond), x)
    assert "cond" in names and "reduce_window_max" in names  # inside the cond: kept
    assert "reduce_max" not in names  # outside: rewritten
    same_value_and_gradient(in_cond, x, rng)


class NarrowNet(nnx.Module):
    """A user's NNX model: a 1 -> 8 stem (the zoo's 'rows' form on CPU), an 8 -> 16 conv
    (native), max-pools, a dense head; one conv inside a jitted helper."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 8, (5, 5), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (5, 5), padding="SAME", rngs=rngs)
        self.head = nnx.Linear(7 * 7 * 16, 10, rngs=rngs)

    def __call__(self, x):
        stem = jax.jit(lambda v, k: lax.conv_general_dilated(
            v, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
        x = stem(x, self.conv1.kernel[...]) + self.conv1.bias[...]
        x = nnx.max_pool(nnx.relu(x), (2, 2), (2, 2))
        x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
        return self.head(x.reshape(x.shape[0], -1))


def test_a_users_convolutions_agree_with_xlas_to_rounding_and_take_the_zoos_forms():
    net = NarrowNet(nnx.Rngs(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 28, 28, 1))
    graph, state = nnx.split(net)
    f = lambda s, v: nnx.merge(graph, s)(v)
    g = with_cpu_forms(f)
    assert primitives(f, state, x).count("conv_general_dilated") == 2
    rewritten = primitives(g, state, x)
    if jax.default_backend() == "cpu":  # the stem leaves the primitive; conv2 stays native
        assert rewritten.count("conv_general_dilated") == 1
    assert "reduce_window_max" not in rewritten
    want, got = np.asarray(f(state, x), np.float64), np.asarray(g(state, x), np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    loss = lambda fn: jax.grad(lambda v: fn(state, v)[:, 3].sum())(x)
    gw, gg = np.asarray(loss(f)), np.asarray(loss(g))
    np.testing.assert_allclose(gg, gw, rtol=0, atol=1e-5 * np.abs(gw).max())


def test_pytrees_in_and_out_pass_through():
    f = lambda tree: {"y": tree["a"] * 2, "z": (tree["b"].reshape(2, 2).max(axis=1),)}
    tree = {"a": jnp.ones(3), "b": jnp.arange(4.0)}
    out = with_cpu_forms(f)(tree)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(f(tree))
    np.testing.assert_array_equal(out["z"][0], [1.0, 3.0])


def test_the_api_attacks_a_zoo_model_the_same_with_and_without_the_rewrite():
    """The zoo's layers already take these forms: the rewrite changes nothing there, bit
    for bit (a few APGD-T steps on a LeNet at random weights)."""
    model = get_model("lenet_digits", 10, 1)
    x = jax.random.uniform(jax.random.PRNGKey(0), (8, 8, 8, 1))
    params = model.init(jax.random.PRNGKey(1), x)["params"]
    y = np.asarray(model.apply({"params": params}, x).argmax(-1))
    fn = functools.partial(model.apply, {"params": params})
    run = lambda forms: robust_admm.attack("apgd-t", fn, x, y, epsilon=0.3, num_steps=4,
                                           restarts=2, n_target_classes=2, cpu_forms=forms)
    a, b = run(True), run(False)
    np.testing.assert_array_equal(a.adversarial, b.adversarial)
    assert (a.adversarial != np.asarray(x)).any()


def test_the_api_on_a_users_model_with_and_without_the_rewrite():
    """On a user's NNX model the rewrite only rounds the convolutions differently: FGSM's
    images (a sign of the gradient) agree except where a gradient entry is ~0."""
    net = NarrowNet(nnx.Rngs(0))
    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (16, 28, 28, 1)))
    y = np.asarray(net(x).argmax(-1))
    a = robust_admm.attack("fgsm", net, x, y, epsilon=0.1, cpu_forms=True)
    b = robust_admm.attack("fgsm", net, x, y, epsilon=0.1, cpu_forms=False)
    assert np.mean(a.adversarial == b.adversarial) > 0.99
    with pytest.raises(TypeError, match="cpu_forms='yes'; allowed: True or False"):
        robust_admm.attack("fgsm", net, x, y, epsilon=0.1, cpu_forms="yes")



def test_off_the_cpu_the_function_is_left_as_it_is(monkeypatch):
    """The forms are tuned for XLA:CPU: under another default backend nothing is
    rewritten (the trace is the function's own)."""
    x = jnp.ones((2, 4, 4, 3))
    f = lambda v: nnx.max_pool(v, (2, 2), (2, 2))
    assert "reduce_window_max" not in primitives(with_cpu_forms(f), x)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "reduce_window_max" in primitives(with_cpu_forms(f), x)
