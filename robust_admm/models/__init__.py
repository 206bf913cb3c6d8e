"""Model zoo: flax.linen modules with stable layer names, built by name from a config."""
import re

from robust_admm.models.lenet import LeNet, lenet5, lenet_adv, lenet_digits
from robust_admm.models.resnet import BasicBlock, ResNet, resnet18
from robust_admm.models.vgg import VGG, vgg16
from robust_admm.models.wrn import WideBasicBlock, WideResNet, wrn28_4, wrn34_10

_BUILDERS = {
    "lenet_adv": lenet_adv,
    "lenet5": lenet5,
    "lenet_digits": lenet_digits,
    "vgg16": vgg16,
    "resnet18": resnet18,
    "wrn28_4": wrn28_4,
    "wrn34_10": wrn34_10,
}


# Any WideResNet by name: 'wrn{depth}_{widen factor}', e.g. 'wrn16_2' (depth 6n + 4).
_WRN_NAME = re.compile(r"wrn(\d+)_(\d+)")


def get_model(name: str, num_classes: int = 10, width: int = 1):
    """Builds the model `name`; `width` is the paper's width multiplier `w` where it applies."""
    wrn = _WRN_NAME.fullmatch(str(name))
    if name not in _BUILDERS and not wrn:
        raise ValueError(
            f"model.name={name!r} is not a known model; allowed: {sorted(_BUILDERS)} or "
            f"any WideResNet as 'wrn<depth>_<widen factor>' (depth 6n + 4)"
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
    "VGG",
    "BasicBlock",
    "LeNet",
    "ResNet",
    "WideBasicBlock",
    "WideResNet",
    "get_model",
    "lenet5",
    "lenet_adv",
    "lenet_digits",
    "resnet18",
    "vgg16",
    "wrn28_4",
    "wrn34_10",
]
