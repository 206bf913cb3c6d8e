"""ResNet family for CIFAR-10 (32x32): a 3x3 stem without max-pool, four stages of blocks.

Layer names are stable so configs can name what they prune: `conv1`, `bn1`, `fc`, and per block
`layer{stage}_block{i}/{conv1,bn1,conv2,bn2}` plus `shortcut_conv`, `shortcut_bn` where the
block projects its shortcut. Inputs are NHWC pixels in [0, 1]; no normalisation layer, so
attacks act in pixel space.

Padding is explicit (1 on every side of a 3x3 conv, 0 for the 1x1 shortcut) so stride-2
outputs equal PyTorch's `padding=1` exactly; Flax's 'SAME' pads (0, 1) there instead.
"""
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from robust_admm.models.layers import Conv, float32_logits

_PAD1 = ((1, 1), (1, 1))


def _bn(train: bool, name: str, dtype=None) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5)."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=dtype, name=name)


class BasicBlock(nn.Module):
    """conv3x3(stride) -> bn -> relu -> conv3x3 -> bn, plus the shortcut, then relu.

    The shortcut is a 1x1 conv (stride) + bn when the stride or channel count changes,
    else the identity.
    """

    features: int
    strides: int = 1
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        s = (self.strides, self.strides)
        h = Conv(self.features, (3, 3), strides=s, padding=_PAD1, use_bias=False,
                 dtype=self.dtype, name="conv1")(x)
        h = nn.relu(_bn(train, "bn1", self.dtype)(h))
        h = Conv(self.features, (3, 3), padding=_PAD1, use_bias=False, dtype=self.dtype,
                 name="conv2")(h)
        h = _bn(train, "bn2", self.dtype)(h)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = Conv(self.features, (1, 1), strides=s, padding="VALID", use_bias=False,
                     dtype=self.dtype, name="shortcut_conv")(x)
            x = _bn(train, "shortcut_bn", self.dtype)(x)
        return nn.relu(h + x)


class ResNet(nn.Module):
    """conv1 -> bn1 -> relu -> stages of BasicBlocks -> global average pool -> fc.

    In train mode call `apply(..., train=True, mutable=['batch_stats'])`.
    """

    stage_sizes: Sequence[int]  # blocks per stage
    stage_features: Sequence[int]  # channels per stage; stage 1 has stride 1, the rest 2
    stem_features: int = 64
    num_classes: int = 10
    dtype: Any = None  # compute dtype (None: float32); see models.get_model

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = Conv(self.stem_features, (3, 3), padding=_PAD1, use_bias=False, dtype=self.dtype,
                 name="conv1")(x)
        x = nn.relu(_bn(train, "bn1", self.dtype)(x))
        for stage, (n, f) in enumerate(zip(self.stage_sizes, self.stage_features), start=1):
            for i in range(1, n + 1):
                strides = 2 if stage > 1 and i == 1 else 1
                x = BasicBlock(f, strides, self.dtype, name=f"layer{stage}_block{i}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return float32_logits(nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x))


def resnet18(num_classes: int = 10, width: int = 1) -> ResNet:
    """CIFAR ResNet-18 (2-2-2-2 BasicBlocks, 64-128-256-512 channels); `width` multiplies every
    conv's channels (w = 1 is the standard network, 11,173,962 parameters)."""
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"model.width={width!r} must be a positive integer")
    return ResNet(stage_sizes=(2, 2, 2, 2),
                  stage_features=tuple(c * width for c in (64, 128, 256, 512)),
                  stem_features=64 * width, num_classes=num_classes)


def resnet8(num_classes: int = 10, width: int = 1) -> ResNet:
    """A small ResNet (1-1-1 BasicBlocks, 16-32-64 channels, `width` times each) for
    trying a data path quickly (configs/imagenet.py:smoke), at any image size."""
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"model.width={width!r} must be a positive integer")
    return ResNet(stage_sizes=(1, 1, 1), stage_features=tuple(c * width for c in (16, 32, 64)),
                  stem_features=16 * width, num_classes=num_classes)
