"""ResNet50V2 in the Keras layout (keras.applications.ResNet50V2), for 32x32 CIFAR inputs.

Kastanos 2020 builds its three variants from this network; the layout, from Keras' source:
- stem: ZeroPadding2D(3), 7x7 conv, stride 2, with bias (no BN or ReLU: the blocks are
  pre-activation), then ZeroPadding2D(1) and a 3x3 max-pool, stride 2, without padding. The pool's
  pad is zeros, not the -inf of a padded nn.MaxPool2d: with no ReLU before it, a border window whose
  values are all negative gives 0 here (as in Keras), not its largest negative value;
- 4 stacks of 3/4/6/3 blocks with 64/128/256/512 filters; a block is BN+ReLU (pre-activation), 1x1
  (no bias) + BN + ReLU, 3x3 (no bias) + BN + ReLU, 1x1 to 4x filters (with bias), added to the
  shortcut. The first block of a stack takes a 1x1 conv shortcut (with bias) from the
  pre-activation; the last block carries the stride (2, but 1 in the last stack), with a 1x1
  max-pool of stride 2 as its shortcut; other shortcuts are the identity;
- a final BN + ReLU, global average pooling and the classifier.
BatchNorm eps is Keras' 1.001e-5. With 10 classes: 23,539,850 trainable parameters, and 45,440 BN
moving means and variances that Keras also counts, 23,585,290 in all (paper, Table 1).

`variant: spatial | depthwise` replaces every 3x3 conv inside the blocks (not the stem) through
rescomp.compress.separable, as the paper does.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from rescomp.models import register_model

EPS = 1.001e-5  # Keras ResNetV2's BatchNormalization epsilon


class BlockV2(nn.Module):
    def __init__(self, in_ch: int, filters: int, stride: int, conv_shortcut: bool) -> None:
        super().__init__()
        out_ch = 4 * filters
        self.preact_bn = nn.BatchNorm2d(in_ch, eps=EPS)
        if conv_shortcut:
            self.shortcut: nn.Module = nn.Conv2d(in_ch, out_ch, 1, stride, bias=True)
        elif stride > 1:
            self.shortcut = nn.MaxPool2d(1, stride)
        else:
            self.shortcut = nn.Identity()
        self.conv_shortcut = conv_shortcut
        self.conv1 = nn.Conv2d(in_ch, filters, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters, eps=EPS)
        self.conv2 = nn.Conv2d(filters, filters, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(filters, eps=EPS)
        self.conv3 = nn.Conv2d(filters, out_ch, 1, bias=True)
        # One ReLU module per use (none has state, so state_dicts are unchanged): torch.export groups
        # the calls of one module into one source partition, and a shared ReLU's partition has three
        # outputs, which torchao's X86InductorQuantizer refuses ("Input partition has more than one
        # output node"), so the network could not be quantized through PT2E.
        self.preact_relu, self.relu1, self.relu2 = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.preact_relu(self.preact_bn(x))
        shortcut = self.shortcut(preact if self.conv_shortcut else x)
        out = self.relu1(self.bn1(self.conv1(preact)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return shortcut + self.conv3(out)


class ResNet50V2(nn.Module):
    def __init__(self, num_classes: int = 10, blocks: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=True)  # a conv's own padding is zeros, as ZeroPadding2D(3)
        self.pad1 = nn.ZeroPad2d(1)  # Keras' ZeroPadding2D(1); no parameters, so state_dicts are unchanged
        self.pool1 = nn.MaxPool2d(3, 2)
        in_ch, stacks = 64, []
        for i, (n, filters) in enumerate(zip(blocks, (64, 128, 256, 512))):
            last_stride = 1 if i == len(blocks) - 1 else 2
            layers = [BlockV2(in_ch, filters, 1, conv_shortcut=True)]
            layers += [BlockV2(4 * filters, filters, 1, False) for _ in range(n - 2)]
            layers += [BlockV2(4 * filters, filters, last_stride, False)]
            stacks.append(nn.Sequential(*layers))
            in_ch = 4 * filters
        self.stacks = nn.Sequential(*stacks)
        self.post_bn = nn.BatchNorm2d(in_ch, eps=EPS)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stacks(self.pool1(self.pad1(self.conv1(x))))
        x = self.relu(self.post_bn(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("resnet50v2", min_input=32, family="resnet-v2",
                summary="Keras ResNet50V2 (pre-activation) at 32x32; variant full | spatial | depthwise")
def resnet50v2(num_classes: int = 10, variant: Literal["full", "spatial", "depthwise"] = "full") -> nn.Module:
    model = ResNet50V2(num_classes)
    if variant == "full":
        return model
    if variant not in ("spatial", "depthwise"):
        raise ValueError(f"variant must be full, spatial or depthwise, got {variant!r}")
    from rescomp.compress.separable import separate

    return separate(model, {"mode": variant, "include": ["stacks.*.conv2"]})[0]
