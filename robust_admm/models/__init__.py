"""Model zoo: flax.linen modules with stable layer names, built by name from a config; or
a user's own flax.linen model by import path ('my_pkg.my_module:MyNet', `models.external`)."""
import dataclasses
import re

import jax.numpy as jnp

from robust_admm.models.alexnet import AlexNetBN, alexnet_bn
from robust_admm.models.apply import apply_model, init_variables, takes_train, uses_dropout
from robust_admm.models.external import check_model, is_import_path, parse_kwargs
from robust_admm.models.imagenet_resnet import (ImageNetResNet, imagenet_resnet18,
                                                imagenet_resnet50)
from robust_admm.models import external
from robust_admm.models.layers import NORMALIZATIONS
from robust_admm.models.imagenet_vgg import ImageNetVGG, imagenet_vgg16_bn
from robust_admm.models.lenet import LeNet, lenet5, lenet_adv, lenet_digits
from robust_admm.models.resnet import BasicBlock, ResNet, resnet8, resnet18
from robust_admm.models.vgg import VGG, vgg16
from robust_admm.models.wrn import WideBasicBlock, WideResNet, wrn28_4, wrn34_10

_BUILDERS = {
    "lenet_adv": lenet_adv,
    "lenet5": lenet5,
    "lenet_digits": lenet_digits,
    "vgg16": vgg16,
    "resnet18": resnet18,
    "resnet8": resnet8,
    "imagenet_resnet18": imagenet_resnet18,
    "imagenet_resnet50": imagenet_resnet50,
    "imagenet_vgg16_bn": imagenet_vgg16_bn,
    "alexnet_bn": alexnet_bn,
    "wrn28_4": wrn28_4,
    "wrn34_10": wrn34_10,
}


# model.dtype -> the modules' compute dtype. Parameters stay float32 (so do the optimizer
# and ADMM state, and BatchNorm statistics); logits come out in float32.
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}

# Any WideResNet by name: 'wrn{depth}_{widen factor}', e.g. 'wrn16_2' (depth 6n + 4).
_WRN_NAME = re.compile(r"wrn(\d+)_(\d+)")


def get_model(name: str, num_classes: int = 10, width: int = 1, dtype: str = "float32",
              normalize: str = "none", kwargs=""):
    """Builds the model `name`; `width` is the paper's width multiplier `w` where it applies;
    `dtype` the compute precision (one of DTYPES; bfloat16 for GPU and TPU); `normalize`
    the per-channel normalisation of the pixels inside the model (NORMALIZATIONS; only
    models with a `normalize` field have it). A `name` with a ':' is a user's model by
    import path, built with `kwargs` (`model.kwargs`: a JSON object; `models.external`)."""
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not allowed; allowed: {list(DTYPES)}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"model.normalize={normalize!r} is not allowed; allowed: "
                         f"{list(NORMALIZATIONS)}")
    if is_import_path(name):
        return external.build(name, num_classes, width, DTYPES[dtype], normalize, kwargs)
    if parse_kwargs(kwargs):
        raise ValueError(f"model.kwargs={kwargs!r} with model.name={name!r}: constructor "
                         f"arguments are for a model given by import path "
                         f"('my_pkg.my_module:MyNet'); the zoo's models take model.width")
    model = _build(name, num_classes, width)
    if normalize != "none":
        if not _normalizes(model):
            with_it = sorted(n for n, b in _BUILDERS.items() if _normalizes(b(num_classes=10)))
            raise ValueError(f"model.normalize={normalize!r}: model.name={name!r} has no "
                             f"normalisation layer; models with one: {with_it} (or "
                             f"model.normalize='none')")
        model = model.clone(normalize=normalize)
    return model if DTYPES[dtype] is None else model.clone(dtype=DTYPES[dtype])


def _normalizes(model) -> bool:
    return "normalize" in {f.name for f in dataclasses.fields(model)}


def _build(name: str, num_classes: int, width: int):
    wrn = _WRN_NAME.fullmatch(str(name))
    if name not in _BUILDERS and not wrn:
        raise ValueError(
            f"model.name={name!r} is not a known model; allowed: {sorted(_BUILDERS)} or "
            f"any WideResNet as 'wrn<depth>_<widen factor>' (depth 6n + 4), or your own "
            f"flax.linen model by import path, 'my_pkg.my_module:MyNet'"
        )
    if name != "lenet5" and (not isinstance(width, int) or width < 1):
        raise ValueError(f"model.width={width!r} must be a positive integer")
    if name not in _BUILDERS:
        depth, k = int(wrn.group(1)), int(wrn.group(2))
        try:
            return WideResNet(depth=depth, widen_factor=k * width, num_classes=num_classes)
        except ValueError as e:
            raise ValueError(f"model.name={name!r}: {e}") from None
    return _BUILDERS[name](num_classes=num_classes, width=width)


__all__ = [
    "AlexNetBN",
    "VGG",
    "BasicBlock",
    "LeNet",
    "ResNet",
    "WideBasicBlock",
    "WideResNet",
    "DTYPES",
    "NORMALIZATIONS",
    "alexnet_bn",
    "apply_model",
    "check_model",
    "get_model",
    "ImageNetResNet",
    "ImageNetVGG",
    "imagenet_resnet18",
    "imagenet_resnet50",
    "imagenet_vgg16_bn",
    "init_variables",
    "is_import_path",
    "lenet5",
    "lenet_adv",
    "lenet_digits",
    "resnet18",
    "resnet8",
    "takes_train",
    "uses_dropout",
    "vgg16",
    "wrn28_4",
    "wrn34_10",
]
