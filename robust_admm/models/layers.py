"""Small layers shared by the models."""
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from robust_admm.models import conv


# model.normalize -> the per-channel (mean, std) a model subtracts and divides by, inside the
# model so that attacks act on [0, 1] pixels; 'imagenet': the statistics torchvision's and
# timm's ImageNet weights were trained with.
NORMALIZATIONS = {
    "none": None,
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def normalize_pixels(x: jnp.ndarray, normalize: str) -> jnp.ndarray:
    """(x - mean) / std per channel (the last axis) for NORMALIZATIONS[normalize]; x itself
    for 'none' (the model's program is then unchanged)."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"model.normalize={normalize!r}; allowed: {', '.join(NORMALIZATIONS)}")
    if NORMALIZATIONS[normalize] is None:
        return x
    mean, std = (jnp.asarray(v, jnp.float32) for v in NORMALIZATIONS[normalize])
    if x.shape[-1] != mean.shape[0]:
        raise ValueError(f"model.normalize={normalize!r} has statistics for {mean.shape[0]} "
                         f"channels; the input has {x.shape[-1]}")
    return (x - mean) / std


def float32_logits(logits: jnp.ndarray) -> jnp.ndarray:
    """Logits in float32 whatever the compute dtype, so losses and attacks read them at full
    precision (a no-op for float32 models: their programs are unchanged)."""
    return logits.astype(jnp.float32)


def adaptive_pool_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) matrix of PyTorch's AdaptiveAvgPool along one axis: row i averages the
    inputs floor(i*size/out) .. ceil((i+1)*size/out) - 1 (bins may overlap or repeat an
    input when size is not a multiple of out, or is smaller than out)."""
    if size < 1 or out < 1:
        raise ValueError(f"adaptive pooling of {size} inputs to {out} outputs; both must "
                         f"be at least 1 (is the input smaller than the model's minimum?)")
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        start, end = (i * size) // out, -(-(i + 1) * size // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: jnp.ndarray, output_size: tuple[int, int]) -> jnp.ndarray:
    """torchvision's `AdaptiveAvgPool2d(output_size)` on NHWC input, as one einsum with two
    averaging matrices built when the program is traced; the input itself where its size
    is already `output_size` (the standard input sizes of the ImageNet models)."""
    n, h, w, c = x.shape
    oh, ow = output_size
    if (h, w) == (oh, ow):
        return x
    ah = jnp.asarray(adaptive_pool_matrix(h, oh), x.dtype)
    aw = jnp.asarray(adaptive_pool_matrix(w, ow), x.dtype)
    return jnp.einsum("nhwc,ih,jw->nijc", x, ah, aw)


def flatten_chw(x: jnp.ndarray) -> jnp.ndarray:
    """NHWC -> (N, C*H*W) in PyTorch's order (channel-major, as `x.view(N, -1)` flattens
    NCHW), so that a following Dense kernel is PyTorch's Linear weight transposed."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
    """2x2 max-pool with stride 2 on NHWC input.

    Written as a reshape and a max where the spatial size is even: XLA:CPU runs this
    faster than the generic `reduce_window` (benchmarks/NOTES.md, entry 9). Its gradient
    is JAX's own for that max (each window's gradient shared equally among the entries
    equal to its max), but written by hand (`_pool_even`) so that the backward pass is
    elementwise. Falls back to `nn.max_pool` (floor semantics, as PyTorch) for odd sizes.
    """
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        return nn.max_pool(x, (2, 2), strides=(2, 2))
    return _pool_even(x)


def _windows(x: jnp.ndarray) -> jnp.ndarray:
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c)


# A custom VJP, not autodiff, because autodiff's backward divides by a window count (a
# reduction) right after the next layer's input-gradient convolution, and XLA:CPU then
# hands that convolution to the library's reduce fusion, where it runs far slower than in
# XLA's runtime (benchmarks/NOTES.md, entry 15). Here the shares are computed in the
# forward pass, so the backward pass is a broadcast multiply. No forward-mode (jvp) rule.
@jax.custom_vjp
def _pool_even(x: jnp.ndarray) -> jnp.ndarray:
    return _windows(x).max(axis=(2, 4))


def _window_max(windows: jnp.ndarray) -> jnp.ndarray:
    """The max of each 2x2 window as three elementwise maxima, not a reduction."""
    return jnp.maximum(jnp.maximum(windows[:, :, 0, :, 0], windows[:, :, 0, :, 1]),
                       jnp.maximum(windows[:, :, 1, :, 0], windows[:, :, 1, :, 1]))


def _pool_even_fwd(x):
    windows = _windows(x)
    # The max as elementwise maxima, not a reduction (as the primal's): XLA:CPU gives
    # reductions to the library, and inside a large program (VGG-16-BN at 112 px and up)
    # its reduce fusion compared some windows' entries with a max none of them equalled,
    # so their shares were 0 / 0 (benchmarks/NOTES.md, "VGG-16-BN's gradients at 224 px").
    pooled = _window_max(windows)
    is_max = (windows == pooled[:, :, None, :, None]).astype(x.dtype)
    # The ties counted as a sum of the four window entries, not a reduction: XLA:CPU gives
    # reductions to the library, where this one slowed the step (NOTES.md, entry 17).
    ties = (is_max[:, :, 0, :, 0] + is_max[:, :, 0, :, 1]
            + is_max[:, :, 1, :, 0] + is_max[:, :, 1, :, 1])
    return pooled, is_max / ties[:, :, None, :, None]


def _pool_even_bwd(shares, g):
    n, h2, _, w2, _, c = shares.shape
    return ((shares * g[:, :, None, :, None]).reshape(n, 2 * h2, 2 * w2, c),)


_pool_even.defvjp(_pool_even_fwd, _pool_even_bwd)


class Conv(nn.Conv):
    """`nn.Conv` (same fields, parameter names `kernel` (kh, kw, in, out) and `bias`) whose
    convolution is chosen per backend and per shape (see `robust_admm.models.conv`).
    Pass `conv_general_dilated=conv.conv_general_dilated('native')` to force one form."""

    conv_general_dilated: Callable | None = conv.conv_general_dilated("auto")
