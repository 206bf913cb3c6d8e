"""The XLA compiler options of the compiled steps (robust_admm.compiler)."""
import re

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from robust_admm import compiler


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


def _library_fusions(cpu_convolutions: str) -> set:
    """The op names (from metadata) of the library fusions in a compiled conv -> dense
    program, e.g. {'conv_general_dilated', 'dot_general'}."""
    x, k, w = jnp.ones((4, 16, 16, 64)), jnp.ones((3, 3, 64, 64)), jnp.ones((16384, 10))

    def f(x, k, w):
        y = lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y.reshape(4, -1) @ w

    text = jax.jit(f, compiler_options=compiler.compiler_options(cpu_convolutions)).lower(
        x, k, w).compile().as_text()
    return {m.group(1) for line in text.splitlines() if "kind=kCustom" in line
            for m in [re.search(r'op_name="jit\(f\)/(\w+)"', line)] if m}


def test_xla_setting_moves_convolutions_out_of_the_library_and_keeps_matmuls_there():
    assert "conv_general_dilated" in _library_fusions("library")  # jaxlib's default
    assert _library_fusions("xla") == {"dot_general"}


def test_an_option_this_jaxlib_rejects(monkeypatch):
    monkeypatch.setattr(compiler, "LIBRARY_DOTS_AND_REDUCTIONS", "LIBRARY_FUSION_TYPE_NO_SUCH")
    with pytest.warns(UserWarning, match="rejects the XLA:CPU compiler option"):
        assert compiler.compiler_options("auto", "cpu") == {}
    with pytest.raises(ValueError, match="cpu_convolutions='xla': this jaxlib .* rejects"):
        compiler.compiler_options("xla", "cpu")
    assert compiler.compiler_options("library", "cpu") == {}
