"""ResNet-18 and ResNet-50 for ImageNet, in torchvision's layout (v1.5: a Bottleneck
strides in its 3x3 conv), so that parameter counts, shapes and names map one to one onto
torchvision's checkpoints.

    conv1 (7x7/2) -> bn1 -> relu -> max-pool (3x3/2) -> layer1..layer4 -> mean -> fc

Layer names: `conv1`, `bn1`, `fc`, and per block `layer{stage}_{index}/{conv1,bn1,conv2,
bn2[,conv3,bn3]}` plus `downsample_conv`, `downsample_bn` where the block projects its
shortcut (torchvision's `layer1.0.conv1`, `layer2.0.downsample.0`, ...). Inputs are NHWC
pixels in [0, 1]; `normalize='imagenet'` subtracts ImageNet's mean and divides by its std
as the model's first operation (what torchvision's and timm's weights expect), so attacks
still act on pixels. Padding is explicit, as PyTorch pads, at any input size.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from robust_admm.models.layers import Conv, float32_logits, normalize_pixels


def _bn(train: bool, name: str, dtype=None) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5)."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=dtype, name=name)


def _conv(features: int, k: int, stride: int, name: str, dtype) -> Conv:
    pad = (k - 1) // 2
    return Conv(features, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                use_bias=False, dtype=dtype, name=name)


class Block(nn.Module):
    """BasicBlock (two 3x3 convs, expansion 1) or Bottleneck (1x1, 3x3 with the stride,
    1x1 to 4x the width), with torchvision's projection shortcut where the stride or the
    channel count changes."""
    width: int
    stride: int
    bottleneck: bool
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        out_features = self.width * (4 if self.bottleneck else 1)
        if self.bottleneck:
            h = nn.relu(_bn(train, "bn1", self.dtype)(
                _conv(self.width, 1, 1, "conv1", self.dtype)(x)))
            h = nn.relu(_bn(train, "bn2", self.dtype)(
                _conv(self.width, 3, self.stride, "conv2", self.dtype)(h)))
            h = _bn(train, "bn3", self.dtype)(_conv(out_features, 1, 1, "conv3", self.dtype)(h))
        else:
            h = nn.relu(_bn(train, "bn1", self.dtype)(
                _conv(self.width, 3, self.stride, "conv1", self.dtype)(x)))
            h = _bn(train, "bn2", self.dtype)(_conv(self.width, 3, 1, "conv2", self.dtype)(h))
        if self.stride != 1 or x.shape[-1] != out_features:
            x = _bn(train, "downsample_bn", self.dtype)(
                _conv(out_features, 1, self.stride, "downsample_conv", self.dtype)(x))
        return nn.relu(h + x)


class ImageNetResNet(nn.Module):
    """torchvision's ResNet: `blocks` per stage at widths 64, 128, 256, 512 (x `width`)."""
    blocks: tuple
    bottleneck: bool
    num_classes: int = 1000
    width: int = 1
    dtype: Any = None  # compute dtype (None: float32); see models.get_model
    normalize: str = "none"  # a key of layers.NORMALIZATIONS, applied to the pixels

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = normalize_pixels(x, self.normalize)
        x = _conv(64 * self.width, 7, 2, "conv1", self.dtype)(x)
        x = nn.relu(_bn(train, "bn1", self.dtype)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, n in enumerate(self.blocks, start=1):
            for i in range(n):
                stride = 2 if stage > 1 and i == 0 else 1
                x = Block(64 * self.width * 2 ** (stage - 1), stride, self.bottleneck,
                          self.dtype, name=f"layer{stage}_{i}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return float32_logits(nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x))


def imagenet_resnet18(num_classes: int = 1000, width: int = 1) -> ImageNetResNet:
    """torchvision's resnet18 (11,689,512 parameters at 1,000 classes)."""
    return ImageNetResNet(blocks=(2, 2, 2, 2), bottleneck=False, num_classes=num_classes,
                          width=width)


def imagenet_resnet50(num_classes: int = 1000, width: int = 1) -> ImageNetResNet:
    """torchvision's resnet50, v1.5 (25,557,032 parameters at 1,000 classes)."""
    return ImageNetResNet(blocks=(3, 4, 6, 3), bottleneck=True, num_classes=num_classes,
                          width=width)
