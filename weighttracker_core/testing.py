"""Pytest fixtures for plugin authors, loaded through the ``pytest11`` entry point.

Inert unless used: fixtures only (no autouse fixtures, no pytest hooks), every name starts
with ``wt_``, and torch and the core are imported inside the fixtures.

* ``wt_plugin_manager(*plugins, builtins=True)``: a fresh plugin manager holding only
  weighttracker's own first-party plugins (or none, with ``builtins=False``) plus the
  plugins under test; other installed plugins and ``WEIGHTTRACKER_DISABLE_PLUGINS`` never
  leak in.
* ``wt_tiny_mlp(hidden=None)``: ``hidden`` (default ``Linear(4, 8)``) -> ReLU -> ``Linear(8, 3)``;
  input ``torch.zeros(1, 4)``.
* ``wt_tiny_convnet()``: conv-bn-relu, conv-bn with a residual, pool, linear; input 1x3x8x8.
* ``wt_tiny_attention()``: linear embedding, ``nn.MultiheadAttention`` (2 heads) with a
  residual, linear head; input 1x5x4.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


@pytest.fixture
def wt_plugin_manager() -> Callable[..., Any]:
    from .manager import create_plugin_manager

    def make(*plugins: Any, builtins: bool = True) -> Any:
        return create_plugin_manager(
            *plugins, entry_points=builtins, builtins_only=True, use_env=False
        )

    return make


@pytest.fixture
def wt_tiny_mlp() -> Callable[..., Any]:
    from torch import nn

    def make(hidden: Any = None) -> Any:
        return nn.Sequential(hidden if hidden is not None else nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    return make


@pytest.fixture
def wt_tiny_convnet() -> Callable[[], Any]:
    import torch
    from torch import nn

    class TinyConvNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: Any) -> Any:
            y = torch.relu(self.bn1(self.conv1(x)))
            y = torch.relu(self.bn2(self.conv2(y)) + y)
            return self.fc(y.mean(dim=(2, 3)))

    return TinyConvNet


@pytest.fixture
def wt_tiny_attention() -> Callable[[], Any]:
    from torch import nn

    class TinyAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x: Any) -> Any:
            h = self.embed(x)
            h = h + self.attn(h, h, h, need_weights=False)[0]
            return self.head(h.mean(dim=1))

    return TinyAttention
