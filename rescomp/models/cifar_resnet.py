"""CIFAR ResNets (He et al. 2016, section 4.2): 3 stages of 16/32/64 filters at 32/16/8 pixels.

Basic-block networks have depth 6n+2 (ResNet-20/32/44/56/110). Shortcut option A pads the
subsampled identity with zero channels (no parameters, what He et al. used on CIFAR); option B
projects with a 1x1 conv + BN where the shape changes. The bottleneck network has units of
1x1-3x3-1x1 convs with 4x expansion (depth 9n+2; ResNet-56 = 3 stages x 6 units x 3 convs + 2) and
projection shortcuts where the shape changes, as in the residual-block-deletion paper.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from rescomp.errors import ConfigError
from rescomp.models import register_model


class PadShortcut(nn.Module):
    """Option A: subsample spatially, zero-pad the new channels."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def projection(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != planes:
            self.shortcut = PadShortcut(in_ch, planes, stride) if shortcut == "A" else projection(in_ch, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = projection(in_ch, out_ch, stride)  # a bottleneck always projects

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class CifarResNet(nn.Module):
    def __init__(self, block: str, units: list[int], num_classes: int, width: int, shortcut: str) -> None:
        super().__init__()
        cls = BLOCKS[block]
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_ch = width
        for i, n in enumerate(units):
            planes = width * 2**i
            stage = []
            for j in range(n):
                stage.append(cls(in_ch, planes, 2 if (i > 0 and j == 0) else 1, shortcut))
                in_ch = planes * cls.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(units)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def units_for_depth(depth: int, block: str) -> int:
    per_unit = 2 if block == "basic" else 3
    if depth < 2 or (depth - 2) % (3 * per_unit):
        raise ValueError(f"depth {depth} is not {3 * per_unit}n+2 for {block} blocks")
    return (depth - 2) // (3 * per_unit)


@register_model("cifar_resnet", family="cifar-resnet", summary="CIFAR ResNet of any depth, block, width")
def cifar_resnet(
    num_classes: int = 10,
    depth: int = 20,
    block: Literal["basic", "bottleneck"] = "basic",
    shortcut: Literal["A", "B"] = "A",
    width: int = 16,
    units_per_stage: Optional[list[int]] = None,
) -> CifarResNet:
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {block!r}")
    if shortcut not in ("A", "B"):
        raise ValueError(f"shortcut must be 'A' (zero-pad identity) or 'B' (1x1 projection), got {shortcut!r}")
    units = list(units_per_stage) if units_per_stage else [units_for_depth(depth, block)] * 3
    if any(u < 1 for u in units):
        raise ValueError("every stage needs at least one unit")
    return CifarResNet(block, units, num_classes, width, shortcut)


def _basic(depth: int):
    def build(num_classes: int = 10, shortcut: Literal["A", "B"] = "A", width: int = 16) -> CifarResNet:
        return cifar_resnet(num_classes, depth, "basic", shortcut, width)

    return build


for _d in (20, 32, 44, 56, 110):
    register_model(f"resnet{_d}", family="cifar-resnet", summary=f"He et al. 2016 CIFAR ResNet-{_d}, basic blocks")(_basic(_d))


@register_model("resnet56_bottleneck", family="cifar-resnet",
                summary="CIFAR ResNet-56 of bottleneck units (3 x 6 x 3 convs + 2), projection shortcuts")
def resnet56_bottleneck(num_classes: int = 10, width: int = 16) -> CifarResNet:
    return cifar_resnet(num_classes, 56, "bottleneck", "B", width)


# The block and shortcut behind each named CIFAR ResNet (its builder does not take them).
_FIXED = {"resnet56_bottleneck": {"block": "bottleneck", "shortcut": "B"},
          **{f"resnet{d}": {"block": "basic"} for d in (20, 32, 44, 56, 110)}}


def regular_spec(spec: dict[str, Any], units: int) -> dict[str, Any]:
    """The regular network of `spec`'s family (block, shortcut, width, number of stages) with `units`
    units in every stage, as a cifar_resnet spec: the residual-block-deletion paper's comparison
    networks (section 4.2.2: ResNet-56 of bottleneck units down to 11 layers, 6, 5, ..., 1 units per
    stage). Structural transforms of `spec` (gates, deleted units) are not carried over."""
    arch = spec["arch"]
    if arch != "cifar_resnet" and arch not in _FIXED:
        raise ConfigError(f"no regular family for model '{arch}': regular baselines need a CIFAR ResNet "
                          f"(cifar_resnet, {', '.join(_FIXED)})")
    args = {"block": "basic", "shortcut": "A", "width": 16,
            **{k: spec[k] for k in ("block", "shortcut", "width") if k in spec}, **_FIXED.get(arch, {})}
    stages = len(spec.get("units_per_stage") or [None] * 3)
    return {"arch": "cifar_resnet", "num_classes": spec["num_classes"], **args, "units_per_stage": [units] * stages}
