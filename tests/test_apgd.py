"""The attack protocol, PGD pinned to its plain definition, and APGD against its paper."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from robust_admm import attacks
from robust_admm.attacks import core
from robust_admm.models import get_model


def _small_model(seed=0):
    model = get_model("lenet_digits", 10, 2)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8, 8, 1)))["params"]
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(0, 1, (12, 8, 8, 1)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, 12).astype(np.int32))
    apply = lambda p, xa: model.apply({"params": p}, xa)
    return apply, params, x, y


def _plain_pgd(logits_fn, x, y, key, eps, step, steps, restarts, loss):
    """PGD as defined before the protocol: start uniform(fold_in(key, r)) * eps, signed
    steps on the summed loss, clip to the ball then [0, 1]; the first fooling restart."""
    lossf = {"ce": lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, y).sum(),
             "margin": lambda lg: attacks.margin_loss(lg, y).sum()}[loss]
    clip = lambda xa: jnp.clip(jnp.clip(xa, x - eps, x + eps), 0.0, 1.0)
    best = None
    for r in range(restarts):
        xa = clip(x + jax.random.uniform(jax.random.fold_in(key, r), x.shape, x.dtype,
                                         -1.0, 1.0) * eps)
        for _ in range(steps):
            xa = clip(xa + step * jnp.sign(jax.grad(lambda z: lossf(logits_fn(z)))(xa)))
        if best is None:
            best = xa
        else:
            fooled = logits_fn(best).argmax(-1) != y
            best = jnp.where(fooled[:, None, None, None], best, xa)
    return best


@pytest.mark.parametrize("loss,restarts", [("ce", 1), ("margin", 3)])
def test_pgd_on_the_protocol_equals_its_plain_definition_in_both_loop_forms(loss, restarts):
    apply, params, x, y = _small_model()
    fn = functools.partial(apply, params)
    key = jax.random.PRNGKey(5)
    kw = dict(epsilon=0.3, step_size=0.05, num_steps=6, loss=loss, restarts=restarts)
    want = jax.jit(lambda x, y: _plain_pgd(fn, x, y, key, 0.3, 0.05, 6, restarts, loss))(x, y)
    fori = jax.jit(lambda x, y: attacks.Pgd(**kw)(fn, x, y, key))(x, y)
    host = attacks.HostRunner(attacks.Pgd(**kw), apply)(params, x, y, key)
    np.testing.assert_array_equal(np.asarray(fori), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(host), np.asarray(want))


def test_apgd_checkpoints_are_the_published_fractions():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); a checkpoint
    # after iteration ceil(p_j * N) (1-based), for N = 100.
    p, iters = [0.0, 0.22], []
    while p[-1] <= 1.0:
        iters.append(int(np.ceil(round(p[-1] * 100, 6))) - 1)
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    is_check, window = attacks.checkpoint_schedule(100)
    assert list(np.flatnonzero(is_check)) == iters == [21, 40, 56, 69, 79, 86, 92, 98]
    assert list(window[is_check]) == [22, 19, 16, 13, 10, 7, 6, 6]


def _linear_two_class(seed, n=6, d=9):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.2, 0.8, (n, 3, 3, 1)).astype(np.float32)
    w = rng.normal(size=(d, 2)).astype(np.float32)
    y = rng.integers(0, 2, n).astype(np.int32)
    return x, w, y


def _analytic_worst(x, w, y, eps):
    """Maximiser of any loss increasing in z_other - z_true over the ball and the box."""
    d = (w[:, 1 - y] - w[:, y]).T.reshape(x.shape)
    return np.clip(x + eps * np.sign(d), 0.0, 1.0)


def _run_states(attack, fn, x, y, key, restart=0):
    """Every state of one run: [init, after step 1, ...]."""
    s = attack.init(fn, x, y, key, restart)
    states = [s]
    step = jax.jit(lambda s: attack.step(fn, s, x, y))
    for _ in range(attack.num_steps):
        s = step(s)
        states.append(s)
    return states


def test_apgd_and_pgd_reach_the_analytic_worst_case_of_a_linear_model():
    x, w, y = _linear_two_class(0)
    eps = 0.1
    fn = lambda xa: xa.reshape(xa.shape[0], -1) @ jnp.asarray(w)
    want = _analytic_worst(x, w, y, eps)
    apgd = attacks.ApgdCe(epsilon=eps, num_steps=20)
    best = _run_states(apgd, fn, jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0))[-1]
    np.testing.assert_allclose(np.asarray(best["x_best"]), want, atol=1e-6)
    got = attacks.pgd(fn, jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0), epsilon=eps,
                      step_size=0.025, num_steps=10)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    # Both fool exactly the points whose worst case is misclassified.
    fooled_want = np.asarray(fn(want).argmax(-1) != y)
    for a in (apgd, attacks.ApgdT(epsilon=eps, num_steps=20, n_target_classes=1, restarts=1)):
        x_adv = attacks.run(a, fn, jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(1))
        np.testing.assert_array_equal(np.asarray(fn(x_adv).argmax(-1) != y), fooled_want)
    assert 0 < fooled_want.sum() < len(y)


def test_apgd_halves_the_step_and_restarts_from_the_best_point_at_checkpoints():
    apply, params, x, y = _small_model(1)
    fn = functools.partial(apply, params)
    attack = attacks.ApgdCe(epsilon=0.2, num_steps=20)
    states = _run_states(attack, fn, x, y, jax.random.PRNGKey(2))
    is_check, _ = attacks.checkpoint_schedule(20)
    eps = 0.2
    for i, s in enumerate(states[1:]):
        before = states[i]
        ratio = np.asarray(s["step_size"] / before["step_size"])
        assert set(np.unique(ratio)) <= ({1.0, 0.5} if is_check[i] else {1.0})
        halved = ratio == 0.5
        np.testing.assert_array_equal(np.asarray(s["x_adv"])[halved],
                                      np.asarray(s["x_best"])[halved])
        # Best loss never falls; every iterate stays in the ball and the box.
        assert np.all(np.asarray(s["loss_best"]) >= np.asarray(before["loss_best"]))
        assert float(jnp.abs(s["x_adv"] - x).max()) <= eps + 1e-6
        assert float(s["x_adv"].min()) >= 0 and float(s["x_adv"].max()) <= 1
    assert np.all(np.asarray(states[0]["step_size"]) == np.float32(2 * eps))


def test_apgd_keeps_its_best_point_more_steps_and_restarts_never_raise_robust_accuracy():
    apply, params, x, y = _small_model(2)
    fn = functools.partial(apply, params)
    attack = attacks.ApgdCe(epsilon=0.05, num_steps=15)
    prev = None
    for s in _run_states(attack, fn, x, y, jax.random.PRNGKey(3)):
        fooled = np.asarray(core.misclassified(fn, attack.finish(fn, s, x, y), y))
        assert prev is None or np.all(fooled >= prev)
        prev = fooled
    counts = []
    for r in (1, 2, 4):
        a = attacks.ApgdCe(epsilon=0.05, num_steps=15, restarts=r)
        x_adv = attacks.run(a, fn, x, y, jax.random.PRNGKey(3))
        counts.append(int(core.misclassified(fn, x_adv, y).sum()))
    assert counts == sorted(counts)


def test_apgd_t_targets_the_ranked_clean_classes_and_runs_alike_in_both_forms():
    apply, params, x, y = _small_model(3)
    fn = functools.partial(apply, params)
    attack = attacks.ApgdT(epsilon=0.05, num_steps=8, n_target_classes=3, restarts=3)
    order = np.argsort(np.asarray(fn(x)), axis=1)
    for r in range(3):
        np.testing.assert_array_equal(np.asarray(attack.target(fn, x, y, r)),
                                      order[:, -(r + 2)])
    key = jax.random.PRNGKey(4)
    fori = jax.jit(lambda x, y: attacks.run(attack, fn, x, y, key))(x, y)
    host = attacks.HostRunner(attack, apply)(params, x, y, key)
    np.testing.assert_allclose(np.asarray(fori), np.asarray(host), atol=1e-6)


def test_dlr_losses_match_their_formulas():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 10)).astype(np.float32)
    y = rng.integers(0, 10, 5)
    t = (y + 3) % 10
    s = np.sort(z, axis=1)
    other = np.array([s[i, -2] if z[i].argmax() == y[i] else s[i, -1] for i in range(5)])
    zy, zt = z[np.arange(5), y], z[np.arange(5), t]
    np.testing.assert_allclose(attacks.dlr_loss(jnp.asarray(z), jnp.asarray(y)),
                               -(zy - other) / (s[:, -1] - s[:, -3] + 1e-12), rtol=1e-6)
    np.testing.assert_allclose(
        attacks.dlr_targeted_loss(jnp.asarray(z), jnp.asarray(y), jnp.asarray(t)),
        -(zy - zt) / (s[:, -1] - 0.5 * (s[:, -3] + s[:, -4]) + 1e-12), rtol=1e-6)


@pytest.mark.parametrize("bad", [dict(epsilon=-0.1), dict(num_steps=-1), dict(restarts=0)])
def test_apgd_rejects_bad_arguments(bad):
    with pytest.raises(ValueError, match="|".join(bad)):
        attacks.ApgdCe(**(dict(epsilon=0.1) | bad))
    with pytest.raises(ValueError, match="n_target_classes=4.*restarts=9"):
        attacks.ApgdT(epsilon=0.1, n_target_classes=4)


@pytest.mark.parametrize("attack", [
    attacks.Pgd(epsilon=0.1, step_size=0.05, num_steps=60, norm="l2"),
    attacks.ApgdCe(epsilon=0.1, num_steps=100, norm="l2")])
def test_l2_attacks_reach_the_analytic_worst_case_of_a_linear_model(attack):
    """Two classes, x inside the box by more than eps: the worst L2 perturbation is
    eps * d / ||d||, d = w_other - w_true (every loss here increases in z_other - z_true)."""
    x, w, y = _linear_two_class(1, n=8)
    eps = attack.epsilon
    fn = lambda xa: xa.reshape(xa.shape[0], -1) @ jnp.asarray(w)
    d = (w[:, 1 - y] - w[:, y]).T.reshape(x.shape)
    want = x + eps * d / np.linalg.norm(d.reshape(len(x), -1), axis=1)[:, None, None, None]
    margin = lambda xa: np.asarray(attacks.margin_loss(fn(jnp.asarray(xa)), jnp.asarray(y)))
    state = attack.init(fn, jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0))
    state = attacks.run_steps(attack, fn, state, jnp.asarray(x), jnp.asarray(y))
    got = np.asarray(state["x_best"] if "x_best" in state else state["x_adv"])
    delta = (got - x).reshape(len(x), -1)
    assert (np.linalg.norm(delta, axis=1) <= eps * (1 + 1e-5)).all()
    np.testing.assert_allclose(margin(got), margin(want), atol=2e-4 * eps)
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_l2_attacks_stay_in_the_ball_and_the_box_and_fool_more_with_more_budget():
    apply, params, x, y = _small_model(3)
    fn = functools.partial(apply, params)
    key = jax.random.PRNGKey(2)
    scales = (0.25, 1.0, 4.0)  # epsilon 1 times these (`scale` is traced: one compile)
    fooled = np.zeros((len(scales), len(y)), bool)
    for attack in (attacks.Pgd(1.0, 2.5 / 20, 20, norm="l2"),
                   attacks.ApgdCe(epsilon=1.0, num_steps=30, norm="l2"),
                   attacks.ApgdT(epsilon=1.0, num_steps=30, n_target_classes=3, restarts=3,
                                 norm="l2")):
        run = jax.jit(lambda scale, a=attack: attacks.run(a, fn, x, y, key, scale))
        for i, scale in enumerate(scales):
            x_adv = np.asarray(run(scale))
            norms = np.linalg.norm((x_adv - np.asarray(x)).reshape(len(y), -1), axis=1)
            assert (norms <= scale * (1 + 1e-5)).all() and (x_adv >= 0).all() \
                and (x_adv <= 1).all()
            fooled[i] |= np.asarray(fn(jnp.asarray(x_adv)).argmax(-1)) != np.asarray(y)
    robust = (~fooled).sum(axis=1)
    assert robust[0] >= robust[1] >= robust[2] and robust[0] > robust[2]


def test_l2_has_every_attack_and_bad_norms_are_named():
    from robust_admm.attacks import suite
    assert suite.make("apgd-t", 0.5, norm="l2").norm == "l2"
    assert suite.make("fab-t", 0.5, norm="l2").norm == "l2"
    assert suite.make("square", 0.5, norm="l2").norm == "l2"
    with pytest.raises(ValueError, match="norm='l1' is not allowed; allowed: linf, l2"):
        suite.make("pgd10", 0.5, norm="l1")
    with pytest.raises(ValueError, match="norm='L2' is not allowed"):
        attacks.ApgdCe(epsilon=0.5, norm="L2")
