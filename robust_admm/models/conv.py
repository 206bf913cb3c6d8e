"""2-D convolution with the implementation chosen per backend and per shape.

XLA's native convolution is the right choice on GPU and TPU, and on CPU for most layers
once the steps are compiled with XLA's own convolution runtime
(`robust_admm.runtime.compiler`). On XLA:CPU it is still slow for some shapes that
adversarial training hits constantly: a 3x3 conv over a 2x2x512 map is pathological
native and fast as shifted slices + one matmul; the 1- and 3-channel stems and 1x1
convolutions are faster as slices too. The narrowest layers (LeNet stems of 1 -> 2 or 8
channels) run best as input rows times a banded matrix: a few times the FLOPs, in one
well-shaped matmul. On maps of a few pixels most of a padded 3x3 kernel's taps fall on
the padding, so there one matmul per (output position, tap) pair inside the input does
only the products that are not zero; on maps of 3x3 and 4x4, where a third of a padded
3x3 kernel's products still fall on the padding, one matmul per tap over the outputs
where that tap lies inside the input does the same with 9 well-shaped matmuls. The
measurements behind each form are in benchmarks/NOTES.md (entries 3, 12, 14, 19, 21 and
27). So on CPU each convolution picks its form by a fixed rule (`choose_form`), decided
when the program is traced: a rule timed at start-up is noisy.

The slices, rows, pairs and shifts forms are written by hand because no library offers
them: `lax.conv_general_dilated_patches` builds the same patches but its input gradient
is far slower on CPU (NOTES.md, entry 3).
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "native", "slices", "rows", "pairs", "shifts")

_NHWC = ("NHWC", "HWIO", "NHWC")


def choose_form(input_shape: Sequence[int], kernel_shape: Sequence[int],
                strides: Sequence[int], backend: str) -> str:
    """The CPU rule: 'rows' for stride-1 kernels with at most 16 input x output channels
    (the narrow LeNets' stems and LeNet_adv w=1's second conv); 'pairs' for other kernels
    larger than 1x1 on output maps of at most 4 positions (VGG-16's 2x2 maps; NOTES.md,
    entry 21); 'slices' for 1x1 kernels, stems (<= 4 input channels) and the other tiny
    maps (an output side of 2 or less, where the native op is pathological; entry 19);
    'shifts' for other kernels larger than 1x1 on output maps of at most 16 positions (3x3
    and 4x4 maps; entry 27); 'native' elsewhere and on every other backend."""
    if backend != "cpu":
        return "native"
    kh, kw, cin, cout = kernel_shape
    h, w = input_shape[1] // strides[0], input_shape[2] // strides[1]
    if max(strides) == 1 and kh * kw > 1 and cin * cout <= 16:
        return "rows"
    if kh * kw > 1 and cin > 4 and h * w <= 4:
        return "pairs"
    if (kh == kw == 1) or cin <= 4 or min(h, w) <= 2:
        return "slices"
    if h * w <= 16:
        return "shifts"
    return "native"


def conv_slices(x: jnp.ndarray, kernel: jnp.ndarray, strides: Sequence[int],
                padding: Sequence[tuple[int, int]], precision=None) -> jnp.ndarray:
    """NHWC x HWIO convolution as kh*kw shifted (strided) slices of the padded input,
    concatenated along channels ((i, j, c) order, as `kernel.reshape(-1, out)`), and one
    matmul. Its gradients are slices, pads and matmuls, which XLA:CPU runs well."""
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides
    x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    n, h, w, _ = x.shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    cols = [x[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :]
            for i in range(kh) for j in range(kw)]
    patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    y = jnp.dot(patches.reshape(n * ho * wo, kh * kw * cin), kernel.reshape(-1, cout),
                precision=precision)
    return y.reshape(n, ho, wo, cout)


ROWS_MIN_COLUMNS = 32  # matmul columns (block x out channels) a rows block aims for


def conv_rows(x: jnp.ndarray, kernel: jnp.ndarray, strides: Sequence[int],
              padding: Sequence[tuple[int, int]], precision=None) -> jnp.ndarray:
    """NHWC x HWIO convolution as one matmul per block of output columns of each output
    row: the kh padded input rows under it (kh slices, not kh*kw), cut into overlapping
    windows of `block` outputs, times a banded (Toeplitz) matrix built from the kernel,
    whose column (q, o) holds kernel[i, p - q*stride, :, o] at row (i, p, c). The block is
    the smallest divisor of the output width giving >= 32 matmul columns (on LeNet stems
    faster than whole rows; NOTES.md, entry 12). It does (block + kw - 1) / kw times the
    FLOPs of the convolution or more, so it pays off only for stems with very few
    channels."""
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides
    x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    n, h, wp, _ = x.shape
    ho, wo = (h - kh) // sh + 1, (wp - kw) // sw + 1
    block = next(b for b in range(1, wo + 1) if wo % b == 0 and (
        b * cout >= ROWS_MIN_COLUMNS or b == wo))
    span = (block - 1) * sw + kw  # input columns under one block
    windows = jnp.stack([_column_windows(x[:, i:i + (ho - 1) * sh + 1:sh], wo // block,
                                         block * sw, span) for i in range(kh)],
                        axis=3)  # (n, ho, blocks, i, p, c)
    # band[p, q, j] = 1 where p == q*stride + j: tap j of each kernel row under column q.
    band = (jnp.arange(span)[:, None, None] - sw * jnp.arange(block)[None, :, None]
            == jnp.arange(kw)[None, None, :]).astype(kernel.dtype)
    toeplitz = jnp.einsum("pqj,ijco->ipcqo", band, kernel, precision=precision)
    y = jnp.dot(windows.reshape(-1, kh * span * cin),
                toeplitz.reshape(kh * span * cin, block * cout), precision=precision)
    return y.reshape(n, ho, wo, cout)


def _column_windows(rows: jnp.ndarray, count: int, step: int, span: int) -> jnp.ndarray:
    """(n, h, w, c) -> (n, h, count, span, c): windows of `span` columns, `step` apart.

    Where there are more than two windows overlapping by no more than a step, built from
    two reshapes (each window is its own `step` columns plus the first `span - step` of
    the next), not from `count` slices: autodiff turns each slice into a full-width pad in
    the input gradient. With 2 windows the slices stay the faster (NOTES.md, entry 18)."""
    n, h, w, c = rows.shape
    overlap = span - step
    if count == 1:
        return rows[:, :, None, :span]
    if count <= 2 or not 0 <= overlap <= step:
        return jnp.stack([rows[:, :, b * step:b * step + span] for b in range(count)], axis=2)
    own = rows[:, :, :count * step].reshape(n, h, count, step, c)
    if overlap == 0:
        return own
    wide = jnp.pad(rows, ((0, 0), (0, 0), (0, max(0, (count + 1) * step - w)), (0, 0)))
    nxt = wide[:, :, step:(count + 1) * step].reshape(n, h, count, step, c)[:, :, :, :overlap]
    return jnp.concatenate([own, nxt], axis=3)


def conv_pairs(x: jnp.ndarray, kernel: jnp.ndarray, strides: Sequence[int],
               padding: Sequence[tuple[int, int]], precision=None) -> jnp.ndarray:
    """NHWC x HWIO convolution as one matmul per (output position, kernel tap) pair that
    falls inside the input, summed per output position: for maps of a few pixels, where the
    padded taps that the slices form multiplies by zero are most of its arithmetic (3x3 on a
    2x2 map: 16 of its 36 products are not zero)."""
    kh, kw, cin, cout = kernel.shape
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    n, h, w, _ = x.shape
    ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    outputs = []
    for a in range(ho):
        for b in range(wo):
            terms = [jnp.dot(x[:, a * sh + i - pt, b * sw + j - pl], kernel[i, j],
                             precision=precision)
                     for i in range(kh) for j in range(kw)
                     if 0 <= a * sh + i - pt < h and 0 <= b * sw + j - pl < w]
            outputs.append(sum(terms[1:], terms[0]) if terms
                           else jnp.zeros((n, cout), jnp.result_type(x, kernel)))
    return jnp.stack(outputs, axis=1).reshape(n, ho, wo, cout)


def conv_shifts(x: jnp.ndarray, kernel: jnp.ndarray, strides: Sequence[int],
                padding: Sequence[tuple[int, int]], precision=None) -> jnp.ndarray:
    """NHWC x HWIO convolution as one matmul per kernel tap, over the rectangle of output
    positions where that tap falls inside the input (a strided slice of the input), each
    padded to the output's shape and summed: no products with the padding, which on a
    4x4 map are 44 of a padded 3x3 kernel's 144 per output channel block."""
    kh, kw, cin, cout = kernel.shape
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    n, h, w, _ = x.shape
    ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    y = None
    for i in range(kh):
        r0, r1 = _inside(i - pt, sh, h, ho)
        for j in range(kw):
            c0, c1 = _inside(j - pl, sw, w, wo)
            if r1 < r0 or c1 < c0:
                continue  # this tap falls on the padding for every output
            taps = x[:, r0 * sh + i - pt:r1 * sh + i - pt + 1:sh,
                     c0 * sw + j - pl:c1 * sw + j - pl + 1:sw]
            term = jnp.dot(taps.reshape(-1, cin), kernel[i, j], precision=precision)
            term = jnp.pad(term.reshape(n, r1 - r0 + 1, c1 - c0 + 1, cout),
                           ((0, 0), (r0, ho - 1 - r1), (c0, wo - 1 - c1), (0, 0)))
            y = term if y is None else y + term
    return y if y is not None else jnp.zeros((n, ho, wo, cout), jnp.result_type(x, kernel))


def _inside(offset: int, stride: int, size: int, outputs: int) -> tuple[int, int]:
    """The first and last output o (in [0, outputs)) with 0 <= o * stride + offset < size."""
    first = max(0, -(offset // stride))  # ceil(-offset / stride), at least 0
    return first, min(outputs - 1, (size - 1 - offset) // stride)


def conv_general_dilated(impl: str = "auto"):
    """A drop-in for `lax.conv_general_dilated` (the hook `flax.linen.Conv` offers) that
    computes plain NHWC convolutions in the form `impl` names ('auto': by `choose_form`
    for the default backend). Dilated, grouped or other layouts always go to the native
    op."""
    if impl not in IMPLS:
        raise ValueError(f"conv impl={impl!r}; allowed: {IMPLS}")

    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
        plain = (lhs.ndim == 4 and feature_group_count == 1 and not kwargs
                 and all(d == 1 for d in (lhs_dilation or (1, 1)))
                 and all(d == 1 for d in (rhs_dilation or (1, 1)))
                 and dimension_numbers == lax.conv_dimension_numbers(
                     lhs.shape, rhs.shape, _NHWC))
        if plain:
            pads = (lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides,
                                        padding) if isinstance(padding, str) else padding)
            form = impl if impl != "auto" else choose_form(
                lhs.shape, rhs.shape, window_strides, jax.default_backend())
            if form == "slices":
                return conv_slices(lhs, rhs, window_strides, pads, precision)
            if form == "rows":
                return conv_rows(lhs, rhs, window_strides, pads, precision)
            if form == "pairs":
                return conv_pairs(lhs, rhs, window_strides, pads, precision)
            if form == "shifts":
                return conv_shifts(lhs, rhs, window_strides, pads, precision)
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kwargs)

    return conv
