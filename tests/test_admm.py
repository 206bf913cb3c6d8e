"""ADMM state, penalty and updates against float64 numpy re-derivations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_admm.compression import admm


def np_keep_largest(x, ratio):
    """Independent reference: keep the round((1 - ratio) n) largest |x| (stable order)."""
    flat = x.ravel()
    k = int(np.floor((1 - ratio) * flat.size + 0.5))
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(x.shape)


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return {"conv1": {"kernel": rng.normal(size=(3, 3, 1, 4)).astype(np.float32),
                      "bias": rng.normal(size=(4,)).astype(np.float32)},
            "fc1": {"kernel": rng.normal(size=(16, 5)).astype(np.float32),
                    "bias": rng.normal(size=(5,)).astype(np.float32)}}


SPECS = {"conv1/kernel": {"kind": "irregular", "ratio": 0.5},
         "fc1/kernel": {"kind": "irregular", "ratio": 0.75}}


def test_init_projects_w_and_zeroes_u():
    params = make_params()
    st = admm.init(params, SPECS, rho=0.01)
    for p, s in SPECS.items():
        layer = p.split("/")[0]
        np.testing.assert_allclose(np.asarray(st.z[p]),
                                   np_keep_largest(params[layer]["kernel"], s["ratio"]))
        assert not np.asarray(st.u[p]).any()
        assert float(st.rho[p]) == np.float32(0.01)


def test_penalty_and_update_match_numpy():
    params = make_params(1)
    st = admm.init(params, SPECS, rho=0.1)
    rng = np.random.default_rng(2)
    st = st.replace(u={p: jnp.asarray(rng.normal(size=v.shape).astype(np.float32))
                       for p, v in st.u.items()})
    w = {p: params[p.split("/")[0]]["kernel"].astype(np.float64) for p in SPECS}
    z = {p: np.asarray(st.z[p], np.float64) for p in SPECS}
    u = {p: np.asarray(st.u[p], np.float64) for p in SPECS}
    expected = sum(0.5 * 0.1 * np.sum((w[p] - z[p] + u[p]) ** 2) for p in SPECS)
    np.testing.assert_allclose(float(admm.penalty(params, st)), expected, rtol=1e-5)

    new, metrics = jax.jit(lambda p, s: admm.update(p, s, SPECS, rho_growth=1.3,
                                                    rho_max=0.12))(params, st)
    for p, s in SPECS.items():
        z_new = np_keep_largest(w[p] + u[p], s["ratio"])
        np.testing.assert_allclose(np.asarray(new.z[p]), z_new, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(new.u[p]), (u[p] + w[p] - z_new) * 0.1 / 0.12, rtol=1e-5,
                                   atol=1e-6)
        assert float(new.rho[p]) == np.float32(0.12)  # 0.13 capped at rho_max
        np.testing.assert_allclose(float(metrics[f"primal_residual/{p}"]),
                                   np.linalg.norm(w[p] - z_new) / np.linalg.norm(w[p]), rtol=1e-5)
        np.testing.assert_allclose(float(metrics[f"dual_residual/{p}"]),
                                   np.linalg.norm(z_new - z[p]) / np.linalg.norm(z_new), rtol=1e-5)


def test_admm_solves_a_sparse_least_squares_problem():
    """min 1/2 ||W - A||^2 s.t. W has k nonzeros: the optimum is the projection of A.
    The W-step is solved exactly: W = (A + rho (Z - U)) / (1 + rho)."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(6, 8)).astype(np.float32)
    specs = {"fc/kernel": {"kind": "irregular", "ratio": 0.75}}
    params = {"fc": {"kernel": jnp.zeros_like(a)}}
    st = admm.init(params, specs, rho=0.5)
    update = jax.jit(lambda p, s: admm.update(p, s, specs, rho_growth=1.2, rho_max=10.0))
    for _ in range(60):
        rho = st.rho["fc/kernel"]
        w = (a + rho * (st.z["fc/kernel"] - st.u["fc/kernel"])) / (1 + rho)
        params = {"fc": {"kernel": w}}
        st, metrics = update(params, st)
    np.testing.assert_allclose(np.asarray(st.z["fc/kernel"]), np_keep_largest(a, 0.75), atol=1e-4)
    assert float(metrics["primal_residual/fc/kernel"]) < 1e-3


def test_hard_project_gives_exact_masks_and_keeps_unpruned_leaves():
    params = make_params(4)
    projected, masks = admm.hard_project(params, SPECS)
    assert int(np.asarray(masks["conv1"]["kernel"]).sum()) == 18
    assert int(np.asarray(masks["fc1"]["kernel"]).sum()) == 20
    assert np.asarray(masks["fc1"]["bias"]).all()
    np.testing.assert_array_equal(np.asarray(projected["fc1"]["bias"]), params["fc1"]["bias"])
    np.testing.assert_allclose(np.asarray(projected["fc1"]["kernel"]),
                               np_keep_largest(params["fc1"]["kernel"], 0.75))


def test_empty_state_has_no_penalty():
    assert float(admm.penalty(make_params(), admm.empty())) == 0.0


def test_freeze_zeros_marks_zero_weights_of_compressed_leaves_only():
    params = make_params(5)
    params["fc1"]["kernel"][0, :] = 0.0
    params["fc1"]["bias"][:] = 0.0  # not compressed: stays trainable
    masks = jax.tree_util.tree_map(lambda x: np.ones(x.shape, bool), params)
    masks["conv1"]["kernel"][0, 0, 0, 0] = False  # an earlier mask is kept
    out = admm.freeze_zeros(params, masks, SPECS)
    np.testing.assert_array_equal(np.asarray(out["fc1"]["kernel"]), params["fc1"]["kernel"] != 0)
    assert np.asarray(out["fc1"]["bias"]).all()
    assert not bool(out["conv1"]["kernel"][0, 0, 0, 0])
    assert int(np.asarray(out["conv1"]["kernel"]).sum()) == 35


def test_projection_within_a_mask_is_the_nearest_point_of_the_intersection():
    """Brute force over every support of size k inside the mask (irregular, small)."""
    import itertools
    rng = np.random.default_rng(4)
    w = rng.normal(size=(3, 3)).astype(np.float32)
    mask = rng.random((3, 3)) < 0.6
    for ratio in (0.5, 0.75):
        got, kept = admm.project_within(jnp.asarray(w), {"kind": "irregular", "ratio": ratio},
                                        jnp.asarray(mask))
        k = min(int(np.floor((1 - ratio) * 9 + 0.5)), int(mask.sum()))
        best = min(np.sum((w - np.where(np.isin(np.arange(9), s).reshape(3, 3), w, 0)) ** 2)
                   for s in itertools.combinations(np.flatnonzero(mask), k))
        assert np.sum((w - np.asarray(got)) ** 2) == pytest.approx(best, rel=1e-6)
        assert not np.any(np.asarray(kept) & ~mask)


def test_retraining_keeps_quantized_leaves_on_their_levels_both_ways():
    params = {"a": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)),
                                          jnp.float32)}}
    masks = {"a": {"kernel": jnp.asarray(np.arange(32).reshape(8, 4) % 3 != 0)}}
    specs = {"a/kernel": {"kind": "quantize", "bits": 2, "method": "auto"}}
    q = admm.keep_constraints(params, masks, specs)["a"]["kernel"]
    assert len(np.unique(np.abs(np.asarray(q)[np.asarray(q) != 0]))) == 1  # ternary
    assert not np.any(np.asarray(q)[~np.asarray(masks["a"]["kernel"])])
    # 'ste' leaves the latent weights (masked) and runs the model on the levels, exactly,
    # with the gradient passed straight to the latent weights.
    latent = admm.keep_constraints(params, masks, specs, "ste")["a"]["kernel"]
    np.testing.assert_array_equal(latent, params["a"]["kernel"] * masks["a"]["kernel"])
    levels = admm.onto_levels(params, masks, specs)
    st = admm.straight_through(params, levels)["a"]["kernel"]
    np.testing.assert_array_equal(st, q)
    grad = jax.grad(lambda p: jnp.sum(
        admm.straight_through(p, levels)["a"]["kernel"] ** 2))(params)["a"]["kernel"]
    np.testing.assert_allclose(grad, 2 * q, rtol=1e-6)
