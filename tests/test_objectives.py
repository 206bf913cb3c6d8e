"""Training objectives against float64 re-derivations written from the papers' formulas
(and the constants of the authors' code)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from robust_admm.attacks import core
from robust_admm.training import objectives


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _case(seed=0, n=7, k=5):
    rng = np.random.default_rng(seed)
    clean = rng.normal(size=(n, k)) * 3
    adv = clean + rng.normal(size=(n, k)) * 2
    y = rng.integers(0, k, n)
    y[0] = clean[0].argmax()  # a point whose strongest adversarial class is its label
    adv[0, y[0]] += 10.0
    return clean, adv, y


def _ref(clean, adv, y, beta):
    """Per the papers: TRADES = CE(clean) + beta KL(p_c || p_a); MART = CE(adv)
    - log(1.0001 - max_{k != y} p_a,k + 1e-12) + beta KL(p_c || p_a + 1e-12) (1.0000001 - p_c,y)."""
    n = len(y)
    pc, pa = _softmax(clean), _softmax(adv)
    ce_c = -np.log(pc[np.arange(n), y])
    ce_a = -np.log(pa[np.arange(n), y])
    kl = (pc * (np.log(pc) - np.log(pa))).sum(1)
    trades = ce_c.mean() + beta * kl.mean()
    wrong = pa.copy()
    wrong[np.arange(n), y] = -1
    p_wrong = wrong.max(1)
    kl_mart = (pc * (np.log(pc) - np.log(pa + 1e-12))).sum(1)
    mart = (ce_a - np.log(1.0001 - p_wrong + 1e-12)).mean() + \
        beta * (kl_mart * (1.0000001 - pc[np.arange(n), y])).mean()
    return {"trades": trades, "mart": mart, "pgd_at": ce_a.mean(), "natural": ce_c.mean()}


@pytest.mark.parametrize("name", objectives.OBJECTIVES)
@pytest.mark.parametrize("beta", [1.0, 6.0])
def test_objectives_match_their_formulas(name, beta):
    clean, adv, y = _case()
    got = objectives.get(name).batch_loss(jnp.asarray(clean, jnp.float32),
                                          jnp.asarray(adv, jnp.float32), jnp.asarray(y),
                                          beta=beta)
    np.testing.assert_allclose(float(got), _ref(clean, adv, y, beta)[name], rtol=2e-5)


def test_the_hand_computed_two_class_case():
    """Clean logits (0, 0), adversarial (0, ln 3), label 0: p_c = (1/2, 1/2),
    p_a = (1/4, 3/4); KL = 1/2 ln 2 + 1/2 ln(2/3); TRADES = ln 2 + beta KL."""
    clean = jnp.asarray([[0.0, 0.0]])
    adv = jnp.asarray([[0.0, np.log(3.0)]])
    y = jnp.asarray([0])
    kl = 0.5 * np.log(2.0) + 0.5 * np.log(2.0 / 3.0)
    np.testing.assert_allclose(float(objectives.trades(clean, adv, y, beta=6.0)),
                               np.log(2.0) + 6.0 * kl, rtol=1e-6)
    mart = np.log(4.0) - np.log(1.0001 - 0.75 + 1e-12) + \
        6.0 * (0.5 * np.log(0.5 / (0.25 + 1e-12)) + 0.5 * np.log(0.5 / (0.75 + 1e-12))) * \
        (1.0000001 - 0.5)
    np.testing.assert_allclose(float(objectives.mart(clean, adv, y, beta=6.0)), mart, rtol=1e-6)


def test_attack_losses_and_their_gradients():
    clean, adv, y = (jnp.asarray(a) for a in _case(1))
    clean, adv = clean.astype(jnp.float32), adv.astype(jnp.float32)
    # TRADES's inner loss is 0 at the clean point and holds the clean prediction fixed.
    np.testing.assert_allclose(objectives.kl_attack_loss(clean, y, clean), 0.0, atol=1e-6)
    g_clean = jax.grad(lambda c: objectives.kl_attack_loss(adv, y, c).sum())(clean)
    assert not np.asarray(g_clean).any()
    # PGD-AT's and MART's attacks ascend the configured loss; TRADES's starts near x.
    from robust_admm.training.attack import make_attack
    cfg = dict(epsilon=0.1, step_size=0.05, num_steps=2, random_start=True, loss="ce", unroll=1)
    for name in ("pgd_at", "mart"):
        pgd = make_attack(ml_collections.ConfigDict(cfg), "adversarial", 0, name).attack
        assert (pgd.loss, pgd.start_std) == ("ce", 0.0)
        np.testing.assert_allclose(
            core.loss_fn(pgd.loss)(adv, y),
            -np.log(_softmax(np.asarray(adv, np.float64))[np.arange(7), np.asarray(y)]),
            rtol=1e-5, atol=1e-6)
    trades = make_attack(ml_collections.ConfigDict(cfg), "adversarial", 0, "trades").attack
    assert (trades.loss, trades.start_std) == (objectives.kl_attack_loss, 0.001)
    assert objectives.get("natural").attack_loss is None
    with pytest.raises(ValueError, match="objective='fgsm_at' is not known; allowed: "
                                         "pgd_at, trades, mart, natural"):
        objectives.get("fgsm_at")


def test_the_trades_attack_ascends_the_kl_to_the_clean_prediction():
    from robust_admm import attacks
    from robust_admm.models import get_model
    model = get_model("lenet_digits", 10, 2)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    fn = lambda xa: model.apply({"params": params}, xa)
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (16, 8, 8, 1)), jnp.float32)
    y = jnp.zeros(16, jnp.int32)
    kl = lambda xa: np.asarray(objectives.kl_clean_adv(fn(x), fn(xa)))
    pgd = attacks.Pgd(0.2, 0.05, 10, loss=objectives.kl_attack_loss, start_std=0.001)
    s0 = pgd.init(fn, x, y, jax.random.PRNGKey(1))
    start = np.asarray(s0["x_adv"])
    assert 0 < np.abs(start - np.asarray(x)).max() < 0.01  # x + 0.001 N(0, 1)
    x_adv = np.asarray(attacks.run(pgd, fn, x, y, jax.random.PRNGKey(1)))
    assert np.abs(x_adv - np.asarray(x)).max() <= 0.2 + 1e-6
    assert (kl(jnp.asarray(x_adv)) > 10 * kl(jnp.asarray(start)) + 1e-6).all()
    with pytest.raises(ValueError, match="start_std=-0.1"):
        attacks.Pgd(0.2, 0.05, 10, start_std=-0.1)
