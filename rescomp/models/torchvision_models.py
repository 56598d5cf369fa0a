"""torchvision classifiers with a CIFAR-sized head.

The head is replaced for `num_classes`; inputs are resized to data.image_size by the loader (the
Taylor-pruning paper uses 224). `pretrained: imagenet` loads torchvision's ImageNet weights through
its weights API (cached in ~/.cache/torch/hub; downloaded when missing) before the head is replaced.
`stem: cifar` gives ResNets the usual small-image stem (3x3 stride-1 conv, no max-pool).
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch.nn as nn
from torchvision import models as tvm

from rescomp.errors import ConfigError
from rescomp.models import register_model


def _tv(name: str, pretrained: Optional[str]) -> nn.Module:
    if pretrained is None:
        return tvm.get_model(name, weights=None)
    if pretrained != "imagenet":
        raise ValueError(f"pretrained must be null or 'imagenet', got {pretrained!r}")
    try:
        return tvm.get_model(name, weights="DEFAULT")
    except Exception as e:  # URLError offline, hash mismatch, ...
        raise ConfigError(
            f"could not load torchvision's ImageNet weights for {name} ({e}); they are fetched from "
            f"download.pytorch.org into ~/.cache/torch/hub/checkpoints: copy them there to work offline, "
            f"or set model.pretrained=null to train from scratch"
        ) from None


def _replace_last_linear(seq: nn.Sequential, num_classes: int) -> None:
    idx = max(i for i, m in enumerate(seq) if isinstance(m, nn.Linear))
    seq[idx] = nn.Linear(seq[idx].in_features, num_classes)


def _vgg_like(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, pretrained: Optional[str] = None) -> nn.Module:
        m = _tv(name, pretrained)
        _replace_last_linear(m.classifier, num_classes)
        return m

    return build


def _resnet(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, pretrained: Optional[str] = None,
              stem: Literal["imagenet", "cifar"] = "imagenet") -> nn.Module:
        m = _tv(name, pretrained)
        if stem == "cifar":
            m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            m.maxpool = nn.Identity()
        elif stem != "imagenet":
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        m.fc = nn.Linear(m.fc.in_features, num_classes)
        return m

    return build


def _squeezenet(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, pretrained: Optional[str] = None) -> nn.Module:
        m = _tv(name, pretrained)
        m.classifier[1] = nn.Conv2d(512, num_classes, 1)
        m.num_classes = num_classes
        return m

    return build


def _densenet(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 10, pretrained: Optional[str] = None) -> nn.Module:
        m = _tv(name, pretrained)
        m.classifier = nn.Linear(m.classifier.in_features, num_classes)
        return m

    return build


# min_input: the smallest square input each network's strides and pools accept (checked by hand).
for _name, _factory, _min, _summary in [
    ("vgg16", _vgg_like, 32, "torchvision VGG16 (no BN)"),
    ("vgg16_bn", _vgg_like, 32, "torchvision VGG16 with BatchNorm"),
    ("alexnet", _vgg_like, 63, "torchvision AlexNet"),
    ("resnet18", _resnet, 32, "torchvision ResNet18"),
    ("resnet50", _resnet, 32, "torchvision ResNet50"),
    ("squeezenet1_0", _squeezenet, 32, "torchvision SqueezeNet 1.0"),
    ("squeezenet1_1", _squeezenet, 32, "torchvision SqueezeNet 1.1"),
    ("densenet121", _densenet, 32, "torchvision DenseNet121"),
]:
    register_model(_name, min_input=_min, family="torchvision", summary=_summary)(_factory(_name))
