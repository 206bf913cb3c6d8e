"""The XLA compiler options of the compiled steps (robust_admm.runtime.compiler)."""
import jax
import jax.numpy as jnp
import pytest
from jax import lax

from helpers import library_fusions
from robust_admm.runtime import compiler


def test_options_by_backend_and_setting():
    want = {compiler.LIBRARY_OPTION: compiler.LIBRARY_DOTS_AND_REDUCTIONS}
    assert compiler.compiler_options("xla", "cpu") == want
    assert compiler.compiler_options("auto", "cpu") == want
    assert compiler.compiler_options("library", "cpu") == {}
    for backend in ("gpu", "tpu", "cuda", "rocm"):
        for setting in compiler.CPU_CONVOLUTIONS:
            assert compiler.compiler_options(setting, backend) == {}
    with pytest.raises(ValueError, match="cpu_convolutions='fast'.*allowed"):
        compiler.compiler_options("fast", "cpu")


def _library_ops(cpu_convolutions: str) -> set:
    """Which of convolution and dot end up inside library fusions of a compiled
    conv -> dense program."""
    x, k, w = jnp.ones((4, 16, 16, 64)), jnp.ones((3, 3, 64, 64)), jnp.ones((16384, 10))

    def f(x, k, w):
        y = lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y.reshape(4, -1) @ w

    text = jax.jit(f, compiler_options=compiler.compiler_options(cpu_convolutions)).lower(
        x, k, w).compile().as_text()
    return set().union(*library_fusions(text)) & {"convolution", "dot"}


def test_xla_setting_moves_convolutions_out_of_the_library_and_keeps_matmuls_there():
    assert "convolution" in _library_ops("library")  # jaxlib's default
    assert _library_ops("xla") == {"dot"}


def test_an_option_this_jaxlib_rejects(monkeypatch):
    monkeypatch.setattr(compiler, "LIBRARY_DOTS_AND_REDUCTIONS", "LIBRARY_FUSION_TYPE_NO_SUCH")
    with pytest.warns(UserWarning, match="rejects the XLA:CPU compiler option"):
        assert compiler.compiler_options("auto", "cpu") == {}
    with pytest.raises(ValueError, match="cpu_convolutions='xla': this jaxlib .* rejects"):
        compiler.compiler_options("xla", "cpu")
    assert compiler.compiler_options("library", "cpu") == {}


def test_the_attacks_take_fast_min_max_on_cpu_only():
    base = compiler.compiler_options("auto", "cpu")
    assert compiler.attack_compiler_options("auto", "cpu") == {
        **base, "xla_cpu_enable_fast_min_max": True}
    assert "xla_cpu_enable_fast_min_max" not in base
    for backend in ("gpu", "tpu"):
        assert compiler.attack_compiler_options("auto", backend) == {}


def test_fast_min_max_gives_the_attacks_the_same_bits_on_a_finite_model():
    """A conv + max-pool + dense model (max-pools, ReLUs, clips: the operations the
    option changes), four AutoAttack members, some steps each: the same state to the bit
    with and without the option."""
    import functools

    import numpy as np

    from robust_admm.attacks import core, suite
    from robust_admm.models import layers

    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.normal(size=(3, 3, 1, 4)) * 0.5, jnp.float32)
    w = jnp.asarray(rng.normal(size=(4 * 4 * 4, 10)) * 0.3, jnp.float32)

    def apply(m, x):
        kernel, dense = m
        h = lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = layers.max_pool_2x2(jax.nn.relu(h))
        return h.reshape(h.shape[0], -1) @ dense

    x = jnp.asarray(np.round(rng.uniform(0, 1, (16, 8, 8, 1)) * 4) / 4, jnp.float32)  # ties
    y = apply((k, w), x).argmax(-1)
    as_host = lambda v: np.asarray(jax.random.key_data(v)) if jnp.issubdtype(
        v.dtype, jax.dtypes.prng_key) else np.asarray(v)
    for name in ("apgd-ce", "apgd-t", "fab-t", "square"):
        states = []
        for options in (compiler.compiler_options(), compiler.attack_compiler_options()):
            runner = core.HostRunner(suite.make(name, 0.1, 10), apply,
                                     functools.partial(jax.jit, compiler_options=options))
            s = runner.init((k, w), x, y, jax.random.PRNGKey(1), 0)
            for _ in range(12):
                s = runner.step_c((k, w), s, x, y)
            states.append(jax.tree_util.tree_leaves(jax.tree_util.tree_map(as_host, s)))
        for a, b in zip(*states):
            np.testing.assert_array_equal(a, b, err_msg=name)
