"""Label smoothing and mixup (Ye et al.'s `smooth_eps` and `alpha`) in every objective and
in the train step, against float64 numpy re-derivations and hypothesis properties."""
import functools
import json
import os

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import run_cli, write_idx
from robust_admm import attacks
from robust_admm.data.batching import batch_indices
from robust_admm.models import apply_model, get_model
from robust_admm.runtime.logs import read_jsonl
from robust_admm.training import augment, objectives
from robust_admm.training.attack import TrainAttack, make_attack
from robust_admm.training.state import TrainState
from robust_admm.training.step import make_train_step

BETA = 6.0


def _log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _targets(y, k, eps):
    """Ye et al.'s smoothed one-hot: 1 - eps on the label, eps / (k - 1) elsewhere."""
    t = np.full((len(y), k), eps / (k - 1))
    t[np.arange(len(y)), y] = 1 - eps
    return t


def _ref(name, clean, adv, y, eps):
    """Each objective in float64 with every CE term against the smoothed targets; the KL
    terms and MART's margin and weight on the hard label."""
    n, k = clean.shape
    t = _targets(y, k, eps)
    lc, la = _log_softmax(clean), _log_softmax(adv)
    pc, pa = np.exp(lc), np.exp(la)
    ce_c, ce_a = -(t * lc).sum(1), -(t * la).sum(1)
    if name == "natural":
        return ce_c.mean()
    if name == "pgd_at":
        return ce_a.mean()
    if name == "trades":
        return ce_c.mean() + BETA * (pc * (lc - la)).sum(1).mean()
    wrong = pa.copy()
    wrong[np.arange(n), y] = -1
    kl = (pc * (lc - np.log(pa + 1e-12))).sum(1)
    return ((ce_a - np.log(1.0001 - wrong.max(1) + 1e-12)).mean()
            + BETA * (kl * (1.0000001 - pc[np.arange(n), y])).mean())


def _case():
    """3 examples, 4 classes."""
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(3, 4)) * 2
    adv = clean + rng.normal(size=(3, 4))
    return clean, adv, np.array([2, 0, 3])


def _loss(name, clean, adv, y, eps):
    return objectives.get(name).batch_loss(jnp.asarray(clean, jnp.float32),
                                           jnp.asarray(adv, jnp.float32), jnp.asarray(y),
                                           beta=BETA, label_smoothing=eps)


def test_smoothed_targets_are_the_originals_not_optax():
    """Two classes, logits (0, ln 3), label 0, eps 0.1: targets (0.9, 0.1), p = (1/4, 3/4),
    CE = -(0.9 ln 1/4 + 0.1 ln 3/4); with four classes the off-label share is eps / 3."""
    got = objectives.ce(jnp.asarray([[0.0, np.log(3.0)]]), jnp.asarray([0]), 0.1)
    np.testing.assert_allclose(float(got[0]), -(0.9 * np.log(0.25) + 0.1 * np.log(0.75)),
                               rtol=1e-6)
    t = np.asarray(objectives.smoothed_targets(jnp.asarray([1]), 4, 0.3))
    np.testing.assert_allclose(t, [[0.1, 0.7, 0.1, 0.1]], rtol=1e-6)
    with pytest.raises(ValueError, match="at least 2 classes; got 1"):
        objectives.smoothed_targets(jnp.asarray([0]), 1, 0.1)


@pytest.mark.parametrize("name", objectives.OBJECTIVES)
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_each_objective_with_label_smoothing_matches_float64(name, eps):
    clean, adv, y = _case()
    np.testing.assert_allclose(float(_loss(name, clean, adv, y, eps)),
                               _ref(name, clean, adv, y, eps), rtol=2e-6)


@pytest.mark.parametrize("name", objectives.OBJECTIVES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_each_objective_under_mixup_matches_float64(name, eps):
    """lam 0.3 and the permutation (2, 0, 1): lam * L(y) + (1 - lam) * L(y[perm]); for
    the CE objectives, CE against the mixed (smoothed) targets, written apart."""
    clean, adv, y = _case()
    perm, lam = np.array([2, 0, 1]), 0.3
    labels = objectives.MixedLabels(jnp.asarray(y), jnp.asarray(y[perm]), jnp.float32(lam))
    got = objectives.mixed(lambda t: _loss(name, clean, adv, t, eps), labels)
    want = lam * _ref(name, clean, adv, y, eps) + (1 - lam) * _ref(name, clean, adv, y[perm],
                                                                   eps)
    np.testing.assert_allclose(float(got), want, rtol=2e-6)
    if name in ("pgd_at", "natural"):
        t = lam * _targets(y, 4, eps) + (1 - lam) * _targets(y[perm], 4, eps)
        logits = adv if name == "pgd_at" else clean
        np.testing.assert_allclose(float(got), -(t * _log_softmax(logits)).sum(1).mean(),
                                   rtol=2e-6)


# A few shapes (each compiles its ops once), any values.
_logits = hnp.arrays(np.float32, st.sampled_from([(1, 2), (3, 4), (5, 3)]),
                     elements=st.floats(-8, 8, width=32))


@settings(max_examples=25, deadline=None)
@given(_logits, st.integers(0, 2 ** 31 - 1), st.floats(0, 1), st.floats(0, 0.99))
def test_mixing_and_smoothing_properties(logits, seed, lam, eps):
    """eps = 0 is the plain loss bit for bit; lam = 1 is the loss of y; the mixed CE is the
    CE against the mixed soft targets (smoothed or not)."""
    n, k = logits.shape
    rng = np.random.default_rng(seed)
    y, partner = (jnp.asarray(rng.integers(0, k, n)) for _ in range(2))
    z = jnp.asarray(logits)
    adv = z[::-1]
    for name in objectives.OBJECTIVES:
        loss = objectives.get(name).batch_loss
        np.testing.assert_array_equal(loss(z, adv, y, beta=BETA, label_smoothing=0.0),
                                      loss(z, adv, y, beta=BETA))
        one = objectives.MixedLabels(y, partner, jnp.float32(1.0))
        smoothed = lambda t: loss(z, adv, t, beta=BETA, label_smoothing=eps)  # noqa: B023
        np.testing.assert_allclose(objectives.mixed(smoothed, one), smoothed(y), rtol=1e-6)
    labels = objectives.MixedLabels(y, partner, jnp.float32(lam))
    soft = (lam * objectives.smoothed_targets(y, k, eps)
            + (1 - lam) * objectives.smoothed_targets(partner, k, eps))
    np.testing.assert_allclose(objectives.mixed(lambda t: objectives.ce(z, t, eps), labels),
                               optax.softmax_cross_entropy(z, soft), rtol=2e-5, atol=2e-5)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([1, 2, 7, 12]), st.integers(0, 2 ** 31 - 1))
def test_mixup_partners_pair_valid_examples_among_themselves(n, seed):
    rng = np.random.default_rng(seed)
    valid = rng.random(n) < 0.7
    key = jax.random.PRNGKey(seed)
    perm = np.asarray(augment.mixup_partners(key, n, jnp.asarray(valid)))
    assert sorted(perm) == list(range(n))
    assert valid[perm][valid].all()  # a valid example's partner is valid
    np.testing.assert_array_equal(perm[~valid], np.flatnonzero(~valid))  # invalid: itself
    # All valid: the permutation of no mask, the argsort of one uniform draw per example.
    full = np.asarray(augment.mixup_partners(key, n, jnp.ones(n, bool)))
    np.testing.assert_array_equal(full, np.asarray(augment.mixup_partners(key, n)))
    np.testing.assert_array_equal(full, np.argsort(np.asarray(jax.random.uniform(key, (n,))),
                                                   kind="stable"))


def _state(model, channels, tx):
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, channels)))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      masks=jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, bool), params),
                      key=jax.random.PRNGKey(1))


def _attack(setting, objective):
    return make_attack(ml_collections.ConfigDict(dict(
        epsilon=0.1, step_size=0.05, num_steps=2, random_start=True, loss="ce", unroll=1)),
        setting, 0, objective)


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 8, 8, 1)).astype(np.uint8),
            rng.integers(0, 10, n).astype(np.int32))


@pytest.mark.parametrize("feed,eps", [("device", 0.0), ("stream", 0.1)])
def test_the_step_mixes_with_the_documented_draw(feed, eps):
    """A natural step's loss and train_acc, re-derived in float64 from the batch, lam ~
    Beta(alpha, alpha) and the permutation drawn from fold_in(fold_in(key, 3), step)
    (lam from the first half of its split, the partners from the second); a streamed
    batch's invalid example stays out and pairs with no valid one."""
    alpha = 0.4
    model = get_model("lenet_digits", 10, 4)
    tx = optax.sgd(0.1)
    state = _state(model, 1, tx)
    images, labels = _data()
    step = make_train_step(model, tx, _attack("natural", "pgd_at"), 16, feed=feed,
                           label_smoothing=eps, mixup_alpha=alpha)
    valid = np.ones(16, bool)
    if feed == "device":
        idx = np.asarray(batch_indices(jax.random.fold_in(state.key, 0), state.step, 32, 16))
        data = (jnp.asarray(images), jnp.asarray(labels))
    else:
        idx, valid[[3, 11]] = np.arange(16), False
        data = {"image": jnp.asarray(images[:16]), "label": jnp.asarray(labels[:16]),
                "valid": jnp.asarray(valid)}
    key = jax.random.fold_in(jax.random.fold_in(state.key, 3), state.step)
    lam_key, perm_key = jax.random.split(key)
    lam = float(jax.random.beta(lam_key, alpha, alpha))
    perm = np.asarray(augment.mixup_partners(perm_key, 16, None if feed == "device"
                                             else jnp.asarray(valid)))
    x = images[idx].astype(np.float32) / 255.0
    x_mix = lam * x + (1 - lam) * x[perm]
    y = labels[idx]
    logits = np.asarray(apply_model(model, state.params, {}, jnp.asarray(x_mix, jnp.float32),
                                    train=True)[0], np.float64)
    ce = lambda t: -(_targets(t, 10, eps) * _log_softmax(logits)).sum(1)
    want = ((lam * ce(y) + (1 - lam) * ce(y[perm]))[valid]).mean()
    major = y if lam >= 0.5 else y[perm]
    _, m = step(state, data)
    np.testing.assert_allclose(float(m["ce"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["train_acc"]),
                               (logits.argmax(1) == major)[valid].mean(), atol=1e-6)
    assert 0 < lam < 1 and (perm != np.arange(16)).any()


def test_both_options_off_trace_the_step_without_them():
    """At 0 the step is the one built without the fields (the same program text), and
    smoothing 0 traces the integer-label cross-entropy."""
    model = get_model("lenet_digits", 10, 4)
    tx = optax.sgd(0.1)
    state = _state(model, 1, tx)
    images, labels = _data()
    data = (jnp.asarray(images), jnp.asarray(labels))
    texts = []
    for kw in ({}, {"label_smoothing": 0.0, "mixup_alpha": 0.0}, {"label_smoothing": 0.1}):
        step = make_train_step(model, tx, _attack("adversarial", "trades"), 16,
                               pgd_loop="fori", objective="trades", **kw)
        texts.append(step.parts[0].lower(state, data).as_text())
    assert texts[0] == texts[1] != texts[2]
    z, y = jnp.zeros((3, 4)), jnp.zeros(3, jnp.int32)
    assert str(jax.make_jaxpr(functools.partial(objectives.ce, smoothing=0.0))(z, y)) == \
        str(jax.make_jaxpr(optax.softmax_cross_entropy_with_integer_labels)(z, y))
    for bad, message in (({"label_smoothing": 1.0}, r"label_smoothing=1.0; allowed: 0 <= it < 1"),
                         ({"mixup_alpha": -0.5}, r"mixup_alpha=-0.5; allowed: >= 0")):
        with pytest.raises(ValueError, match=message):
            make_train_step(model, tx, _attack("natural", "pgd_at"), 16, **bad)


def test_the_training_attack_ascends_the_mixed_loss():
    """Under mixup PGD's loss is lam * CE(y) + (1 - lam) * CE(partner) per example: one
    step from x (no random start) moves along the sign of the gradient of CE against
    the mixed soft targets, with no clean forward pass; TRADES's keeps its clean logits."""
    model = get_model("lenet_digits", 10, 2)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    fn = lambda xa: model.apply({"params": params}, xa)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(0.2, 0.8, (8, 8, 8, 1)), jnp.float32)
    y, partner = (jnp.asarray(rng.integers(0, 10, 8)) for _ in range(2))
    labels = objectives.MixedLabels(y, partner, jnp.float32(0.35))
    cfg = ml_collections.ConfigDict(dict(epsilon=0.1, step_size=0.02, num_steps=1,
                                         random_start=False, loss="ce", unroll=1))
    pgd = make_attack(cfg, "adversarial", 0, "pgd_at").mixed().attack
    state = pgd.init(fn, x, labels, jax.random.PRNGKey(0))
    assert "clean_logits" not in state
    soft = 0.35 * jax.nn.one_hot(y, 10) + 0.65 * jax.nn.one_hot(partner, 10)
    grad = jax.jit(jax.grad(lambda xa: optax.softmax_cross_entropy(fn(xa), soft).sum()))(x)
    stepped = jax.jit(lambda s, lab: pgd.step(fn, s, x, lab))(state, labels)
    np.testing.assert_allclose(np.asarray(stepped["x_adv"]),
                               np.asarray(x + 0.02 * jnp.sign(grad)), atol=1e-6)
    trades = make_attack(cfg, "adversarial", 0, "trades").mixed().attack
    assert "clean_logits" in jax.eval_shape(
        lambda lab: trades.init(fn, x, lab, jax.random.PRNGKey(0)), labels)
    assert make_attack(cfg, "natural", 0, "pgd_at").mixed().attack is None
    with pytest.raises(NotImplementedError, match="mixup with a Square training attack"):
        TrainAttack(attacks.Square(epsilon=0.1, num_steps=2)).mixed()


@pytest.mark.slow
def test_adversarial_mixup_steps_agree_across_pgd_loops(objective="mart"):
    """With smoothing and mixup, the host-driven PGD loop (the mixed labels passed to each
    compiled part) and the compiled one give the same MART run (two passes, the attack's
    CE mixed), finite, each part compiled once."""
    runs = {}
    images, labels = _data(64)
    for loop in ("fori", "host"):
        model = get_model("lenet_digits", 10, 4)
        tx = optax.sgd(0.05, momentum=0.9)
        state = _state(model, 1, tx)
        step = make_train_step(model, tx, _attack("adversarial", objective), 16,
                               pgd_loop=loop, objective=objective, label_smoothing=0.1,
                               mixup_alpha=1.0)
        for _ in range(3):
            state, m = step(state, (jnp.asarray(images), jnp.asarray(labels)))
            assert np.isfinite(float(m["loss"]))
        assert step.compilations() == len(step.parts)
        runs[loop] = (state.params, m["ce"])
    for u, v in zip(jax.tree.leaves(runs["fori"]), jax.tree.leaves(runs["host"])):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=2e-5)


@pytest.mark.slow
def test_a_run_with_smoothing_and_mixup_logs_finite_losses(tmp_path):
    data_dir = write_idx(str(tmp_path / "idx"), np.random.default_rng(0))
    workdir = str(tmp_path / "run")
    r = run_cli(workdir, "--config.data.source=files", f"--config.data.dir={data_dir}",
                "--config.stages=pretrain", "--config.label_smoothing=0.1",
                "--config.mixup_alpha=0.2")
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    assert (config["label_smoothing"], config["mixup_alpha"]) == (0.1, 0.2)
    trains = [l for l in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
              if l["kind"] == "train"]
    assert trains and all(np.isfinite(l["loss"]) and 0 <= l["train_acc"] <= 1 for l in trains)
