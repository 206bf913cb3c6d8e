"""PGD against analytic cases: linear models, whose worst case in a box is known."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_admm import attacks


def linear_logits(w):
    """Logits of a linear model on NHWC input: x.reshape(n, -1) @ w."""
    return lambda x: x.reshape(x.shape[0], -1) @ w


def worst_case_binary(x, w, y, eps):
    """Analytic maximiser of the CE loss of a 2-class linear model over the L-inf ball
    intersected with [0, 1]: push each pixel to the box end along sign(w_other - w_true)."""
    d = (w[:, 1 - y] - w[:, y]).reshape(x.shape)
    target = np.where(d > 0, np.minimum(x + eps, 1.0), np.maximum(x - eps, 0.0))
    return np.where(d == 0, x, target)


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_pgd_reaches_the_analytic_worst_case_of_a_linear_model(loss):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (4, 3, 3, 1)).astype(np.float32)
    w = rng.normal(size=(9, 2)).astype(np.float32)
    y = np.array([0, 1, 0, 1], np.int32)
    eps = 0.2
    # 10 steps of 0.05 cross the whole ball (2 * eps = 0.4), whatever the random start.
    x_adv = attacks.pgd(linear_logits(jnp.asarray(w)), jnp.asarray(x), jnp.asarray(y),
                        jax.random.PRNGKey(0), epsilon=eps, step_size=0.05, num_steps=10,
                        loss=loss)
    for i in range(4):
        np.testing.assert_allclose(np.asarray(x_adv[i]), worst_case_binary(x[i], w, y[i], eps),
                                   atol=1e-6)


def test_fgsm_is_one_signed_step_clipped_to_the_box():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (3, 2, 2, 1)).astype(np.float32)
    w = rng.normal(size=(4, 2)).astype(np.float32)
    y = np.array([1, 0, 1], np.int32)
    x_adv = attacks.fgsm(linear_logits(jnp.asarray(w)), jnp.asarray(x), jnp.asarray(y),
                         epsilon=0.1)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(x_adv[i]), worst_case_binary(x[i], w, y[i], 0.1),
                                   atol=1e-6)


def test_pgd_stays_in_the_ball_and_the_pixel_range_and_blocks_gradients():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.uniform(0, 1, (8, 5, 5, 1)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(25, 10)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, 8).astype(np.int32))
    fn = lambda x: jnp.tanh(linear_logits(w)(x)) * 3
    x_adv = attacks.pgd(fn, x, y, jax.random.PRNGKey(3), epsilon=0.3, step_size=0.07,
                        num_steps=7)
    assert float(jnp.abs(x_adv - x).max()) <= 0.3 + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    g = jax.grad(lambda xx: attacks.pgd(fn, xx, y, jax.random.PRNGKey(3), epsilon=0.3,
                                        step_size=0.07, num_steps=3).sum())(x)
    assert float(jnp.abs(g).max()) == 0.0


def test_pgd_unroll_does_not_change_the_result():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.uniform(0, 1, (4, 4, 4, 1)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(16, 10)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, 4).astype(np.int32))
    fn = lambda x: jnp.sin(linear_logits(w)(x))
    kw = dict(epsilon=0.3, step_size=0.05, num_steps=5)
    a = attacks.pgd(fn, x, y, jax.random.PRNGKey(0), unroll=1, **kw)
    b = attacks.pgd(fn, x, y, jax.random.PRNGKey(0), unroll=5, **kw)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_pgd_restarts_keep_a_fooling_start():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.uniform(0, 1, (16, 3, 3, 1)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(9, 10)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, 16).astype(np.int32))
    fn = linear_logits(w)
    kw = dict(epsilon=0.3, step_size=0.1, num_steps=2)
    one = attacks.pgd(fn, x, y, jax.random.PRNGKey(0), **kw)  # = the first restart
    many = attacks.pgd_restarts(fn, x, y, jax.random.PRNGKey(0), restarts=4, **kw)
    fooled_one = np.asarray(fn(one).argmax(-1) != y)
    fooled_many = np.asarray(fn(many).argmax(-1) != y)
    assert np.all(fooled_many >= fooled_one)  # restarts never lose a success


@pytest.mark.parametrize("bad", [dict(epsilon=-0.1), dict(num_steps=-1), dict(loss="hinge")])
def test_pgd_rejects_bad_arguments(bad):
    kw = dict(epsilon=0.1, step_size=0.01, num_steps=1, loss="ce") | bad
    with pytest.raises(ValueError, match="|".join(bad)):
        attacks.pgd(lambda x: x.reshape(1, -1), jnp.zeros((1, 2, 2, 1)), jnp.zeros(1, jnp.int32),
                    jax.random.PRNGKey(0), **kw)
