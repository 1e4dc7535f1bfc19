"""The demo's embedded model and synthetic task (random weights; nothing downloaded).

The task: 16x16 RGB noise images with one coloured blob; the class is the image quadrant
the blob sits in (4 classes), and every class has its own blob colour. A small CNN learns
it within a few hundred steps, and needs far fewer channels than it has, so group lasso
has something to remove.
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_SIZE = 16
NUM_CLASSES = 4
#: Blob colour of each class (RGB weights).
_COLORS = torch.tensor([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.2, 0.2, 1.0], [0.8, 0.8, 0.1]])


class ResidualBlock(nn.Module):
    """conv-bn-relu, conv-bn, plus the input, relu."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class DemoNet(nn.Module):
    """Stem, residual block, strided conv, residual block, global pool, linear head.

    With ``width=16``: 16 channels at 16x16, 32 channels at 8x8, about 30k parameters and
    3M MACs per image.
    """

    def __init__(self, width: int = 16, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.block1 = ResidualBlock(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(2 * width)
        self.block2 = ResidualBlock(2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.block1(x)
        x = torch.relu(self.down_bn(self.down(x)))
        x = self.block2(x)
        return self.head(x.mean(dim=(2, 3)))


def synthetic_images(
    count: int, generator: torch.Generator, noise: float = 0.7
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images ``[count, 3, 16, 16]`` and their labels ``[count]``.

    Class ``k`` puts a Gaussian blob (radius about 2 pixels) of colour ``k`` near the
    centre of quadrant ``k`` (row-major: top-left, top-right, bottom-left, bottom-right),
    jittered by up to 2 pixels, on Gaussian noise of standard deviation ``noise``.
    """
    labels = torch.randint(NUM_CLASSES, (count,), generator=generator)
    quarter = IMAGE_SIZE // 4
    rows = (labels // 2) * 2 * quarter + quarter
    cols = (labels % 2) * 2 * quarter + quarter
    jitter = torch.randint(-2, 3, (2, count), generator=generator)
    grid = torch.arange(IMAGE_SIZE, dtype=torch.float32)
    dy = grid.view(1, -1, 1) - (rows + jitter[0]).view(-1, 1, 1)
    dx = grid.view(1, 1, -1) - (cols + jitter[1]).view(-1, 1, 1)
    blob = torch.exp(-(dy**2 + dx**2) / 8.0)
    images = noise * torch.randn(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    images += 2.0 * _COLORS[labels].view(count, 3, 1, 1) * blob.unsqueeze(1)
    return images, labels


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` classified correctly, in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = (model(images).argmax(dim=1) == labels).float().mean().item()
    model.train(was_training)
    return correct


def recalibrate_batch_norm_(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> None:
    """Recompute every BatchNorm's running statistics from ``images`` (weights unchanged).

    The proximal step keeps shrinking weights, so the running averages collected during
    training lag behind the final weights; eval-mode accuracy then misleads. A cumulative
    average over a pass of the training images fixes the statistics.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was_training = model.training
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size])
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.train(was_training)
