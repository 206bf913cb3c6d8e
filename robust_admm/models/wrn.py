"""WideResNets for CIFAR-10 (32x32), as the adversarial-robustness literature uses them.

Zagoruyko & Komodakis 2016, in the form of the TRADES / MART / HYDRA code's `wideresnet.py`
(without dropout): a bias-free 3x3 stem of 16 channels, three groups of n = (depth - 4) / 6
pre-activation BasicBlocks with 16k, 32k, 64k channels (k the widen factor) and strides
1, 2, 2, then BatchNorm, ReLU, global average pool and one dense layer.

Layer names are stable so configs can name what they prune: `conv1`, `bn1` (the final
BatchNorm, before the pool; the stem has none, as in that code, whose name this is), `fc`,
and per block `group{g}_block{i}/{bn1,conv1,bn2,conv2}` plus `shortcut_conv` where the
block projects its shortcut (that code's `block{g}.layer.{i-1}.*` and `convShortcut`).
Inputs are NHWC pixels in [0, 1]; no normalisation layer, so attacks act in pixel space
(as ResNet and VGG here). Padding is explicit, as in `resnet.py`, so stride-2 convs equal
PyTorch's `padding=1`; BatchNorm uses PyTorch's defaults (momentum 0.1 there, eps 1e-5).
Initialisation is Flax's default, as for the other models here, not that code's He init.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from robust_admm.models.layers import Conv, float32_logits
from robust_admm.models.resnet import _PAD1, _bn


class WideBasicBlock(nn.Module):
    """Pre-activation block: bn1 -> relu -> conv3x3(stride) -> bn2 -> relu -> conv3x3, plus
    the shortcut.

    The shortcut is a bias-free 1x1 conv (stride), without BatchNorm, when the stride or
    channel count changes, and it then takes the pre-activated input relu(bn1(x)), as in
    the TRADES code; else it is the identity on x.
    """

    features: int
    strides: int = 1
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        s = (self.strides, self.strides)
        o = nn.relu(_bn(train, "bn1", self.dtype)(x))
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = Conv(self.features, (1, 1), strides=s, padding="VALID", use_bias=False,
                            dtype=self.dtype, name="shortcut_conv")(o)
        h = Conv(self.features, (3, 3), strides=s, padding=_PAD1, use_bias=False,
                 dtype=self.dtype, name="conv1")(o)
        h = nn.relu(_bn(train, "bn2", self.dtype)(h))
        h = Conv(self.features, (3, 3), padding=_PAD1, use_bias=False, dtype=self.dtype,
                 name="conv2")(h)
        return h + shortcut


class WideResNet(nn.Module):
    """WRN-`depth`-`widen_factor`: conv1 -> three groups of WideBasicBlocks -> bn1 -> relu ->
    global average pool -> fc. `depth` must be 6n + 4 (n blocks per group).

    In train mode call `apply(..., train=True, mutable=['batch_stats'])`.
    """

    depth: int = 34
    widen_factor: int = 10
    num_classes: int = 10
    dtype: Any = None  # compute dtype (None: float32); see models.get_model

    def __post_init__(self):
        if (not isinstance(self.depth, int) or self.depth < 10 or (self.depth - 4) % 6):
            raise ValueError(f"WideResNet depth={self.depth!r} must be 6n + 4 with n >= 1")
        if not isinstance(self.widen_factor, int) or self.widen_factor < 1:
            raise ValueError(
                f"WideResNet widen_factor={self.widen_factor!r} must be a positive integer")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        n = (self.depth - 4) // 6
        x = Conv(16, (3, 3), padding=_PAD1, use_bias=False, dtype=self.dtype, name="conv1")(x)
        for group, (f, stride) in enumerate(zip((16, 32, 64), (1, 2, 2)), start=1):
            for i in range(1, n + 1):
                x = WideBasicBlock(f * self.widen_factor, stride if i == 1 else 1, self.dtype,
                                   name=f"group{group}_block{i}")(x, train)
        x = nn.relu(_bn(train, "bn1", self.dtype)(x))
        x = jnp.mean(x, axis=(1, 2))
        return float32_logits(nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x))


def _check_width(width) -> None:
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"model.width={width!r} must be a positive integer")


def wrn28_4(num_classes: int = 10, width: int = 1) -> WideResNet:
    """WRN-28-4 (4 blocks per group, 64-128-256 channels; 5,849,050 parameters at w = 1).
    `width` multiplies the widen factor, so every block conv's channels: w gives WRN-28-(4w);
    the 16-channel stem conv1 is the same at every w, as in every WRN."""
    _check_width(width)
    return WideResNet(depth=28, widen_factor=4 * width, num_classes=num_classes)


def wrn34_10(num_classes: int = 10, width: int = 1) -> WideResNet:
    """WRN-34-10, the TRADES / MART network (5 blocks per group, 160-320-640 channels;
    46,160,474 parameters at w = 1). `width` multiplies the widen factor, so every block
    conv's channels: w gives WRN-34-(10w); the 16-channel stem conv1 is the same at every w."""
    _check_width(width)
    return WideResNet(depth=34, widen_factor=10 * width, num_classes=num_classes)
