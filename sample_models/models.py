"""Small BatchNorm models for the demo and the tests, sized for scikit-learn's 8x8 digits.

Each factory builds an untrained model; ``sample_models/<factory>.pt`` holds trained
weights as a state dict (``sample_models/train.py`` regenerates them). ``INPUT_SHAPES``
gives each model's input shape for one sample and :func:`shape_digits` turns a batch
of digit images into that shape.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

INPUT_SHAPES = {
    "digits_mlp": (1, 64),
    "digits_resnet": (1, 1, 8, 8),
    "digits_conv1d": (1, 1, 64),
    "volume_net": (1, 1, 4, 8, 8),
}
VOLUME_DEPTH = 4


def digits_mlp(hidden: int = 32, num_classes: int = 10) -> nn.Module:
    """Linear + BatchNorm1d on flat (N, 64) digits."""
    return nn.Sequential(nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn plus the identity, then relu."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


def digits_resnet(channels: int = 8, num_classes: int = 10) -> nn.Module:
    """A residual CNN with BatchNorm2d on (N, 1, 8, 8) digits."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        ResidualBlock(channels),
        nn.MaxPool2d(2),
        ResidualBlock(channels),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, num_classes),
    )


def digits_conv1d(channels: int = 8, num_classes: int = 10) -> nn.Module:
    """Conv1d + BatchNorm1d over (N, C, L) on digits read as a (N, 1, 64) signal."""
    return nn.Sequential(
        nn.Conv1d(1, channels, 5, padding=2),
        nn.BatchNorm1d(channels),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 5, stride=2, padding=2),
        nn.BatchNorm1d(channels),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 32, num_classes),
    )


def volume_net(channels: int = 6, num_classes: int = 10) -> nn.Module:
    """Conv3d + BatchNorm3d on (N, 1, 4, 8, 8) volumes (see :func:`shape_digits`)."""
    return nn.Sequential(
        nn.Conv3d(1, channels, 3, padding=1),
        nn.BatchNorm3d(channels),
        nn.ReLU(),
        nn.MaxPool3d(2),
        nn.Flatten(),
        nn.Linear(channels * 2 * 4 * 4, num_classes),
    )


def shape_digits(name: str, images: Tensor) -> Tensor:
    """(N, 8, 8) digit images (scaled to [0, 1]) as the input of model ``name``.

    The volume stacks each image shifted right by 0..3 pixels along the depth axis.
    """
    n = images.shape[0]
    if name == "volume_net":
        return torch.stack([torch.roll(images, shift, dims=-1) for shift in range(VOLUME_DEPTH)], dim=1).unsqueeze(1)
    return images.reshape((n,) + INPUT_SHAPES[name][1:])
