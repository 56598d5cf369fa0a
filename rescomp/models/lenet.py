"""LeNet-5 as Caffe defines it and Han et al. 2015 / 2016 prune and compress it (their "LeNet-5", 431K
parameters on 28x28 MNIST; sep-net-slides.txt, "Weight Pruning" results: 12x fewer weights).

conv 20 @ 5x5 -> max-pool 2 -> conv 50 @ 5x5 -> max-pool 2 -> fully connected 500 -> ReLU -> fully
connected to the classes (for `input_size` x `input_size` inputs, 32 by default). Caffe's definition has no nonlinearity after the convolutions; kept so. On
CIFAR (3 x 32 x 32) the first fully connected layer takes 50 x 5 x 5 = 1250 inputs: 657,080 parameters,
95 % of them in the fully connected layers, which is why Deep Compression stores it 39x smaller.
"""

from __future__ import annotations

import torch.nn as nn

from rescomp.models import register_model


def _flat_side(input_size: int) -> int:
    return ((input_size - 4) // 2 - 4) // 2


@register_model("lenet5", min_input=32, family="lenet",
                summary="Caffe's LeNet-5 (Han et al.'s Deep Compression network), fully connected 500")
def lenet5(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    side = _flat_side(input_size)
    if side < 1:
        raise ValueError(f"lenet5 needs input_size of at least 16, got {input_size}")
    return nn.Sequential(
        nn.Conv2d(in_channels, 20, 5), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * side * side, 500), nn.ReLU(inplace=True),
        nn.Linear(500, num_classes),
    )
