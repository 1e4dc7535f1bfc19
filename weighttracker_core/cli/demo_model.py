"""The demo's model and data: a small residual CNN on scikit-learn's handwritten digits.

``load_digits()`` reads the 1,797 8x8 grey-scale digits (UCI optical recognition data set)
that ship inside the scikit-learn wheel, so nothing is downloaded. scikit-learn is an
optional dependency (``pip install 'weighttracker[demo]'``), imported only here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import attrs
import torch
from torch import nn

from ..errors import MissingDependencyError

NUM_CLASSES = 10
IMAGE_SIZE = 8

INSTALL_HINT = "python -m pip install 'weighttracker[demo]' (or: python -m pip install scikit-learn)"


@attrs.frozen
class Digits:
    """Train and test images ``[N, 1, 8, 8]`` (standardized) with labels ``[N]``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> Digits:
    """scikit-learn's digits, split stratified into train and test sets by ``seed``.

    Pixels (0..16) are standardized with the training set's mean and standard deviation.

    Raises:
        MissingDependencyError: scikit-learn is not installed (the message says how to
            install it).
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise MissingDependencyError(
            "weighttracker demo trains on scikit-learn's handwritten digits, and scikit-learn "
            f"is not installed. Install it with: {INSTALL_HINT}. Cause: {err}"
        ) from err
    digits = sklearn_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        digits.images, digits.target, test_size=test_fraction, random_state=seed,
        stratify=digits.target)

    def images(array: object) -> torch.Tensor:
        return torch.as_tensor(array, dtype=torch.float32).unsqueeze(1)

    train, test = images(train_x), images(test_x)
    mean, std = train.mean(), train.std()
    return Digits(train_x=(train - mean) / std, train_y=torch.as_tensor(train_y, dtype=torch.long),
                  test_x=(test - mean) / std, test_y=torch.as_tensor(test_y, dtype=torch.long))


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

    With ``width=16`` on 1x8x8 digits: 16 channels at 8x8, 32 channels at 4x4, about 28k
    parameters and 0.67M MACs per image.
    """

    def __init__(self, width: int = 16, in_channels: int = 1, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
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


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` classified correctly, in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = (model(images).argmax(dim=1) == labels).float().mean().item()
    model.train(was_training)
    return correct


def latency_ms(models: Sequence[nn.Module], images: torch.Tensor, repeats: int = 40) -> list[float]:
    """Median wall time of an eval-mode forward pass over ``images`` for each model, in ms.

    The models take turns, one pass each per round, so that a busy machine slows them all
    alike and their ratios stay meaningful.
    """
    modes = [m.training for m in models]
    for model in models:
        model.eval()
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for round_ in range(repeats + 3):
            for model, out in zip(models, times):
                start = time.perf_counter()
                model(images)
                if round_ >= 3:  # the first rounds warm up the allocator and caches
                    out.append(time.perf_counter() - start)
    for model, mode in zip(models, modes):
        model.train(mode)
    return [1000 * statistics.median(t) for t in times]


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
