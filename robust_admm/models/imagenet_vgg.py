"""VGG-16 with BatchNorm for ImageNet, in torchvision's layout (`vgg16_bn`), so that
parameter counts, shapes and names map one to one onto torchvision's checkpoints.

    [conv 3x3 (bias) -> BatchNorm -> relu | max-pool 2x2]*  (13 convs, 5 pools)
    -> adaptive average pool to 7x7 -> flatten (C, H, W) -> fc1 -> relu -> dropout
    -> fc2 -> relu -> dropout -> fc3

Layer names: `conv1`..`conv13`, `bn1`..`bn13`, `fc1`..`fc3` (torchvision's
`features.{0,3,7,...}`, `features.{1,4,8,...}`, `classifier.{0,3,6}`). The feature map is
flattened in torchvision's channel-major order (transposed to NCHW first), so `fc1`'s
kernel is exactly torchvision's `classifier.0.weight.T`. Inputs are NHWC pixels in [0, 1];
`normalize='imagenet'` subtracts ImageNet's mean and divides by its std inside the model
(what torchvision's weights expect), so attacks still see pixels. Any input of at
least 32 px runs: the adaptive pool is the identity at 224 px and averages torchvision's
bins elsewhere, so the parameters are the same at every size.
"""
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from robust_admm.models.layers import (adaptive_avg_pool, flatten_chw, float32_logits,
                                       normalize_pixels)
from robust_admm.models.vgg import VGG16_CFG, vgg_features


class ImageNetVGG(nn.Module):
    """torchvision's VGG with BatchNorm: convs as `cfg` lists them ("M" a 2x2 max-pool),
    then the 7x7 adaptive pool and a classifier of two `hidden`-wide layers.

    BatchNorm uses PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5). Dropout
    (`dropout_rate` after fc1 and fc2) drops only with `train=True` and a 'dropout' rng
    given (`apply_model(..., dropout_key=key)`): the training step's forward passes draw
    masks; the attack's passes (train mode, for BatchNorm's batch statistics, but no rng)
    and evaluation see the deterministic network.
    """

    cfg: Sequence[int | str] = VGG16_CFG
    num_classes: int = 1000
    hidden: int = 4096
    dropout_rate: float = 0.5
    dtype: Any = None  # compute dtype (None: float32); see models.get_model
    normalize: str = "none"  # a key of layers.NORMALIZATIONS, applied to the pixels

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        smallest = 2 ** sum(v == "M" for v in self.cfg)
        if min(x.shape[1:3]) < smallest:
            raise ValueError(f"input of {x.shape[1]}x{x.shape[2]} px; this VGG needs at "
                             f"least {smallest} px (one per 2x2 max-pool halving)")
        x = normalize_pixels(x, self.normalize)
        x = vgg_features(x, self.cfg, train, self.dtype)
        x = flatten_chw(adaptive_avg_pool(x, (7, 7)))
        deterministic = not (train and self.has_rng("dropout"))
        for j in (1, 2):
            x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name=f"fc{j}")(x))
            x = nn.Dropout(self.dropout_rate, deterministic=deterministic,
                           name=f"dropout{j}")(x)
        return float32_logits(nn.Dense(self.num_classes, dtype=self.dtype, name="fc3")(x))


def imagenet_vgg16_bn(num_classes: int = 1000, width: int = 1) -> ImageNetVGG:
    """torchvision's vgg16_bn (138,365,992 parameters at 1,000 classes)."""
    if width != 1:
        raise NotImplementedError(f"model.width={width!r}: imagenet_vgg16_bn is built at "
                                  f"width 1 only (torchvision's network)")
    return ImageNetVGG(num_classes=num_classes)
