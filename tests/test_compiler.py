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
