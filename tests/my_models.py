"""A model defined outside rescomp, as a user would bring one (model.arch: "my_models:build")."""

import torch.nn as nn


def build(num_classes: int = 10, width: int = 8) -> nn.Module:
    """Two convs and a linear head: a user's own network."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


build.family = "user-cnn"

NOT_A_BUILDER = 3


def no_classes(width: int = 8) -> nn.Module:
    return nn.Linear(width, 2)
