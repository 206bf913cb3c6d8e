"""LeNet family: two conv + max-pool blocks and two dense layers.

Layer names are stable (`conv1`, `conv2`, `fc1`, `fc2`) so configs can name what they prune.
Inputs are NHWC pixels in [0, 1]; no normalisation, so attacks act in pixel space.
"""
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from robust_admm.models.layers import Conv, float32_logits, max_pool_2x2


class LeNet(nn.Module):
    """conv1 -> relu -> pool -> conv2 -> relu -> pool -> fc1 -> relu -> fc2."""

    features: Sequence[int]  # output channels of conv1 and conv2
    hidden: int  # units of fc1
    num_classes: int = 10
    kernel_size: int = 5
    padding: str = "SAME"
    dtype: Any = None  # compute dtype (None: float32); see models.get_model

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        del train  # no BatchNorm or dropout in this family
        k = (self.kernel_size, self.kernel_size)
        for i, f in enumerate(self.features, start=1):
            x = Conv(f, k, padding=self.padding, dtype=self.dtype, name=f"conv{i}")(x)
            x = max_pool_2x2(nn.relu(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
        return float32_logits(nn.Dense(self.num_classes, dtype=self.dtype, name="fc2")(x))


def lenet_adv(num_classes: int = 10, width: int = 16) -> LeNet:
    """The adversarial MNIST LeNet of Madry et al. / Ye et al. with width multiplier `w`.

    w = 16 is conv 32 -> conv 64 -> fc 1024 (5x5 kernels, SAME padding); w = 1 is 2 -> 4 -> 64.
    """
    return LeNet(features=(2 * width, 4 * width), hidden=64 * width, num_classes=num_classes)


def lenet5(num_classes: int = 10, width: int = 1) -> LeNet:
    """LeNet-5 of the natural setting (20-50-500-10, 5x5 VALID convs); `width` scales it."""
    return LeNet(
        features=(20 * width, 50 * width),
        hidden=500 * width,
        num_classes=num_classes,
        padding="VALID",
    )


def lenet_digits(num_classes: int = 10, width: int = 4) -> LeNet:
    """A LeNet_adv sized for 8x8 digits: 3x3 kernels, 8x8 -> 4x4 -> 2x2, fc 16w."""
    return LeNet(
        features=(2 * width, 4 * width),
        hidden=16 * width,
        num_classes=num_classes,
        kernel_size=3,
    )
