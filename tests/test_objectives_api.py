"""The public loss functions (`robust_admm.pgd_at`, `trades`, `mart`, `natural`) against a
float64 numpy re-derivation written from the papers and the authors' code (TRADES:
Zhang et al.'s `trades_loss`; MART: Wang et al.'s `mart_loss`, its argsort for the
strongest wrong class), over random shapes and values; their reductions; that they are
the train step's own functions; and the named errors of bad input."""
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import robust_admm
from robust_admm.training import objectives


def _log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _reference(name, clean, adv, y, beta, eps):
    """Per-example float64 loss. CE against 1 - eps on the label, eps / (k - 1) elsewhere;
    TRADES: CE(clean) + beta sum_k p_c log(p_c / p_a); MART: CE(adv) - log(1.0001 -
    p_a[second of argsort unless the top is not y] + 1e-12) + beta sum_k p_c log(p_c /
    (p_a + 1e-12)) (1.0000001 - p_c[y])."""
    n, k = adv.shape
    rows = np.arange(n)
    targets = np.full((n, k), eps / (k - 1))
    targets[rows, y] = 1 - eps
    lc, la = _log_softmax(clean), _log_softmax(adv)
    pc, pa = np.exp(lc), np.exp(la)
    if name == "natural":
        return -(targets * lc).sum(1)
    if name == "pgd_at":
        return -(targets * la).sum(1)
    if name == "trades":
        return -(targets * lc).sum(1) + beta * (pc * (lc - la)).sum(1)
    top2 = np.argsort(pa, axis=1)[:, -2:]
    new_y = np.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    boosted = -(targets * la).sum(1) - np.log(1.0001 - pa[rows, new_y] + 1e-12)
    kl = (np.where(pc > 0, pc * np.log(np.where(pc > 0, pc, 1.0)), 0.0)
          - pc * np.log(pa + 1e-12)).sum(1)
    return boosted + beta * kl * (1.0000001 - pc[rows, y])


def _call(name, clean, adv, y, beta, **kw):
    fn = getattr(robust_admm, name)
    extra = {"beta": beta} if name in ("trades", "mart") else {}
    return fn(jnp.asarray(clean, jnp.float32), jnp.asarray(adv, jnp.float32),
              jnp.asarray(y), **extra, **kw)


# A few shapes (each compiles its ops once), any values in a range where float32's
# softmax keeps MART's margin term (log(1.0001 - p)) within the tolerance.
_shapes = st.sampled_from([(1, 2), (6, 10)])


@settings(max_examples=12, deadline=None)
@given(_shapes.flatmap(lambda s: st.tuples(
    hnp.arrays(np.float32, s, elements=st.floats(-6, 6, width=32)),
    hnp.arrays(np.float32, s, elements=st.floats(-6, 6, width=32)),
    hnp.arrays(np.int64, s[:1], elements=st.integers(0, s[1] - 1)),
    hnp.arrays(np.bool_, s[:1]))),
    st.sampled_from(objectives.OBJECTIVES), st.floats(0, 8), st.sampled_from([0.0, 0.1]))
def test_each_loss_matches_its_float64_formula(case, name, beta, eps):
    clean, adv, y, where = case
    want = _reference(name, clean.astype(np.float64), adv.astype(np.float64), y, beta, eps)
    per_example = _call(name, clean, adv, y, beta, label_smoothing=eps, reduction="none")
    assert per_example.shape == y.shape and per_example.dtype == jnp.float32
    np.testing.assert_allclose(per_example, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_call(name, clean, adv, y, beta, label_smoothing=eps),
                               want.mean(), rtol=1e-4, atol=1e-4)
    # `where`: the mean over the marked examples (0 for none); 'none' zeroes the others.
    masked = _call(name, clean, adv, y, beta, label_smoothing=eps, where=jnp.asarray(where))
    np.testing.assert_allclose(masked, want[where].mean() if where.any() else 0.0,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        _call(name, clean, adv, y, beta, label_smoothing=eps, reduction="none",
              where=jnp.asarray(where)), np.where(where, want, 0.0), rtol=1e-4, atol=1e-4)


def test_the_hand_computed_two_class_case():
    """Clean logits (0, 0), adversarial (0, ln 3), label 0: p_c = (1/2, 1/2), p_a =
    (1/4, 3/4); CE(clean) = ln 2, CE(adv) = ln 4, KL = 1/2 ln 2 + 1/2 ln(2/3)."""
    clean, adv, y = jnp.zeros((1, 2)), jnp.asarray([[0.0, np.log(3.0)]]), jnp.asarray([0])
    kl = 0.5 * np.log(2.0) + 0.5 * np.log(2.0 / 3.0)
    np.testing.assert_allclose(robust_admm.natural(clean, None, y), np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(robust_admm.pgd_at(None, adv, y), np.log(4.0), rtol=1e-6)
    np.testing.assert_allclose(robust_admm.trades(clean, adv, y, beta=2.0),
                               np.log(2.0) + 2.0 * kl, rtol=1e-6)
    np.testing.assert_allclose(robust_admm.trades(clean, adv, y, beta=0.0), np.log(2.0),
                               rtol=1e-6)


def test_they_are_the_train_steps_functions_and_run_under_jit():
    """One code path: the step's objective table holds the public functions; under jit
    (labels traced, their range not checked) they give the same value."""
    for name in objectives.OBJECTIVES:
        assert getattr(robust_admm, name) is objectives.get(name).loss
        assert getattr(robust_admm.objectives, name) is objectives.get(name).loss
    rng = np.random.default_rng(0)
    clean, adv = rng.normal(size=(6, 10)), rng.normal(size=(6, 10))
    y = np.asarray([0, 9, 1, 2, 5, 5])
    jitted = jax.jit(lambda c, a, t: robust_admm.trades(c, a, t, beta=3.0))(
        jnp.asarray(clean, jnp.float32), jnp.asarray(adv, jnp.float32), jnp.asarray(y))
    np.testing.assert_allclose(jitted, _reference("trades", clean, adv, y, 3.0, 0.0).mean(),
                               rtol=1e-5)


@pytest.mark.parametrize("call,error,message", [
    (lambda c, a, y: robust_admm.trades(c, a, y.at[1].set(3)), ValueError,
     r"labels hold values in \[0, 3\]; allowed: 0 <= label < 3"),
    (lambda c, a, y: robust_admm.pgd_at(None, a, y.at[0].set(-1)), ValueError,
     r"labels hold values in \[-1, 2\]"),
    (lambda c, a, y: robust_admm.mart(c, a[:, :2], y), ValueError,
     r"clean_logits have shape \(4, 3\) and adv_logits \(4, 2\); allowed: the same"),
    (lambda c, a, y: robust_admm.trades(c, a, y[:3]), ValueError,
     r"labels have shape \(3,\) and dtype int32; allowed: integer class indices of shape "
     r"\(4,\)"),
    (lambda c, a, y: robust_admm.natural(c, None, y.astype(jnp.float32)), ValueError,
     r"labels have shape \(4,\) and dtype float32"),
    (lambda c, a, y: robust_admm.pgd_at(None, a[0], y), ValueError,
     r"adv_logits have shape \(3,\); allowed: \(batch, classes\) with classes >= 2"),
    (lambda c, a, y: robust_admm.natural(c.astype(jnp.int32), None, y), TypeError,
     r"clean_logits have dtype int32; allowed: a floating dtype"),
    (lambda c, a, y: robust_admm.trades(c, None, y), TypeError,
     r"adv_logits=None; allowed: float logits \(batch, classes\), which trades reads"),
    (lambda c, a, y: robust_admm.trades(c, a, y, beta=-1.0), ValueError,
     r"beta=-1.0; allowed: a finite number >= 0"),
    (lambda c, a, y: robust_admm.mart(c, a, y, label_smoothing=1.0), ValueError,
     r"label_smoothing=1.0; allowed: 0 <= it < 1"),
    (lambda c, a, y: robust_admm.pgd_at(c, a, y, reduction="sum"), ValueError,
     r"reduction='sum'; allowed: mean, none"),
    (lambda c, a, y: robust_admm.pgd_at(c, a, y, where=jnp.ones(3, bool)), ValueError,
     r"where has shape \(3,\) and dtype bool; allowed: a mask of shape \(4,\)"),
    (lambda c, a, y: robust_admm.pgd_at(c, a, y, where=jnp.full(4, 0.5)), ValueError,
     r"where holds \[0.5\]; allowed: a mask"),
])
def test_bad_input_is_a_named_error(call, error, message):
    rng = np.random.default_rng(1)
    clean, adv = (jnp.asarray(rng.normal(size=(4, 3)), jnp.float32) for _ in range(2))
    with pytest.raises(error, match=message):
        call(clean, adv, jnp.asarray([0, 2, 1, 2], jnp.int32))
