"""Square attack: the published schedule, the geometry of its points, its freezing and
acceptance rules, linear models whose optimum is known, the two drivers, and in L2 the
reference's patterns and steps re-derived in numpy."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_admm.attacks import core
from robust_admm.attacks.square import (Square, l2_candidate, l2_pattern, p_selection,
                                        square_sides)


def linear_logits(w, b=None):
    """Logits of a linear model on NHWC input: x.reshape(n, -1) @ w + b."""
    bias = 0.0 if b is None else b
    return lambda x: x.reshape(x.shape[0], -1) @ w + bias


def tanh_model(rng, d, classes=10):
    w = jnp.asarray(rng.normal(size=(d, classes)).astype(np.float32))
    return lambda x: 3 * jnp.tanh(x.reshape(x.shape[0], -1) @ w / math.sqrt(d))


def host_trajectory(attack, fn, x, y, key):
    """States after init and after each step, stepped from the host."""
    step = jax.jit(lambda s: attack.step(fn, s, x, y))
    states = [jax.jit(lambda: attack.init(fn, x, y, key))()]
    for _ in range(attack.num_steps):
        states.append(step(states[-1]))
    return [{k: np.asarray(v) for k, v in s.items() if k != "key"} for s in states]


# Fractions of p_init by iteration index, read off the reference's p_selection.
SCHEDULE = [(0, 1), (10, 1), (11, 1 / 2), (50, 1 / 2), (51, 1 / 4), (200, 1 / 4),
            (201, 1 / 8), (500, 1 / 8), (501, 1 / 16), (1000, 1 / 16), (1001, 1 / 32),
            (2000, 1 / 32), (2001, 1 / 64), (4000, 1 / 64), (4001, 1 / 128),
            (4999, 1 / 128), (6000, 1 / 128), (6001, 1 / 256), (8000, 1 / 256),
            (8001, 1 / 512), (20000, 1 / 512)]


@pytest.mark.parametrize("it,fraction", SCHEDULE)
def test_p_selection_is_the_published_schedule(it, fraction):
    assert p_selection(it, 0.8, 5000, rescale=False) == pytest.approx(0.8 * fraction)


def test_p_selection_rescaled_maps_onto_10000_queries():
    # it -> int(it / n * 10000): with n = 1000, iteration 1 is 10, 2 is 20, 5 is 50.
    assert [p_selection(i, 0.8, 1000, rescale=True) for i in (1, 2, 5, 6, 100, 101)] == \
        pytest.approx([0.8, 0.4, 0.4, 0.2, 0.05, 0.025])


# Sides by interval, by hand: round(sqrt(p * h * w)), half to even, at least 1.
# 32x32: sqrt(819.2) = 28.6, sqrt(409.6) = 20.2, 14.3, 10.1, 7.2, 5.06, 3.58, 2.53
# 28x28: sqrt(627.2) = 25.04, 17.7, 12.5, 8.85, 6.26, 4.43, 3.13, 2.21
@pytest.mark.parametrize("shape,sides", [
    ((32, 32, 3), [29, 20, 14, 10, 7, 5, 4, 3]),
    ((28, 28, 1), [25, 18, 13, 9, 6, 4, 3, 2]),
])
def test_square_sides_follow_the_schedule(shape, sides):
    h, w, c = shape
    table = square_sides(5000, h, w, c, 0.8, False)
    starts = [0, 11, 51, 201, 501, 1001, 2001, 4001]
    ends = [10, 50, 200, 500, 1000, 2000, 4000, 4999]
    assert table.shape == (5000,)
    for start, end, side in zip(starts, ends, sides):
        assert set(table[start:end + 1].tolist()) == {side}


def test_square_sides_are_at_least_one_and_at_most_the_image():
    table = square_sides(10000, 3, 5, 2, 0.8, False)
    assert table.min() == 1 and table.max() == 3  # sqrt(0.8 * 15) = 3.46 -> 3 = min(h, w)


def test_points_stay_in_the_ball_and_the_box_at_vertices():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (8, 6, 6, 3)).astype(np.float32)
    x[:, 0] = 0.02  # near the box: clipped there
    x[:, 1] = 0.97
    fn = tanh_model(rng, 6 * 6 * 3)
    y = np.asarray(fn(jnp.asarray(x)).argmax(-1))
    eps = 0.1
    x_adv = np.asarray(Square(eps, num_steps=60)(fn, jnp.asarray(x), jnp.asarray(y),
                                                  jax.random.PRNGKey(1)))
    d = np.abs(x_adv - x)
    assert d.max() <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    at_vertex = np.abs(d - eps) <= 1e-6
    at_box = (x_adv == 0.0) | (x_adv == 1.0)
    assert np.all(at_vertex | at_box)


def test_one_step_changes_one_square_shared_by_the_batch():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(0.2, 0.8, (16, 8, 8, 2)).astype(np.float32))
    fn = tanh_model(rng, 8 * 8 * 2)
    y = fn(x).argmax(-1)
    attack = Square(0.1, num_steps=600)
    state = attack.init(fn, x, y, jax.random.PRNGKey(2))
    step = jax.jit(lambda s: attack.step(fn, s, x, y))
    sides = square_sides(600, 8, 8, 2)
    accepted = 0
    for i in (0, 30, 100, 300, 599):
        before = dict(state, i=jnp.int32(i))
        after = step(before)
        changed = np.asarray(before["x_best"] != after["x_best"]).any(axis=(0, 3))
        rows, cols = np.nonzero(changed)
        accepted += bool(rows.size)
        if rows.size:  # one window for every example that accepted
            assert rows.max() - rows.min() < sides[i] and cols.max() - cols.min() < sides[i]
            # The reference's corner is drawn from [0, h - s): the last start is never used.
            last = max(8 - sides[i] - 1, 0) + sides[i] - 1
            assert rows.max() <= last and cols.max() <= last
    assert accepted >= 3


def test_fooled_points_are_frozen_and_margins_never_rise():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.uniform(0, 1, (12, 5, 5, 2)).astype(np.float32))
    fn = tanh_model(rng, 5 * 5 * 2)
    y = np.array(fn(x).argmax(-1))
    y[:2] = (y[:2] + 1) % 10  # misclassified at x: not attacked
    y = jnp.asarray(y)
    attack = Square(0.15, num_steps=80)
    states = host_trajectory(attack, fn, x, y, jax.random.PRNGKey(3))
    fooled_during = np.zeros(12, bool)
    for prev, cur in zip(states, states[1:]):
        frozen = prev["margin_min"] <= 0
        for name in ("x_best", "margin_min", "loss_min", "queries"):
            np.testing.assert_array_equal(cur[name][frozen], prev[name][frozen])
        assert np.all(cur["margin_min"] <= prev["margin_min"])
        fooled_during |= (cur["margin_min"] <= 0) & ~frozen
    assert fooled_during.any()  # the check above saw points become fooled
    last = states[-1]
    np.testing.assert_array_equal(last["x_best"][:2], np.asarray(x[:2]))
    np.testing.assert_array_equal(last["queries"][:2], 0)
    # margin_min is the margin of x_best; a robust point spent every query.
    margin = -np.asarray(core.margin_loss(fn(jnp.asarray(last["x_best"])), y))
    np.testing.assert_allclose(margin, last["margin_min"], atol=1e-5)
    robust = last["margin_min"] > 0
    np.testing.assert_array_equal(last["queries"][robust], attack.num_steps + 1)


def test_linear_model_reaches_its_optimum_vertex():
    """2 classes, bias so large that nothing fools: the search minimises the linear margin
    pixel by pixel and ends at x - eps * sign(w_y - w_other) (no clipping: x inside
    [eps, 1 - eps]). The last row and column get zero weight: the reference's corner never
    reaches them with 1-pixel squares."""
    rng = np.random.default_rng(3)
    h, w_, c = 6, 6, 2
    x = rng.uniform(0.3, 0.7, (4, h, w_, c)).astype(np.float32)
    w = rng.normal(size=(h, w_, c, 2)).astype(np.float32)
    w[-1], w[:, -1] = 0.0, 0.0
    w = w.reshape(-1, 2)
    b = np.array([100.0, 0.0], np.float32)
    y = np.zeros(4, np.int32)
    eps = 0.2
    fn = linear_logits(jnp.asarray(w), jnp.asarray(b))
    x_adv = np.asarray(Square(eps, num_steps=800, rescale_schedule=True)(
        fn, jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(4)))
    d = (w[:, 0] - w[:, 1]).reshape(h, w_, c)
    optimum = x - eps * np.sign(d)
    np.testing.assert_allclose(x_adv[:, :-1, :-1], optimum[:, :-1, :-1], atol=1e-6)


def test_linear_model_is_fooled_where_its_worst_case_fools():
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 1, (8, 6, 6, 1)).astype(np.float32)
    w = rng.normal(size=(36, 2)).astype(np.float32)
    fn = linear_logits(jnp.asarray(w))
    y = np.asarray(fn(jnp.asarray(x)).argmax(-1))
    eps = 0.3
    d = (w[:, 1 - y] - w[:, y]).T.reshape(x.shape)  # gradient of the wrong-minus-true margin
    worst = np.where(d > 0, np.minimum(x + eps, 1), np.maximum(x - eps, 0))
    assert np.all(np.asarray(fn(jnp.asarray(worst)).argmax(-1)) != y)
    x_adv = Square(eps, num_steps=300)(fn, jnp.asarray(x), jnp.asarray(y),
                                        jax.random.PRNGKey(5))
    assert np.all(np.asarray(fn(x_adv).argmax(-1)) != y)


def test_fori_and_host_drivers_agree():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.uniform(0, 1, (6, 5, 5, 3)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(75, 10)).astype(np.float32))
    apply = lambda m, xx: 3 * jnp.tanh(xx.reshape(xx.shape[0], -1) @ m / 8.0)
    y = apply(w, x).argmax(-1)
    attack = Square(0.05, num_steps=40, restarts=2)
    key = jax.random.PRNGKey(6)
    a = core.run(attack, lambda xx: apply(w, xx), x, y, key)
    b = core.HostRunner(attack, apply)(w, x, y, key)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_typed_and_raw_keys_give_the_same_attack():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.uniform(0, 1, (3, 4, 4, 1)).astype(np.float32))
    fn = tanh_model(rng, 16)
    y = fn(x).argmax(-1)
    attack = Square(0.1, num_steps=5)
    raw = attack(fn, x, y, jax.random.PRNGKey(7))
    typed = attack(fn, x, y, jax.random.wrap_key_data(jax.random.PRNGKey(7)))
    np.testing.assert_array_equal(np.asarray(raw), np.asarray(typed))


def test_epsilon_zero_is_the_identity():
    x = jnp.full((2, 3, 3, 1), 0.5)
    attack = Square(0.0, num_steps=3)
    assert attack.is_identity and not Square(0.1, num_steps=0).is_identity
    out = attack(linear_logits(jnp.ones((9, 2))), x, jnp.zeros(2, jnp.int32),
                 jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


# ----------------------------------------------------------------------------- L2

def reference_eta_rectangles(x, y):
    """numpy port of the reference's `eta_rectangles` (L2), its loop as written."""
    delta = np.zeros((x, y))
    x_c, y_c = x // 2 + 1, y // 2 + 1
    c0, c1 = x_c - 1, y_c - 1
    for counter in range(max(x_c, y_c)):
        delta[max(c0, 0):min(c0 + 2 * counter + 1, x),
              max(0, c1):min(c1 + 2 * counter + 1, y)] += 1.0 / (counter + 1) ** 2
        c0, c1 = c0 - 1, c1 - 1
    norm = np.sqrt((delta ** 2).sum())
    return delta / norm if norm > 0 else delta


def reference_eta(s, transpose):
    delta = np.zeros((s, s))
    delta[:s // 2] = reference_eta_rectangles(s // 2, s)
    delta[s // 2:] = -1.0 * reference_eta_rectangles(s - s // 2, s)
    delta /= np.sqrt((delta ** 2).sum())
    return delta.T if transpose else delta


@pytest.mark.parametrize("transpose", [False, True])
def test_l2_patterns_are_the_references_placed_on_the_canvas(transpose):
    for side in range(1, 30):
        expected = reference_eta(side, transpose)
        got = np.asarray(l2_pattern(side, transpose, side, side))
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=f"side {side}")
        placed = np.asarray(l2_pattern(jnp.int32(side), jnp.bool_(transpose), 34, 31, 2, 1))
        canvas = np.zeros((34, 31))
        canvas[2:2 + side, 1:1 + side] = expected
        np.testing.assert_allclose(placed, canvas, atol=1e-6, err_msg=f"side {side}")


def test_l2_sides_are_odd_and_at_least_three():
    table = square_sides(5000, 28, 28, 1, 0.8, False, "l2")
    # sqrt(0.8 * 784) = 25.04 -> 25; later halvings 17.7 -> 18 -> 19, ..., 1.6 -> 2 -> 3.
    assert table[0] == 25 and table[11] == 19 and table.min() == 3
    assert all(v % 2 == 1 for v in set(table.tolist()))
    assert square_sides(10, 2, 2, 1, 0.8, False, "l2").max() == 2  # capped by the image


def test_one_l2_step_is_the_references_update():
    """The step's candidate against a numpy re-derivation of the reference's L2 update
    with the same windows, transpose and signs (read back from the candidate's draws)."""
    rng = np.random.default_rng(8)
    b, h, w, c, eps, side = 4, 9, 9, 2, 0.7, 5
    x = rng.uniform(0.1, 0.9, (b, h, w, c)).astype(np.float32)
    best = np.clip(x + rng.normal(size=x.shape).astype(np.float32) * 0.05, 0, 1)
    key = jax.random.PRNGKey(9)
    got = np.asarray(l2_candidate(key, side, jnp.asarray(x), jnp.asarray(best), eps))
    k1, k2, k3, k4, k5, k6 = jax.random.split(key, 6)
    corner = lambda k, size: int(jax.random.randint(k, (), 0, max(size - side, 1)))
    t1, l1, t2, l2 = corner(k1, h), corner(k2, w), corner(k3, h), corner(k4, w)
    transpose = bool(jax.random.bernoulli(k5, 0.5))
    signs = np.asarray(jax.random.rademacher(k6, (b, 1, 1, c), jnp.float32))
    # The reference, NCHW loops written out in NHWC.
    delta = (best - x).astype(np.float64)
    win = lambda v, t, l: v[:, t:t + side, l:l + side, :]
    norm_w1 = np.sqrt((win(delta, t1, l1) ** 2).sum(axis=(1, 2), keepdims=True))
    mask = np.zeros((h, w), bool)
    mask[t1:t1 + side, l1:l1 + side] = mask[t2:t2 + side, l2:l2 + side] = True
    norm_windows = np.sqrt(((delta * mask[None, :, :, None]) ** 2).sum(axis=(1, 2),
                                                                       keepdims=True))
    norm_image = np.sqrt((delta ** 2).sum(axis=(1, 2, 3), keepdims=True))
    new = reference_eta(side, transpose)[None, :, :, None] * signs
    new = new + win(delta, t1, l1) / (1e-12 + norm_w1)
    new = new / (1e-12 + np.sqrt((new ** 2).sum(axis=(1, 2), keepdims=True))) * np.sqrt(
        np.maximum(eps ** 2 - norm_image ** 2, 0) / c + norm_windows ** 2)
    delta[:, t2:t2 + side, l2:l2 + side, :] = 0
    delta[:, t1:t1 + side, l1:l1 + side, :] = new
    norm = np.sqrt((delta ** 2).sum(axis=(1, 2, 3), keepdims=True))
    expected = np.clip(x + eps * delta / (norm + 1e-12), 0, 1)
    np.testing.assert_allclose(got, expected, atol=2e-6)


def test_l2_points_stay_in_the_ball_and_the_box_and_margins_never_rise():
    rng = np.random.default_rng(10)
    x = jnp.asarray(rng.uniform(0, 1, (10, 10, 10, 1)).astype(np.float32))
    fn = tanh_model(rng, 100)
    y = np.array(fn(x).argmax(-1))
    y[:1] = (y[:1] + 1) % 10  # misclassified at x: not attacked
    y = jnp.asarray(y)
    eps = 1.0
    attack = Square(eps, num_steps=60, norm="l2")
    states = host_trajectory(attack, fn, x, y, jax.random.PRNGKey(11))
    for prev, cur in zip(states, states[1:]):
        frozen = prev["margin_min"] <= 0
        np.testing.assert_array_equal(cur["x_best"][frozen], prev["x_best"][frozen])
        assert np.all(cur["margin_min"] <= prev["margin_min"])
    for st in states:
        d = (st["x_best"] - np.asarray(x)).reshape(10, -1)
        assert np.linalg.norm(d, axis=1).max() <= eps * (1 + 1e-5)
        assert st["x_best"].min() >= 0 and st["x_best"].max() <= 1
    np.testing.assert_array_equal(states[-1]["x_best"][0], np.asarray(x[0]))
    # The start spends the budget: far from the box the perturbation has norm eps.
    start = np.linalg.norm((states[0]["x_best"] - np.asarray(x)).reshape(10, -1), axis=1)
    assert (start[1:] > 0.8 * eps).all()
    assert states[-1]["margin_min"].min() < states[0]["margin_min"][1:].min()


@pytest.mark.parametrize("bad", [dict(epsilon=-0.1), dict(epsilon=0.1, num_steps=-1),
                                 dict(epsilon=0.1, restarts=0), dict(epsilon=0.1, p_init=0.0),
                                 dict(epsilon=0.1, loss="dlr"), dict(epsilon=0.1, norm="l1")])
def test_square_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        Square(**bad)
