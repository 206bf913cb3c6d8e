"""The convolution forms (native, shifted slices + matmul, rows times a banded matrix,
a matmul per output position and tap, a matmul per tap over the outputs it reaches),
compiled as the steps compile them, against a float64 brute force."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from robust_admm.models import conv
from robust_admm.models.layers import Conv
from robust_admm.runtime import compiler


def reference(x, k, stride, pad, r):
    """y[n,i,j,o] = sum_{a,b,c} xpad[n, i*s+a, j*s+b, c] k[a,b,c,o], and the gradients of
    sum(y * r) w.r.t. x and k, by loops over output positions in float64."""
    x, k, r = (np.asarray(v, np.float64) for v in (x, k, r))
    (pt, pb), (pl, pr) = pad
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    kh, kw, _, cout = k.shape
    n, ho, wo = r.shape[:3]
    y = np.zeros((n, ho, wo, cout))
    dxp, dk = np.zeros_like(xp), np.zeros_like(k)
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            y[:, i, j] = np.einsum("nabc,abco->no", patch, k)
            dxp[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :] += np.einsum(
                "no,abco->nabc", r[:, i, j], k)
            dk += np.einsum("nabc,no->abco", patch, r[:, i, j])
    dx = dxp[:, pt:xp.shape[1] - pb, pl:xp.shape[2] - pr]
    return y, dx, dk


# (form, cpu_convolutions): every form as the steps compile it on CPU, and the native op
# under jaxlib's defaults too (the other convolution runtime).
FORMS = (("native", "xla"), ("slices", "xla"), ("rows", "xla"), ("pairs", "xla"),
         ("shifts", "xla"), ("native", "library"))
PAIRS_MAX_OUTPUTS = 16  # the pairs form unrolls a matmul per (position, tap): small maps only


def both_forms(x, k, stride, padding):
    """{(impl, runtime): (y, dx, dk, r)} for the float32 forms (r: fixed weights of the
    loss), each jit-compiled with the compiler options of `runtime`."""
    out = {}
    dn = lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
    pads = (lax.padtype_to_pads(x.shape[1:3], k.shape[:2], (stride, stride), padding)
            if isinstance(padding, str) else padding)
    ho = (x.shape[1] + sum(pads[0]) - k.shape[0]) // stride + 1
    wo = (x.shape[2] + sum(pads[1]) - k.shape[1]) // stride + 1
    for impl, runtime in FORMS:
        if impl == "pairs" and ho * wo > PAIRS_MAX_OUTPUTS:
            continue  # chosen only for <= 4 output positions; hundreds of matmuls here
        f = conv.conv_general_dilated(impl)
        fn = lambda x, k: f(x, k, (stride, stride), padding, dimension_numbers=dn)
        jit = lambda g: jax.jit(g, compiler_options=compiler.compiler_options(runtime))
        y = jit(fn)(x, k)
        r = jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))
        dx, dk = jit(jax.grad(lambda x, k: jnp.sum(fn(x, k) * r), argnums=(0, 1)))(x, k)
        out[impl, runtime] = (y, dx, dk, r)
    return out


def check(n, h, w, cin, cout, kh, stride, padding, seed):
    """All forms against the float64 reference, within float32 rounding of the sums."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, h, w, cin)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(kh, kh, cin, cout)).astype(np.float32))
    pads = (lax.padtype_to_pads((h, w), (kh, kh), (stride, stride), padding)
            if isinstance(padding, str) else padding)
    forms = both_forms(x, k, stride, padding)
    ref = reference(x, k, stride, pads, forms["native", "xla"][3])
    scale = np.sqrt(kh * kh * cin)  # size of a sum of kh*kh*cin unit products
    for impl, (y, dx, dk, _) in forms.items():
        for got, want, what in zip((y, dx, dk), ref, ("output", "input grad", "kernel grad")):
            assert got.shape == want.shape, (impl, what)
            err = np.abs(np.asarray(got, np.float64) - want).max()
            assert err <= 1e-4 * scale * max(1.0, np.abs(want).max() / scale), (impl, what, err)


@pytest.mark.parametrize("shape", [
    # n, h, w, cin, cout, k, stride, padding: the model zoo's kinds of layer
    (2, 12, 12, 1, 4, 5, 1, "SAME"),          # LeNet stem
    (2, 12, 12, 1, 8, 5, 1, "SAME"),          # LeNet stem, rows in blocks of 4 columns
    (2, 15, 16, 1, 16, 3, 2, ((1, 1), (1, 1))),  # strided, rows in blocks of 2 columns
    (2, 12, 12, 1, 16, 2, 2, "VALID"),        # rows: windows that do not overlap
    (2, 12, 12, 1, 16, 5, 1, "SAME"),         # rows: windows overlapping by two blocks
    (2, 6, 6, 4, 6, 5, 1, "VALID"),           # LeNet-5
    (2, 8, 8, 3, 5, 3, 1, ((1, 1), (1, 1))),  # CIFAR stem
    (2, 2, 2, 8, 8, 3, 1, ((1, 1), (1, 1))),  # VGG's last 2x2 maps
    (2, 8, 8, 4, 8, 3, 2, ((1, 1), (1, 1))),  # ResNet stride-2 3x3
    (2, 8, 8, 4, 8, 1, 2, "VALID"),           # ResNet shortcut
    (1, 7, 5, 3, 2, 3, 2, ((2, 0), (1, 1))),  # odd sizes, asymmetric padding
    (2, 16, 16, 8, 16, 3, 1, ((1, 1), (1, 1))),  # the native op on a larger map
    (2, 4, 4, 8, 8, 3, 1, ((1, 1), (1, 1))),  # VGG's and ResNet's 4x4 maps (shifts)
    (2, 3, 5, 6, 4, 3, 2, ((2, 0), (0, 2))),  # shifts: strided, asymmetric padding
    (2, 1, 4, 6, 4, 3, 1, ((2, 0), (1, 1))),  # shifts: taps wholly on the padding
    (2, 1, 1, 3, 2, 1, 2, ((1, 1), (1, 1))),  # every output on the padding: zeros
])
def test_all_forms_match_a_float64_brute_force(shape):
    check(*shape, seed=0)


@settings(max_examples=12, deadline=None, derandomize=True)  # each shape compiles every form
@given(n=st.integers(1, 20), h=st.integers(1, 7), w=st.integers(1, 7), cin=st.integers(1, 4), cout=st.integers(1, 4),
       kh=st.sampled_from([1, 2, 3]), stride=st.integers(1, 3),
       padding=st.sampled_from(["SAME", "VALID", ((1, 1), (1, 1)), ((0, 2), (1, 0))]),
       seed=st.integers(0, 1000))
def test_all_forms_match_on_random_shapes(n, h, w, cin, cout, kh, stride, padding, seed):
    pads = (lax.padtype_to_pads((h, w), (kh, kh), (stride, stride), padding)
            if isinstance(padding, str) else padding)
    if h + sum(pads[0]) < kh or w + sum(pads[1]) < kh:
        return  # no output position
    check(n, h, w, cin, cout, kh, stride, padding, seed)


def test_the_cpu_rule_and_other_backends():
    rule = conv.choose_form
    assert rule((128, 2, 2, 512), (3, 3, 512, 512), (1, 1), "cpu") == "pairs"  # tiny map
    assert rule((128, 4, 4, 512), (3, 3, 512, 512), (2, 2), "cpu") == "pairs"  # to 2x2
    assert rule((128, 2, 2, 4), (3, 3, 4, 64), (1, 1), "cpu") == "slices"  # few channels
    assert rule((128, 2, 2, 512), (1, 1, 512, 512), (1, 1), "cpu") == "slices"  # 1x1
    assert rule((64, 28, 28, 1), (5, 5, 1, 32), (1, 1), "cpu") == "slices"  # stem
    assert rule((64, 28, 28, 1), (5, 5, 1, 8), (1, 1), "cpu") == "rows"  # narrow stem
    assert rule((64, 14, 14, 2), (5, 5, 2, 4), (1, 1), "cpu") == "rows"
    assert rule((64, 28, 28, 1), (5, 5, 1, 8), (2, 2), "cpu") == "slices"  # strided stem
    assert rule((128, 32, 32, 64), (1, 1, 64, 128), (2, 2), "cpu") == "slices"  # 1x1
    assert rule((128, 16, 16, 128), (3, 3, 128, 256), (2, 2), "cpu") == "native"  # strided
    assert rule((128, 8, 8, 256), (3, 3, 256, 512), (2, 2), "cpu") == "shifts"  # to 4x4
    assert rule((128, 4, 4, 512), (3, 3, 512, 512), (1, 1), "cpu") == "shifts"
    assert rule((128, 3, 3, 64), (3, 3, 64, 64), (1, 1), "cpu") == "shifts"
    assert rule((128, 4, 4, 4), (3, 3, 4, 64), (1, 1), "cpu") == "slices"  # few channels
    assert rule((128, 4, 5, 64), (3, 3, 64, 64), (1, 1), "cpu") == "native"  # 20 outputs
    assert rule((128, 1, 8, 64), (3, 3, 64, 64), (1, 1), "cpu") == "slices"  # a 1-row map
    assert rule((128, 32, 32, 64), (3, 3, 64, 64), (1, 1), "cpu") == "native"
    assert rule((64, 14, 14, 32), (5, 5, 32, 64), (1, 1), "cpu") == "native"
    assert rule((128, 16, 16, 128), (3, 3, 128, 128), (1, 1), "cpu") == "native"
    assert rule((128, 8, 8, 64), (3, 3, 64, 64), (1, 1), "cpu") == "native"
    for backend in ("gpu", "tpu", "cuda", "rocm"):
        assert rule((128, 2, 2, 512), (3, 3, 512, 512), (1, 1), backend) == "native"
        assert rule((128, 32, 32, 64), (3, 3, 64, 64), (1, 1), backend) == "native"


def test_conv_module_keeps_nn_conv_parameters_and_outputs():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 9, 3)).astype(np.float32))
    base = nn.Conv(6, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    params = base.init(jax.random.PRNGKey(0), x)
    want = base.apply(params, x)
    for impl in conv.IMPLS:
        mine = Conv(6, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                    conv_general_dilated=conv.conv_general_dilated(impl))
        assert jax.tree.map(jnp.shape, mine.init(jax.random.PRNGKey(0), x)) == \
            jax.tree.map(jnp.shape, params)
        np.testing.assert_allclose(mine.apply(params, x), want, atol=1e-5)


def test_grouped_and_dilated_convs_go_to_the_native_op():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(1, 6, 6, 4)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(3, 3, 2, 4)).astype(np.float32))
    dn = lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
    f = conv.conv_general_dilated("slices")
    for kw in (dict(feature_group_count=2), dict(rhs_dilation=(2, 2))):
        kk = k if "feature_group_count" in kw else jnp.concatenate([k, k], 2)
        want = lax.conv_general_dilated(x, kk, (1, 1), "SAME", dimension_numbers=dn, **kw)
        np.testing.assert_array_equal(f(x, kk, (1, 1), "SAME", dimension_numbers=dn, **kw), want)


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="impl='im2col'.*allowed"):
        conv.conv_general_dilated("im2col")


@settings(max_examples=50, deadline=None)
@given(count=st.integers(1, 6), step=st.integers(1, 5), span=st.integers(1, 12),
       extra=st.integers(0, 4), seed=st.integers(0, 1000))
def test_column_windows_are_the_slices_they_stand_for(count, step, span, extra, seed):
    """The rows form's windows (reshapes where they overlap by at most a step) equal the
    `count` slices of `span` columns, `step` apart, they replace."""
    w = (count - 1) * step + span + extra
    rows = np.random.default_rng(seed).normal(size=(2, 3, w, 2)).astype(np.float32)
    want = np.stack([rows[:, :, b * step:b * step + span] for b in range(count)], axis=2)
    got = np.asarray(conv._column_windows(jnp.asarray(rows), count, step, span))
    np.testing.assert_array_equal(got, want)
