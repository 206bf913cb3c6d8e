"""Small layers shared by the models."""
from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp

from robust_admm.models import conv


def max_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
    """2x2 max-pool with stride 2 on NHWC input.

    Written as a reshape and a max where the spatial size is even: XLA:CPU runs this
    faster than the generic `reduce_window` (and its gradient, a select, is cheaper too).
    Falls back to `nn.max_pool` (floor semantics, as PyTorch) for odd sizes.
    """
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        return nn.max_pool(x, (2, 2), strides=(2, 2))
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class Conv(nn.Conv):
    """`nn.Conv` (same fields, parameter names `kernel` (kh, kw, in, out) and `bias`) whose
    convolution is chosen per backend and per shape (see `robust_admm.models.conv`).
    Pass `conv_general_dilated=conv.conv_general_dilated('native')` to force one form."""

    conv_general_dilated: Callable | None = conv.conv_general_dilated("auto")
