"""The host-driven attacks compile a bounded number of programs: one init for all the runs
of a multi-run attack (the run index traced), and the traced init gives each run exactly
the state the per-run (static) init gave."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_admm.attacks import core
from robust_admm.attacks.apgd import ApgdCe, ApgdT
from robust_admm.attacks.fab import FabT
from robust_admm.attacks.pgd import Pgd
from robust_admm.attacks.square import Square
from robust_admm.evaluation import robustness


def mlp(params, x):
    """A 2-layer tanh MLP on NHWC input, 10 classes."""
    w1, b1, w2, b2 = params
    return jnp.tanh(x.reshape(x.shape[0], -1) @ w1 + b1) @ w2 + b2


def case(n=8, seed=0):
    rng = np.random.default_rng(seed)
    dim, hidden = 2 * 4 * 4, 16
    params = tuple(jnp.asarray(a, jnp.float32) for a in (
        rng.normal(size=(dim, hidden)) * 2 / np.sqrt(dim), rng.normal(size=hidden) * 0.1,
        rng.normal(size=(hidden, 10)), rng.normal(size=10) * 0.1))
    x = jnp.asarray(rng.uniform(0, 1, (n, 4, 4, 2)), jnp.float32)
    return params, x, mlp(params, x).argmax(-1)


MULTI_RUN = [
    ApgdT(0.1, num_steps=3, n_target_classes=2, restarts=2),
    FabT(0.1, num_steps=3, n_target_classes=2, restarts=4),   # runs 2, 3: random starts
    FabT(0.1, num_steps=3, n_target_classes=2, restarts=4, norm="l2"),
    Square(0.1, num_steps=3, restarts=3),
    Pgd(epsilon=0.1, step_size=0.02, num_steps=3, restarts=3),
]


@pytest.mark.parametrize("attack", MULTI_RUN, ids=lambda a: f"{type(a).__name__}-{a.norm}")
def test_a_traced_run_index_gives_every_run_the_static_inits_state(attack):
    params, x, y = case()
    key = jax.random.PRNGKey(3)
    static = jax.jit(lambda r: attack.init(lambda z: mlp(params, z), x, y, key, r),
                     static_argnums=0)
    traced = jax.jit(lambda r: attack.init(lambda z: mlp(params, z), x, y, key, r))
    for r in range(attack.restarts):
        a, b = static(r), traced(jnp.int32(r))
        for path, u, v in zip(jax.tree_util.tree_leaves_with_path(a),
                              jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            if jnp.issubdtype(u.dtype, jax.dtypes.prng_key):
                u, v = jax.random.key_data(u), jax.random.key_data(v)
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=f"run {r} "
                                          f"{jax.tree_util.keystr(path[0])}")
    assert traced._cache_size() == 1


@pytest.mark.parametrize("attack", MULTI_RUN[:2], ids=lambda a: type(a).__name__)
def test_the_host_runner_compiles_one_init_for_every_run(attack):
    params, x, y = case()
    runner = core.HostRunner(attack, mlp)
    host = runner(params, x, y, jax.random.PRNGKey(1))
    assert runner.init_c._cache_size() == 1
    assert all(part._cache_size() == 1 for part in runner.parts)
    fori = core.run(attack, lambda z: mlp(params, z), x, y, jax.random.PRNGKey(1))
    np.testing.assert_allclose(np.asarray(host), np.asarray(fori), atol=1e-6)


def test_a_single_run_attack_keeps_its_static_init():
    """One run: the init program is the one it was (the run index a constant)."""
    runner = core.HostRunner(ApgdCe(0.1, num_steps=2), mlp)
    assert not runner.traced_restart
    params, x, y = case()
    runner(params, x, y, jax.random.PRNGKey(0))
    assert runner.init_c._cache_size() == 1


def test_regrouping_compiles_each_part_once_per_bucket():
    """APGD-T over 9 runs on a batch that is regrouped as points are fooled: the init once
    for the batch, every other part once per bucket size it met."""
    params, x, y = case(n=32, seed=2)
    attack = ApgdT(0.05, num_steps=30, n_target_classes=9, restarts=9)
    sizes = []
    bucket = lambda n: sizes.append(1 << max(0, int(n - 1).bit_length())) or sizes[-1]
    fooled_fn = robustness.apply_fooled_fn(mlp, attack, loop="host", bucket=bucket)
    fooled = fooled_fn(params, np.asarray(x), np.asarray(y), jax.random.PRNGKey(0))
    met = len(set(sizes) | {len(y)})
    assert 0 < fooled.sum() < len(y) and met >= 2  # regrouped; some points survive
    runner = fooled_fn.runner
    assert runner.init_c._cache_size() == 1
    assert runner.step_c._cache_size() <= met
    assert fooled_fn.fooled_c._cache_size() <= met
