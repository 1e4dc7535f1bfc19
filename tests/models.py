"""Small models shared by the tests (random weights, nothing downloaded)."""

from __future__ import annotations

import torch
from torch import nn


class TinyConvNet(nn.Module):
    """conv-bn-relu x2 with a residual add, global pool, linear head."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        y = torch.relu(self.bn3(self.conv3(y)))
        return self.fc(y.mean(dim=(2, 3)))


class CatNet(nn.Module):
    """Two conv branches joined by ``torch.cat``, then a conv and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.left = nn.Conv2d(6, 4, 3, padding=1)
        self.right = nn.Conv2d(6, 5, 1)
        self.right_bn = nn.BatchNorm2d(5)
        self.merge = nn.Conv2d(9, 7, 3, padding=1)
        self.fc = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.stem(x)))
        y = torch.cat([torch.relu(self.left(y)), torch.relu(self.right_bn(self.right(y)))], dim=1)
        y = torch.relu(self.merge(y))
        return self.fc(y.mean(dim=(2, 3)))


class MHANet(nn.Module):
    """Linear embedding, one ``nn.MultiheadAttention`` with a residual, an MLP and a head."""

    def __init__(self, dim: int = 16, heads: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        h = h + a
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h.mean(dim=1))


class FusedQKVAttention(nn.Module):
    """A timm-style attention block: fused ``qkv`` Linear, unbind, SDPA, ``proj``."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))


class QKVNet(nn.Module):
    """Embedding, one fused-qkv attention block with a residual, and a head."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.attn = FusedQKVAttention(dim, heads)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(h)
        return self.head(h.mean(dim=1))


def conv_input(batch: int = 2, size: int = 8) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


def sequence_input(batch: int = 2, length: int = 5, features: int = 6) -> torch.Tensor:
    return torch.randn(batch, length, features)


def globally_pruned_convnet() -> nn.Module:
    """A ``TinyConvNet`` whose conv and linear weights went through
    ``torch.nn.utils.prune.global_unstructured`` (L1, 40 % of the weights); seeded, so every
    call returns the same model."""
    import torch.nn.utils.prune as prune

    torch.manual_seed(1234)
    model = TinyConvNet()
    targets = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=0.4)
    return model


def mha_case() -> tuple[nn.Module, torch.Tensor, dict]:
    """``(model, inputs, WeightTracker options)``: nn.MultiheadAttention with head units."""
    model = MHANet()
    return model, sequence_input(), {"num_heads": {model.attn: 4}, "prune_num_heads": True}


def vit_case() -> tuple[nn.Module, torch.Tensor, dict]:
    """``(model, inputs, options)``: timm's ViT-Ti at 32x32; heads and head dims overlap on qkv."""
    import pytest

    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10)
    heads = {b.attn.qkv: b.attn.num_heads for b in model.blocks}
    return model, torch.randn(1, 3, 32, 32), {"num_heads": heads, "prune_num_heads": True}
