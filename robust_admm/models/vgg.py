"""VGG family for CIFAR-10 (32x32): 3x3 conv + BatchNorm + ReLU blocks, max-pools, one dense layer.

Layer names are stable (`conv1`..`convN`, `bn1`..`bnN`, `fc`) so configs can name what they prune.
Inputs are NHWC pixels in [0, 1]; no normalisation layer, so attacks act in pixel space.
"""
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from robust_admm.models.layers import Conv, float32_logits, max_pool_2x2

# The CIFAR VGG-16 layer list: output channels of each 3x3 conv, "M" for a 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M")


def vgg_features(x: jnp.ndarray, cfg: Sequence[int | str], train: bool, dtype=None):
    """VGG's feature layers, called inside a compact module's `__call__` (the layers are
    that module's `conv1`..`convN`, `bn1`..`bnN`): 3x3 conv (bias) -> BatchNorm (PyTorch's
    defaults) -> relu for each number of `cfg`, a 2x2 max-pool for each "M"."""
    i = 0
    for v in cfg:
        if v == "M":
            x = max_pool_2x2(x)
            continue
        i += 1
        x = Conv(int(v), (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, name=f"conv{i}")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=dtype, name=f"bn{i}")(x)
        x = nn.relu(x)
    return x


class VGG(nn.Module):
    """[conv (bias) -> BatchNorm -> relu | max-pool]* -> flatten -> fc.

    BatchNorm uses PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5); in train mode
    call `apply(..., train=True, mutable=['batch_stats'])`.
    """

    cfg: Sequence[int | str]  # channels of each conv, or "M" for a 2x2 max-pool
    num_classes: int = 10
    dtype: Any = None  # compute dtype (None: float32); see models.get_model

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = vgg_features(x, self.cfg, train, self.dtype)
        x = x.reshape(x.shape[0], -1)  # 1x1x512 on 32x32 inputs for VGG-16
        return float32_logits(nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x))


def vgg16(num_classes: int = 10, width: int = 1) -> VGG:
    """CIFAR VGG-16-BN (13 convs, one Linear(512, classes)); `width` multiplies every conv's
    channels (w = 1 is the standard 64..512 network, about 14.7M parameters)."""
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"model.width={width!r} must be a positive integer")
    cfg = tuple(v if v == "M" else v * width for v in VGG16_CFG)
    return VGG(cfg=cfg, num_classes=num_classes)
