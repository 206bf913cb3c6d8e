"""FAB-T against analytic cases (linear models, whose minimal L-inf and L2 adversarials are
known), its hyperplane projections against a linear program and float64 re-derivations,
and its two drivers against each other."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_admm.attacks import core
from hypothesis import example, given, settings
from hypothesis import strategies as st

from robust_admm.attacks.fab import FabT, projection_l2, projection_linf


def linear_logits(w, bias):
    """Logits of a linear model on NHWC input: x.reshape(n, -1) @ w + bias."""
    return lambda x: x.reshape(x.shape[0], -1) @ w + bias


def mlp_logits(params, x):
    """A 2-layer tanh MLP on NHWC input."""
    w1, b1, w2, b2 = params
    return jnp.tanh(x.reshape(x.shape[0], -1) @ w1 + b1) @ w2 + b2


def random_mlp(rng, dim, hidden=16, classes=10):
    return tuple(jnp.asarray(a, jnp.float32) for a in (
        rng.normal(size=(dim, hidden)) * 2 / np.sqrt(dim), rng.normal(size=hidden) * 0.1,
        rng.normal(size=(hidden, classes)), rng.normal(size=classes) * 0.1))


def binary_linear_case(rng, distances, dim=16, norm="linf"):
    """A 2-class linear model and points near the middle of the box whose minimal
    distance to the boundary is `distances`: |margin| / ||w_t - w_y||_1 in L-inf,
    |margin| / ||w_t - w_y||_2 in L2, as the box does not bind (every coordinate stays over
    0.2 from the faces)."""
    n = len(distances)
    w = rng.normal(size=(dim, 2))
    bias = -0.5 * w.sum(0)                        # logits 0 at the centre of the box
    y = rng.integers(0, 2, n)
    x = 0.5 + rng.uniform(-0.1, 0.1, (n, dim))
    v = (w[:, y] - w[:, 1 - y]).T                 # (n, dim): w_y - w_t per point
    margin = (v * x).sum(1) + bias[y] - bias[1 - y]
    # Move each point along sign(v) (L2: v) to set its margin to distance * ||v||_1 (_2).
    direction = np.sign(v) if norm == "linf" else v / np.linalg.norm(v, axis=1)[:, None]
    dual = (direction * v).sum(1)  # ||v||_1 or ||v||_2
    x = x + ((np.asarray(distances) * dual - margin) / dual)[:, None] * direction
    # The minimal adversarial x + distance * direction, and the way to it, stay in [0.2, 0.8].
    assert (np.abs(x - 0.5) + np.asarray(distances)[:, None] * np.abs(direction) < 0.3).all()
    as32 = lambda a: jnp.asarray(a, jnp.float32)
    return as32(w), as32(bias), as32(x.reshape(n, 4, dim // 4, 1)), jnp.asarray(y, jnp.int32)


def ray_overshoot(attack):
    """FAB's closest fooling iterate on a linear model, in units of the minimal distance,
    when the box does not bind: every iterate stays on the ray from x through the minimal
    adversarial (its projection steps are along it), at c times the distance, so the
    steps reduce to this scalar recurrence (the reference's, with d1 = 1 - c, d2 = 1)."""
    c, best = 0.0, np.inf
    for _ in range(attack.num_steps):
        alpha = min(max((1 - c) / ((1 - c) + 1), 0.0), attack.alpha_max)
        c = (c + attack.eta * (1 - c)) * (1 - alpha) + attack.eta * alpha
        if c > 1:
            best, c = min(best, c), attack.beta * c
    return best


def test_fab_t_finds_the_analytic_minimal_perturbation_of_a_linear_model():
    rng = np.random.default_rng(0)
    eps = 0.05
    distances = np.array([0.01, 0.02, 0.03, 0.04, 0.045, 0.055, 0.07, 0.1])
    w, bias, x, y = binary_linear_case(rng, distances)
    fn = linear_logits(w, bias)
    assert bool((fn(x).argmax(-1) == y).all())
    attack = FabT(eps, num_steps=100, n_target_classes=1, restarts=1)
    # The raw minimal norms of one run (no epsilon cut).
    state = attack.init(fn, x, y, jax.random.PRNGKey(0))
    state = jax.jit(lambda s: core.run_steps(attack, fn, s, x, y))(state)
    found = np.asarray(state["norm_best"])
    # FAB overshoots by eta and pulls back by beta, so on a linear model its iterates
    # cycle just outside the boundary: the closest lies 0.5% beyond the minimum.
    assert (found >= distances * (1 - 1e-5)).all() and (found <= distances * 1.006).all()
    np.testing.assert_allclose(found, distances * ray_overshoot(attack), rtol=1e-4)
    x_adv = np.asarray(core.run(attack, fn, x, y, jax.random.PRNGKey(0)))
    # Within epsilon: adversarial at the found norm; beyond: x itself, not adversarial.
    fooled = np.asarray(fn(jnp.asarray(x_adv)).argmax(-1) != y)
    norms = np.abs(x_adv - np.asarray(x)).reshape(len(distances), -1).max(1)
    inside = distances <= eps
    assert fooled[inside].all() and not fooled[~inside].any()
    np.testing.assert_allclose(norms[inside], found[inside])
    assert (norms[~inside] == 0).all()


def test_fab_t_stays_in_the_ball_and_the_box_and_keeps_misclassified_points():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(0, 1, (16, 3, 3, 2)), jnp.float32)
    x = x.at[:4].set(jnp.round(x[:4]))  # pixels on the box faces
    params = random_mlp(rng, 18)
    fn = lambda xx: mlp_logits(params, xx)
    clean = fn(x).argmax(-1)
    y = clean.at[:3].set((clean[:3] + 1) % 10)  # three points misclassified at x
    eps = 0.03
    attack = FabT(eps, num_steps=20, n_target_classes=3, restarts=6)  # later 3 random starts
    x_adv = core.run(attack, fn, x, y, jax.random.PRNGKey(2))
    assert float(jnp.abs(x_adv - x).max()) <= eps
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    np.testing.assert_array_equal(np.asarray(x_adv[:3]), np.asarray(x[:3]))
    fooled = np.asarray(fn(x_adv).argmax(-1) != y)
    moved = np.asarray(jnp.abs(x_adv - x).reshape(16, -1).max(1) > 0)
    np.testing.assert_array_equal(moved, fooled & (np.arange(16) >= 3))
    assert fooled[3:].any() and not fooled[3:].all()  # a test that can fail both ways


def independent_projection(t, w, b):
    """float64 re-derivation: the step -s_i * sign(w_i) * min(lam, p_i) towards the
    hyperplane (s the side of t), lam found by bisection on the monotone w.d(lam); the
    full step to the box where the hyperplane is out of reach."""
    side = 1.0 if w @ t - b >= 0 else -1.0
    ws = w * side
    p = np.where(ws > 0, t, 1 - t)
    direction = -np.sign(ws)
    reach = lambda lam: ws @ (direction * np.minimum(lam, p))
    need = side * b - ws @ t                      # <= 0
    if reach(p.max()) >= need:                    # out of reach (or exactly at the corner)
        return direction * p
    lo, hi = 0.0, p.max()
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if reach(mid) > need else (lo, mid)
    return direction * np.minimum(hi, p)


def linprog_linf(t, w, b):
    """min lam s.t. |d_i| <= lam, w.(t + d) = b, 0 <= t + d <= 1 (scipy's HiGHS)."""
    from scipy.optimize import linprog
    dim = len(t)
    cost = np.r_[np.zeros(dim), 1.0]
    a_ub = np.block([[np.eye(dim), -np.ones((dim, 1))], [-np.eye(dim), -np.ones((dim, 1))]])
    res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(2 * dim), A_eq=np.r_[w, 0.0][None],
                  b_eq=[b - w @ t], bounds=[(-ti, 1 - ti) for ti in t] + [(0, None)],
                  method="highs")
    return res.x[-1] if res.status == 0 else None


def projection_cases(rng, n=48, dim=13):
    """Random hyperplanes at random offsets: near (the box does not bind), mid (some
    coordinates capped), far (out of reach), with some zero weights and box-face points."""
    t = rng.uniform(0, 1, (n, dim))
    t[::5, :3] = np.round(t[::5, :3])
    w = rng.normal(size=(n, dim))
    w[::3, 4:6] = 0.0
    reach = np.abs(w).sum(1) * rng.choice([0.02, 0.3, 0.6, 1.5], n)
    b = (w * t).sum(1) + rng.choice([-1.0, 1.0], n) * reach * rng.uniform(0.05, 0.6, n)
    return t, w, b


def test_projection_linf_matches_a_linear_program_and_a_float64_rederivation():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(3)
    t, w, b = projection_cases(rng)
    d = np.asarray(projection_linf(*(jnp.asarray(a, jnp.float32) for a in (t, w, b))),
                   np.float64)
    kinds = set()
    for i in range(len(t)):
        expected = independent_projection(t[i], w[i], b[i])
        np.testing.assert_allclose(d[i], expected, atol=2e-5, err_msg=f"row {i}")
        lam = linprog_linf(t[i], w[i], b[i])
        if lam is None:  # out of reach: the full step to the nearest box corner
            kinds.add("far")
            continue
        capped = np.abs(d[i]) < np.abs(d[i]).max() - 1e-6
        kinds.add("capped" if capped[w[i] != 0].any() else "near")
        assert abs(np.abs(d[i]).max() - lam) <= 2e-5 * max(1.0, lam), f"row {i}"
        assert abs(w[i] @ (t[i] + d[i]) - b[i]) <= 1e-4 * np.abs(w[i]).sum(), f"row {i}"
        assert (t[i] + d[i] >= -1e-6).all() and (t[i] + d[i] <= 1 + 1e-6).all()
    assert kinds == {"near", "capped", "far"}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dim=st.integers(2, 64),
       depth=st.floats(0.05, 0.98), zeros=st.floats(0.0, 0.5))
def test_projection_linf_solves_deep_in_the_box_like_a_float64_rederivation(seed, dim, depth,
                                                                            zeros):
    """Hyperplanes whose projection caps a `depth` share of the reach (up to nearly all
    of it: many pieces before the root, so several Newton steps), with zero weights and
    pixels on the faces, against the float64 bisection."""
    rng = np.random.default_rng(seed)
    n = 8
    t = rng.uniform(0, 1, (n, dim))
    t[rng.uniform(size=(n, dim)) < zeros] = rng.integers(0, 2)
    w = rng.normal(size=(n, dim)) * rng.uniform(0.1, 3.0, (n, 1))
    w[rng.uniform(size=(n, dim)) < zeros / 2] = 0.0
    side = rng.choice([-1.0, 1.0], n)
    # The largest step the box allows towards each side, times `depth`.
    p_down = np.where(w > 0, t, 1 - t)
    reach = (np.abs(w) * p_down).sum(1)
    b = (w * t).sum(1) - side * depth * reach
    as32 = lambda a: jnp.asarray(a, jnp.float32)
    # Padded to 64 columns of zero weight (coordinates that never move): one shape, one
    # compilation for every example.
    pad = lambda a, v: np.pad(a, ((0, 0), (0, 64 - dim)), constant_values=v)
    d = np.asarray(projection_linf(as32(pad(t, 0.5)), as32(pad(w, 0.0)), as32(b)),
                   np.float64)
    np.testing.assert_array_equal(d[:, dim:], 0.0)
    d = d[:, :dim]
    for i in range(n):
        t32, w32, b32 = (np.asarray(as32(a), np.float64) for a in (t[i], w[i], b[i]))
        expected = independent_projection(t32, w32, b32)
        np.testing.assert_allclose(d[i], expected, atol=3e-5, err_msg=f"row {i}")


def test_fori_and_host_drivers_agree():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.uniform(0, 1, (8, 3, 3, 2)), jnp.float32)
    params = random_mlp(rng, 18)
    y = mlp_logits(params, x).argmax(-1)
    attack = FabT(0.15, num_steps=12, n_target_classes=2, restarts=4)  # 2 random starts
    key = jax.random.PRNGKey(5)
    fori = core.run(attack, lambda xx: mlp_logits(params, xx), x, y, key)
    host = core.HostRunner(attack, mlp_logits)(params, x, y, key)
    np.testing.assert_allclose(np.asarray(fori), np.asarray(host), atol=1e-6)
    assert bool((fori != x).any())


def test_fab_t_is_a_hashable_frozen_attack_with_checked_arguments():
    with pytest.raises(ValueError, match="norm"):
        FabT(0.1, norm="l1")
    attack = FabT(0.03)
    assert (attack.num_steps, attack.n_target_classes, attack.restarts) == (100, 9, 9)
    assert (attack.alpha_max, attack.eta, attack.beta) == (0.1, 1.05, 0.9)
    hash(attack)
    with pytest.raises(dataclasses.FrozenInstanceError):
        attack.epsilon = 0.1
    assert FabT(0.0).is_identity and FabT(0.1, num_steps=0).is_identity
    with pytest.raises(ValueError):
        FabT(0.1, n_target_classes=3, restarts=4)
    with pytest.raises(ValueError):
        FabT(-0.1)


def test_fab_t_l2_finds_the_analytic_minimal_perturbation_of_a_linear_model():
    rng = np.random.default_rng(6)
    eps = 0.1
    distances = np.array([0.02, 0.05, 0.08, 0.095, 0.105, 0.12, 0.15])
    w, bias, x, y = binary_linear_case(rng, distances, norm="l2")
    fn = linear_logits(w, bias)
    assert bool((fn(x).argmax(-1) == y).all())
    attack = FabT(eps, num_steps=100, n_target_classes=1, restarts=1, norm="l2")
    state = attack.init(fn, x, y, jax.random.PRNGKey(0))
    state = jax.jit(lambda s: core.run_steps(attack, fn, s, x, y))(state)
    # The iterates stay on the ray from x along v (the L2 projection onto the boundary
    # of a linear model), so the closest one overshoots as in L-inf.
    np.testing.assert_allclose(np.asarray(state["norm_best"]),
                               distances * ray_overshoot(attack), rtol=1e-4)
    x_adv = np.asarray(core.run(attack, fn, x, y, jax.random.PRNGKey(0)))
    fooled = np.asarray(fn(jnp.asarray(x_adv)).argmax(-1) != y)
    norms = np.linalg.norm((x_adv - np.asarray(x)).reshape(len(distances), -1), axis=1)
    inside = distances * ray_overshoot(attack) <= eps
    assert fooled[inside].all() and not fooled[~inside].any() and inside.any()
    assert (norms[inside] <= eps * (1 + 1e-6)).all() and (norms[~inside] == 0).all()


def independent_projection_l2(t, w, b):
    """float64 re-derivation: d(alpha) = clip(-alpha w, -t, 1 - t) on the side of t
    (coordinates with |w_i| < 1e-8 fixed), alpha found by bisection on the monotone
    w.d(alpha); the full step to the box where the hyperplane is out of reach."""
    side = 1.0 if w @ t - b >= 0 else -1.0
    ws = np.where(np.abs(w) >= 1e-8, w * side, 0.0)
    need = side * b - ws @ t                      # w.d must reach this (<= 0)
    step = lambda alpha: np.clip(-alpha * ws, -t, 1 - t)
    full = np.where(ws > 0, -t, np.where(ws < 0, 1 - t, 0.0))
    if ws @ full > need:                          # out of reach
        return full
    lo, hi = 0.0, 1.0
    while ws @ step(hi) > need:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ws @ step(mid) > need else (lo, mid)
    return step(hi)


def test_projection_l2_matches_a_float64_rederivation_and_is_the_closest_point():
    rng = np.random.default_rng(7)
    t, w, b = projection_cases(rng)
    w[::7, 7] = 1e-9  # a weight under the threshold: that coordinate never moves
    d = np.asarray(projection_l2(*(jnp.asarray(a, jnp.float32) for a in (t, w, b))),
                   np.float64)
    kinds = set()
    for i in range(len(t)):
        expected = independent_projection_l2(t[i], w[i], b[i])
        np.testing.assert_allclose(d[i], expected, atol=2e-5, err_msg=f"row {i}")
        assert (t[i] + d[i] >= -1e-6).all() and (t[i] + d[i] <= 1 + 1e-6).all()
        if abs(w[i] @ (t[i] + d[i]) - b[i]) > 1e-4 * np.abs(w[i]).sum():
            kinds.add("far")
            continue
        kinds.add("capped" if np.isclose(np.abs(d[i]), np.where(
            d[i] < 0, t[i], 1 - t[i])).any() and np.abs(d[i]).max() > 0 else "near")
        # No other point of the hyperplane in the box is closer: moving along any
        # feasible direction within the plane (w.u = 0) and the box does not shorten d.
        for _ in range(20):
            u = rng.normal(size=t.shape[1])
            u -= (u @ w[i]) / (w[i] @ w[i]) * w[i]
            for step in (1e-3, 1e-2):
                e = d[i] + step * u
                if (t[i] + e >= 0).all() and (t[i] + e <= 1).all():
                    assert np.linalg.norm(e) >= np.linalg.norm(d[i]) - 1e-6
    assert kinds == {"near", "capped", "far"}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**31 - 1), st.sampled_from([0.01, 0.3, 0.9, 2.0]))
# Found by a random run: row 0 is the box corner farthest from a hyperplane that touches
# the box at the opposite corner (reach 2.0); the step was ~0 instead of that corner.
@example(dim=7, seed=8456, reach=2.0)
def test_projection_l2_on_random_small_problems(dim, seed, reach):
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 1, (3, dim))
    t[0] = np.round(t[0])  # on the box's faces
    w = rng.normal(size=(3, dim)) * rng.choice([0.0, 1.0], (3, dim), p=[0.2, 0.8])
    b = (w * t).sum(1) + rng.choice([-1.0, 1.0], 3) * reach * np.abs(w).sum(1) / 2
    # In float64, so that the check is of the algorithm: in float32, an ill-conditioned row
    # (CI's case dim 6, seed 106006, reach 0.3) lost 6.3e-5 to rounding (the fixed cases
    # above check float32 at 2e-5).
    with jax.enable_x64(True):
        d = np.asarray(projection_l2(*(jnp.asarray(a, jnp.float64) for a in (t, w, b))))
    assert d.dtype == np.float64
    for i in range(3):
        np.testing.assert_allclose(d[i], independent_projection_l2(t[i], w[i], b[i]),
                                   atol=1e-9)
