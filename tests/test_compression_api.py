"""The public compression API (`robust_admm.compression`): rules over any params tree, the
ADMM and retrain optax transformations, `project`, `size_report`, and the example.

References: the penalty gradient and the Z/U/rho schedule re-derived in numpy (float64
and float32 where the bits must agree); the CLI's own run of the same program (a natural
digits run of admm + retrain) against a hand-written loop on the public API; sparsity and
levels of a user's Flax NNX model counted leaf by leaf.
"""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import robust_admm
from helpers import ROOT
from robust_admm import compression
from robust_admm.compression import admm as admm_lib
from robust_admm.compression import projections
from robust_admm.compression.rules import Rule

sys.path.insert(0, ROOT)
from configs import digits as digits_config  # noqa: E402


# -- numpy references ---------------------------------------------------------------------

def np_topk_mask(scores, k):
    """Keep the k largest scores, ties to the lower index (a stable sort of -scores)."""
    order = np.argsort(-scores, kind="stable")
    mask = np.zeros(scores.shape[0], bool)
    mask[order[:k]] = True
    return mask


def np_project(w, spec):
    """Irregular or filter pruning of a float32 array, written out in numpy."""
    w = np.asarray(w, np.float32)
    if spec["kind"] == "irregular":
        keep = np_topk_mask(np.abs(w).reshape(-1), projections.kept_count(w.size, spec["ratio"]))
        return np.where(keep.reshape(w.shape), w, np.float32(0))
    assert spec["kind"] == "filter"
    energy = np.sum(np.square(w.astype(np.float64)).reshape(-1, w.shape[-1]), axis=0)
    keep = np_topk_mask(energy, projections.kept_count(w.shape[-1], spec["ratio"]))
    return np.where(keep, w, np.float32(0))


def on_levels(w, bits):
    """Whether the nonzeros of float32 `w` are exactly float32(alpha * k), |k| <= levels,
    for one float32 alpha (tried: each magnitude over each level and its neighbours)."""
    levels = 1 if bits == 1 else 2 ** (bits - 1) - 1
    mags = np.unique(np.abs(w[w != 0]).astype(np.float32))
    if mags.size == 0:
        return True
    if mags.size > levels:
        return False
    for k in range(1, levels + 1):
        base = np.float32(mags[-1] / np.float32(k))
        for alpha in (base, np.nextafter(base, np.float32(0)), np.nextafter(base, np.float32(1e9))):
            q = np.round(mags / alpha)
            if np.all((q >= 1) & (q <= levels)) and np.all(
                    (alpha * q.astype(np.float32)).astype(np.float32) == mags):
                return True
    return False


def tree_dict(tree):
    return admm_lib.leaves_by_path(tree)


# -- rules over any params tree -------------------------------------------------------------

PARAMS = {
    "conv1": {"kernel": np.ones((3, 3, 1, 4), np.float32), "bias": np.ones(4, np.float32)},
    "fc1": {"kernel": np.ones((16, 8), np.float32), "bias": np.ones(8, np.float32)},
    "odd": {"kernel": np.ones(5, np.float32)},  # a 1-D 'kernel' is not a weight matrix
    "block": {"w_in": np.ones((8, 8), np.float32), "w_out": np.ones((8, 2), np.float32)},
}


def test_rules_text_objects_and_dicts_resolve_alike_and_default_to_kernels_of_2_dims():
    text = compression.resolve(PARAMS, "conv*=filter:0.5,fc1=irregular:0.75+quantize:4")
    objects = compression.resolve(PARAMS, [Rule("conv*", "filter", ratio=0.5),
                                           Rule("fc1", "irregular", ratio=0.75, bits=4)])
    assert text == objects == {
        "conv1/kernel": {"kind": "filter", "ratio": 0.5},
        "fc1/kernel": {"kind": "quantize", "bits": 4, "method": "auto",
                       "sparsity": "irregular", "ratio": 0.75}}
    with pytest.raises(ValueError, match=r"'odd' matches no kernel leaf.*candidate leaf "
                                         r"paths: \['conv1/kernel', 'fc1/kernel'\]"):
        compression.resolve(PARAMS, "odd=irregular:0.5")


def test_a_rule_that_matches_no_leaf_of_a_users_tree_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"rule 'fc9' matches no kernel leaf.*'fc1/kernel'"):
        compression.admm_phase(optax.sgd(0.1), "fc9=irregular:0.5", update_every=1).init(PARAMS)
    with pytest.raises(ValueError, match=r"rule 'fc9' matches no kernel leaf"):
        compression.retrain_phase(optax.sgd(0.1),
                                  [Rule("fc9", "irregular", ratio=0.5)]).init(PARAMS)
    with pytest.raises(ValueError, match=r"width.*give a ratio"):
        compression.resolve(PARAMS, "fc1=irregular:w2")
    with pytest.raises(ValueError, match=r"Rule\('fc1'\) names no set"):
        compression.resolve(PARAMS, [Rule("fc1")])
    with pytest.raises(ValueError, match=r"update_every=0"):
        compression.admm_phase(optax.sgd(0.1), "fc1=irregular:0.5", update_every=0)
    with pytest.raises(ValueError, match=r"rho=-1"):
        compression.admm_phase(optax.sgd(0.1), "fc1=irregular:0.5", update_every=1, rho=-1)
    with pytest.raises(TypeError, match=r"the optimizer it wraps comes first"):
        compression.admm_phase("fc1=irregular:0.5", update_every=1)
    with pytest.raises(TypeError, match=r"inner='fc1=irregular:0.5' is not an optax"):
        compression.retrain_phase("fc1=irregular:0.5", "fc1=irregular:0.5")


def test_the_predicate_chooses_the_compressible_leaves():
    def is_weight(path, leaf):
        return path.split("/")[-1].startswith("w_")

    specs = compression.resolve(PARAMS, "block/w_*=irregular:0.5", is_compressible=is_weight)
    assert sorted(specs) == ["block/w_in", "block/w_out"]
    # Both leaves of one module are told apart in the size report.
    projected = compression.project(PARAMS, "block/w_*=irregular:0.5", is_compressible=is_weight)
    report = compression.size_report(projected, "block/w_*=irregular:0.5",
                                     is_compressible=is_weight)
    assert report["leaves"]["block/w_in"]["nonzero"] == 32
    assert report["leaves"]["block/w_out"]["nonzero"] == 8
    with pytest.raises(ValueError, match=r"'conv1' matches no compressible leaf.*"
                                         r"\['block/w_in', 'block/w_out'\]"):
        compression.resolve(PARAMS, "conv1=irregular:0.5", is_compressible=is_weight)


def test_size_report_counts_nonzeros_bits_and_bytes_by_hand():
    w = np.zeros((4, 8), np.float32)
    w[0, :3] = 0.5
    params = {"fc": {"kernel": w, "bias": np.ones(8, np.float32)}}
    r = compression.size_report(params, "fc=irregular:0.5+quantize:2")
    # 32 entries, 3 nonzero, 2 bits: dense 8 + 4 (scale) = 12; bitmask 4 + 1 + 4 = 9.
    assert r["leaves"]["fc/kernel"] == {"size": 32, "nonzero": 3, "bits": 2, "format": "bitmask",
                                        "bytes": 9, "dense_bytes": 128, "compressed": True}
    assert r["leaves"]["fc/bias"]["bytes"] == 32
    assert r["total"]["bytes"] == 41 and r["total"]["nonzero"] == 11


def test_project_is_the_exact_projection_per_leaf():
    rng = np.random.default_rng(0)
    params = {"a": {"kernel": rng.normal(size=(6, 5)).astype(np.float32)},
              "b": {"kernel": rng.normal(size=(3, 3, 2, 6)).astype(np.float32),
                    "bias": rng.normal(size=6).astype(np.float32)}}
    rules = {"a": {"kind": "irregular", "ratio": 0.6}, "b": {"kind": "filter", "ratio": 0.5}}
    got = compression.project(params, rules)
    np.testing.assert_array_equal(got["a"]["kernel"], np_project(params["a"]["kernel"], rules["a"]))
    np.testing.assert_array_equal(got["b"]["kernel"], np_project(params["b"]["kernel"], rules["b"]))
    np.testing.assert_array_equal(got["b"]["bias"], params["b"]["bias"])


def test_the_package_exposes_the_api_lazily():
    code = ("import sys, robust_admm; assert 'robust_admm.compression' not in sys.modules; "
            "import optax; tx = robust_admm.admm_phase(optax.sgd(1.0), 'fc=irregular:0.5', update_every=2); "
            "assert robust_admm.compression.admm_phase is robust_admm.admm_phase; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert r.stdout.strip() == "ok", r.stderr[-2000:]
    assert robust_admm.admm_phase is compression.admm_phase
    assert robust_admm.retrain_phase is compression.retrain_phase
    assert robust_admm.compression is compression
    assert {"admm_phase", "retrain_phase", "project", "size_report", "Rule"} <= set(
        robust_admm.__all__)
    # The CLI's modules keep their names: `compression.admm` is the ADMM math.
    assert compression.admm is admm_lib and callable(admm_lib.update)
    assert set(compression.__all__) <= set(dir(compression))


# -- the ADMM transformation --------------------------------------------------------------

def small_params(rng):
    return {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
                     "bias": rng.normal(size=4).astype(np.float32)},
            "fc": {"kernel": rng.normal(size=(12, 5)).astype(np.float32)}}


SMALL_RULES = "conv=filter:0.5,fc=irregular:0.7"
SMALL_SPECS = {"conv/kernel": {"kind": "filter", "ratio": 0.5},
               "fc/kernel": {"kind": "irregular", "ratio": 0.7}}


def test_admm_gradient_is_grads_plus_rho_times_w_minus_z_plus_u_in_float64():
    rng = np.random.default_rng(1)
    params = small_params(rng)
    grads = jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    tx = compression.admm_phase(optax.identity(), SMALL_RULES, update_every=1000, rho=0.3)
    state = tx.init(params)
    z = {p: rng.normal(size=v.shape).astype(np.float32) for p, v in state.admm.z.items()}
    u = {p: rng.normal(size=v.shape).astype(np.float32) for p, v in state.admm.z.items()}
    rho = {"conv/kernel": np.float32(0.3), "fc/kernel": np.float32(2.5)}
    state = state._replace(count=jnp.asarray(7, jnp.int32), admm=admm_lib.AdmmState(
        z=jax.tree_util.tree_map(jnp.asarray, z), u=jax.tree_util.tree_map(jnp.asarray, u),
        rho=jax.tree_util.tree_map(jnp.asarray, rho)))
    out, new_state = jax.jit(tx.update)(grads, state, params)
    w, g, o = tree_dict(params), tree_dict(grads), tree_dict(out)
    for path in w:
        expected = np.asarray(g[path], np.float64)
        if path in z:
            expected = expected + np.float64(rho[path]) * (
                np.float64(w[path]) - np.float64(z[path]) + np.float64(u[path]))
        np.testing.assert_allclose(np.float64(o[path]), expected, rtol=2e-6, atol=2e-6)
    assert int(new_state.count) == 8
    np.testing.assert_array_equal(new_state.admm.z["fc/kernel"], z["fc/kernel"])  # not due


def test_admm_z_u_rho_follow_the_schedule_of_a_numpy_loop():
    """Plain SGD on random gradients through admm_phase(sgd) for 11 steps, Z/U updated
    every 3: after updates 3, 6, 9 from the params they lead to, so updates 4, 7, 10 use
    the new Z and U. The same loop in float32 numpy (projections written out) keeps the
    same support in Z, the same rho, and Z, U and W to float32 rounding (XLA may fuse
    g + rho * r into one rounding)."""
    rng = np.random.default_rng(2)
    params = small_params(rng)
    lr, n, every, rho0, growth, cap = 0.05, 11, 3, 0.4, 1.5, 0.8
    data_grads = [jax.tree_util.tree_map(
        lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(n)]
    tx = compression.admm_phase(optax.sgd(lr), SMALL_RULES, update_every=every, rho=rho0,
                                rho_growth=growth, rho_max=cap)
    step = jax.jit(lambda p, s, g: (lambda u, s2: (optax.apply_updates(p, u), s2))(
        *tx.update(g, s, p)))
    state = tx.init(params)
    p = params
    for g in data_grads:
        p, state = step(p, state, g)

    w = {k: np.asarray(v, np.float32) for k, v in tree_dict(params).items()}
    z = {k: np_project(w[k], s) for k, s in SMALL_SPECS.items()}
    u = {k: np.zeros_like(z[k]) for k in z}
    rho = {k: np.float32(rho0) for k in z}
    for count, g in enumerate(data_grads, start=1):
        g = {k: np.asarray(v, np.float32) for k, v in tree_dict(g).items()}
        for k in w:
            total = g[k] + (rho[k] * (w[k] - z[k] + u[k]) if k in z else 0)
            w[k] = w[k] - np.float32(lr) * total.astype(np.float32)
        if count % every == 0:
            for k, s in SMALL_SPECS.items():
                z[k] = np_project(w[k] + u[k], s)
                new_rho = np.minimum(np.float32(rho[k] * np.float32(growth)), np.float32(cap))
                u[k] = ((u[k] + w[k]) - z[k]) * np.float32(rho[k] / new_rho)
                rho[k] = new_rho
    assert int(state.count) == n
    for k in z:
        np.testing.assert_array_equal(np.asarray(state.admm.z[k]) != 0, z[k] != 0)
        np.testing.assert_allclose(np.asarray(state.admm.z[k]), z[k], rtol=1e-5, atol=1e-6)
        assert np.float32(state.admm.rho[k]) == rho[k]
        np.testing.assert_allclose(np.asarray(state.admm.u[k]), u[k], rtol=1e-5, atol=1e-6)
    for k, v in tree_dict(p).items():
        np.testing.assert_allclose(np.asarray(v), w[k], rtol=1e-5, atol=1e-6)
    assert float(state.residuals["primal_residual/fc/kernel"]) > 0


# -- the CLI's run and a hand-written loop on the public API --------------------------------

def digits_program(workdir):
    """The CLI's natural digits run of the program admm (3 epochs, Z/U every epoch) then
    retrain (2 epochs), on 640 training examples (10 steps an epoch), from the model's
    initial weights."""
    from robust_admm.experiments import run as run_lib

    c = digits_config.get_config()
    c.setting = "natural"
    c.data.train_examples, c.data.test_examples = 640, 100
    c.eval.num_steps, c.eval.every_epochs, c.eval.batch_size = 1, 100, 100
    # XLA's default CPU convolutions, as a plain jax.jit uses (a speed-only option).
    c.cpu_convolutions = "library"
    c.program = "admm,retrain"
    c.admm.epochs, c.retrain.epochs = 3, 2
    c.admm.update_every_epochs = 1
    c.admm.rules = "conv1=filter:0.5,conv2=irregular:0.75,fc1=irregular:0.9+quantize:2"
    run_lib.train_and_evaluate(c, workdir)
    return c


@pytest.mark.slow
def test_the_cli_and_a_hand_written_loop_on_the_public_api_end_with_the_same_params(tmp_path):
    from robust_admm import data
    from robust_admm.data.batching import batch_indices, to_pixels
    from robust_admm.experiments import workdir as workdir_lib
    from robust_admm.models import get_model

    workdir = str(tmp_path / "run")
    c = digits_program(workdir)
    cli_final = workdir_lib.load_final_state(workdir, "retrain")["params"]

    # A user's loop: their model, their loss, optax; the CLI's batches (pure in the run's
    # seed, the phase's index in the program and the step).
    model = get_model("lenet_digits", 10, c.model.width)
    split = data.load_dataset("digits", "files").train
    images, labels = split.images[:640], split.labels[:640]
    n, bs = labels.shape[0], c.batch_size
    spe = n // bs

    def batch(phase_index, step):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(c.seed), phase_index), 0)
        idx = np.asarray(batch_indices(key, step, n, bs))
        return to_pixels(jnp.asarray(images[idx])), jnp.asarray(labels[idx])

    def loss(params, x, y):
        logits = model.apply({"params": params}, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train(params, tx, phase_index, steps):
        @jax.jit
        def step(params, state, x, y):
            updates, state = tx.update(jax.grad(loss)(params, x, y), state, params)
            return optax.apply_updates(params, updates), state

        state = tx.init(params)
        for s in range(steps):
            params, state = step(params, state, *batch(phase_index, s))
        return params

    # The run's initial weights: flax's default initialisation with the run's key.
    params = jax.jit(model.init)(jax.random.fold_in(jax.random.PRNGKey(c.seed), 12345),
                        jnp.zeros((1, 8, 8, 1)))["params"]
    rules = c.admm.rules
    admm_steps, every = c.admm.epochs * spe, c.admm.update_every_epochs * spe
    # The admm phase's 'periodic' schedule: a cosine restarting at every Z/U update.
    lr = optax.sgdr_schedule([dict(init_value=c.admm.lr, peak_value=c.admm.lr,
                                   decay_steps=every, warmup_steps=0)] * c.admm.epochs)
    params = train(params, compression.admm_phase(
        optax.adam(lr), rules, update_every=every, rho=c.admm.rho,
        rho_growth=c.admm.rho_growth, rho_max=c.admm.rho_max), 0, admm_steps)
    params = compression.project(params, rules)
    retrain_steps = c.retrain.epochs * spe
    params = train(params, compression.retrain_phase(
        optax.adam(optax.cosine_decay_schedule(c.retrain.lr, retrain_steps)), rules),
        1, retrain_steps)

    ours, theirs = tree_dict(params), tree_dict(cli_final)
    assert sorted(ours) == sorted(theirs)
    for path in ours:
        np.testing.assert_allclose(np.asarray(ours[path]), np.asarray(theirs[path]),
                                   rtol=0, atol=1e-6, err_msg=path)
    # And both on the rules: counts and levels.
    assert np.count_nonzero(ours["fc1/kernel"]) == projections.kept_count(64 * 64, 0.9)
    assert np.count_nonzero(ours["conv2/kernel"]) == projections.kept_count(3 * 3 * 8 * 16, 0.75)
    assert np.count_nonzero(np.abs(ours["conv1/kernel"]).sum(axis=(0, 1, 2))) == 4
    assert on_levels(np.asarray(ours["fc1/kernel"]), 2)


# -- retraining on the sets -------------------------------------------------------------------

MLP_RULES = "l1=nm:2:4,l2=filter:0.5+quantize:3,l3=quantize:1"


def mlp_params(rng):
    return {"l1": {"kernel": rng.normal(size=(16, 32)).astype(np.float32),
                   "bias": np.zeros(32, np.float32)},
            "l2": {"kernel": rng.normal(size=(32, 32)).astype(np.float32) / 6},
            "l3": {"kernel": rng.normal(size=(32, 8)).astype(np.float32) / 6}}


def mlp_loss(params, x, y):
    h = jax.nn.relu(x @ params["l1"]["kernel"] + params["l1"]["bias"])
    h = jax.nn.relu(h @ params["l2"]["kernel"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ params["l3"]["kernel"], y).mean()


def test_retrain_keeps_every_leaf_of_a_pure_jnp_model_exactly_on_its_rules():
    """N:M, filter pruning under 3-bit levels and binary weights, after 12 steps of SGD
    with momentum from projected weights: counted and checked leaf by leaf."""
    rng = np.random.default_rng(3)
    params = compression.project(mlp_params(rng), MLP_RULES)
    x = jnp.asarray(rng.normal(size=(64, 16)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 8, 64))
    tx = compression.retrain_phase(optax.sgd(0.05, momentum=0.9), MLP_RULES)
    state = tx.init(params)
    masks = compression.retrain_masks(state)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(mlp_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(12):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    w = {k: np.asarray(v) for k, v in tree_dict(params).items()}
    m = {k: np.asarray(v) for k, v in tree_dict(masks).items()}
    # l1: at most 2 of every 4 consecutive inputs per output, on the support of the start.
    groups = (w["l1/kernel"] != 0).reshape(4, 4, 32).sum(axis=1)
    assert groups.max() <= 2 and m["l1/kernel"].reshape(4, 4, 32).sum(axis=1).max() == 2
    assert not np.any(w["l1/kernel"][~m["l1/kernel"]])
    # l2: 16 of 32 filters, the others exactly zero, the kept ones on 3-bit levels.
    assert np.count_nonzero(np.abs(w["l2/kernel"]).sum(axis=0)) <= 16
    assert m["l2/kernel"].any(axis=0).sum() == 16
    assert not np.any(w["l2/kernel"][~m["l2/kernel"]])
    assert on_levels(w["l2/kernel"], 3)
    # l3: binary, every weight +-alpha for one alpha.
    assert np.unique(np.abs(w["l3/kernel"])).size == 1 and np.all(w["l3/kernel"] != 0)
    # The weights moved: the constraint is kept, not training frozen.
    assert not np.array_equal(w["l3/kernel"], np.asarray(
        compression.project(mlp_params(np.random.default_rng(3)), MLP_RULES)["l3"]["kernel"]))
    np.testing.assert_array_equal(m["l1/bias"], True)


def test_straight_through_runs_on_the_levels_and_passes_the_gradient_to_the_latent_weights():
    rng = np.random.default_rng(4)
    params = mlp_params(rng)
    rules = "l3=quantize:2"
    tx = compression.retrain_phase(optax.sgd(0.1), rules, quantize_update="ste")
    masks = compression.retrain_masks(tx.init(params))
    ste = jax.jit(lambda p: compression.straight_through(p, rules, masks))
    levels = ste(params)
    np.testing.assert_array_equal(levels["l3"]["kernel"],
                                  compression.project(params, rules)["l3"]["kernel"])
    np.testing.assert_array_equal(levels["l2"]["kernel"], params["l2"]["kernel"])
    x = jnp.asarray(rng.normal(size=(8, 16)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 8, 8))
    ste_grad = jax.jit(jax.grad(lambda p: mlp_loss(ste(p), x, y)))(params)
    at_levels = jax.jit(jax.grad(mlp_loss))(levels, x, y)
    for k, g in tree_dict(ste_grad).items():
        np.testing.assert_allclose(g, tree_dict(at_levels)[k], rtol=1e-6, atol=1e-7)
    # The update keeps the latent weights (only the masks apply): off the levels.
    updates, _ = tx.update(ste_grad, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert np.unique(np.abs(np.asarray(new["l3"]["kernel"]))).size > 2
    with pytest.raises(ValueError, match="holds 0 RetrainStates"):
        compression.retrain_masks(optax.sgd(0.1).init(params))


def test_admm_with_masks_keeps_z_and_the_gradients_within_them():
    """An earlier phase's support: Z = Proj(W) within it, the gradients (penalty
    included) zero outside it."""
    rng = np.random.default_rng(5)
    params = mlp_params(rng)
    masks = jax.tree_util.tree_map(lambda p: np.ones(p.shape, bool), params)
    masks["l2"]["kernel"] = rng.random((32, 32)) < 0.5
    tx = compression.admm_phase(optax.identity(), "l2=irregular:0.75", update_every=1, rho=0.5,
                                masks=masks)
    state = tx.init(params)
    z = np.asarray(state.admm.z["l2/kernel"])
    assert not np.any(z[~masks["l2"]["kernel"]])
    inside = np.where(masks["l2"]["kernel"], params["l2"]["kernel"], 0)
    np.testing.assert_array_equal(z, np_project(inside, {"kind": "irregular", "ratio": 0.75}))
    grads = jax.tree_util.tree_map(lambda p: np.ones(p.shape, np.float32), params)
    out, state = jax.jit(tx.update)(grads, state, params)  # then a Z/U update, in masks
    out, state = jax.jit(tx.update)(out, state, params)
    g = np.asarray(out["l2"]["kernel"])
    assert not np.any(g[~masks["l2"]["kernel"]]) and np.all(g[masks["l2"]["kernel"]] != 0)
    assert not np.any(np.asarray(state.admm.z["l2/kernel"])[~masks["l2"]["kernel"]])


# -- the example ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_example_compresses_a_flax_nnx_model_exactly_on_its_rules(tmp_path):
    """examples/compress_your_flax_model.py as a user runs it: its printed sparsity per
    layer is exact, and its saved weights are on the rules leaf by leaf."""
    out = str(tmp_path / "compressed.npz")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples",
                                                     "compress_your_flax_model.py"), out],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = {m[0]: (int(m[1]), int(m[2]), int(m[3])) for m in re.findall(
        r"^(\S+/kernel): (\d+)/(\d+) nonzero \(.*\), (\d+) bits$", r.stdout, re.M)}
    assert sorted(printed) == ["conv1/kernel", "conv2/kernel", "fc1/kernel", "fc2/kernel"]
    w = dict(np.load(out))
    for path, (nonzero, size, _) in printed.items():
        assert (np.count_nonzero(w[path]), w[path].size) == (nonzero, size), path
    assert np.count_nonzero(np.abs(w["conv1/kernel"]).sum(axis=(0, 1, 2))) == 8  # of 16
    assert printed["conv2/kernel"][0] == projections.kept_count(4608, 0.8)
    # Quantized with pruning: at most the kept count (a kept weight may round to level 0).
    assert printed["fc1/kernel"][0] <= projections.kept_count(8192, 0.9)
    assert on_levels(w["fc1/kernel"], 4) and on_levels(w["fc2/kernel"], 2)
    assert [p[2] for p in printed.values()] == [32, 32, 4, 2]
    accuracy = float(re.search(r"compressed: accuracy ([\d.]+)", r.stdout).group(1))
    assert accuracy >= 0.8, r.stdout
