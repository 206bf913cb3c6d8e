"""AlexNet with BatchNorm, as the ImageNet code of the robustness-aware ADMM pruning paper
defines it (Ye et al., "Adversarial robustness vs. model compression, or both?", ICCV
2019: `AlexNet_BN` of `ADMM_examples/imagenet/alexnet_bn.py`):

    conv1 11x11/4 (pad 2) 96   -> bn1 -> relu -> max-pool 3x3/2
    conv2 5x5 (pad 2) 256, 2 groups -> bn2 -> relu -> max-pool 3x3/2
    conv3 3x3 (pad 1) 384 -> bn3 -> relu
    conv4 3x3 (pad 1) 384 -> bn4 -> relu
    conv5 3x3 (pad 1) 256 -> bn5 -> relu -> max-pool 3x3/2
    -> flatten (C, H, W) 256*6*6 -> fc1 4096 -> fc1_bn -> relu -> fc2 4096 -> fc2_bn -> relu
    -> fc3

Every conv and fc has a bias; BatchNorm1d in the classifier stands where torchvision's
AlexNet has dropout: this network has none. Names follow the original's named variant
(`conv1`..`conv5`, `fc1`..`fc3`, `fc1_bn`, `fc2_bn`), with the convs' BatchNorms as
`bn1`..`bn5`. Inputs are NHWC pixels in [0, 1]; `normalize='imagenet'` puts ImageNet's
mean and std inside the model, so attacks still see pixels.

The original flattens a 6x6 map (`view(N, 256*6*6)`), which it gets from inputs of 223 to
254 px (224 the standard). Here an adaptive average pool to 6x6 (torchvision's bins, the
identity at those sizes) comes first, so any input of at least 63 px runs with the same
parameters; the flatten is channel-major, so `fc1`'s kernel is the original's weight
transposed.
"""
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from robust_admm.models.layers import (Conv, adaptive_avg_pool, flatten_chw, float32_logits,
                                       normalize_pixels)

SMALLEST_INPUT = 63  # px: below it conv5's map is smaller than the last 3x3 max-pool


def _bn(train: bool, name: str, dtype) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5)."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=dtype, name=name)


class AlexNetBN(nn.Module):
    """The original's AlexNet_BN (see the module docstring); no dropout. `features` (the
    five convs' output channels) and `hidden` (fc1's and fc2's) default to the original's;
    narrower ones run the same layers at a smaller cost."""

    num_classes: int = 1000
    features: Sequence[int] = (96, 256, 384, 384, 256)
    hidden: int = 4096
    dtype: Any = None  # compute dtype (None: float32); see models.get_model
    normalize: str = "none"  # a key of layers.NORMALIZATIONS, applied to the pixels

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if min(x.shape[1:3]) < SMALLEST_INPUT:
            raise ValueError(f"input of {x.shape[1]}x{x.shape[2]} px; alexnet_bn needs at "
                             f"least {SMALLEST_INPUT} px")
        if len(self.features) != 5:
            raise ValueError(f"features={tuple(self.features)}: AlexNet_BN has 5 convs")
        x = normalize_pixels(x, self.normalize)
        # (kernel, stride, padding, groups, max-pool after) of each conv
        convs = ((11, 4, 2, 1, True), (5, 1, 2, 2, True), (3, 1, 1, 1, False),
                 (3, 1, 1, 1, False), (3, 1, 1, 1, True))
        for i, (features, (k, stride, pad, groups, pool)) in enumerate(
                zip(self.features, convs), start=1):
            x = Conv(features, (k, k), strides=(stride, stride),
                     padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                     dtype=self.dtype, name=f"conv{i}")(x)
            x = nn.relu(_bn(train, f"bn{i}", self.dtype)(x))
            if pool:
                x = nn.max_pool(x, (3, 3), strides=(2, 2))
        x = flatten_chw(adaptive_avg_pool(x, (6, 6)))
        for j in (1, 2):
            x = nn.Dense(self.hidden, dtype=self.dtype, name=f"fc{j}")(x)
            x = nn.relu(_bn(train, f"fc{j}_bn", self.dtype)(x))
        return float32_logits(nn.Dense(self.num_classes, dtype=self.dtype, name="fc3")(x))


def alexnet_bn(num_classes: int = 1000, width: int = 1) -> AlexNetBN:
    """The ADMM robustness paper's AlexNet_BN (62,090,280 parameters at 1,000 classes)."""
    if width != 1:
        raise NotImplementedError(f"model.width={width!r}: alexnet_bn is built at width 1 "
                                  f"only (the original's network)")
    return AlexNetBN(num_classes=num_classes)
