"""Small, fast timm models (random weights) and independent head arithmetic for the tests."""

from __future__ import annotations

import torch
from torch import nn

# name -> (create_model kwargs, input side); inputs are 1x3xSxS or 2x3xSxS
MODELS = {
    "vit_tiny_patch16_224": ({"img_size": 32}, 32),
    "vit_small_patch16_224": ({"img_size": 32}, 32),
    "deit_tiny_patch16_224": ({"img_size": 32}, 32),
    "swin_tiny_patch4_window7_224": ({"img_size": 64, "window_size": 4}, 64),
}


def make(name: str, batch: int = 2, **overrides) -> tuple[nn.Module, torch.Tensor]:
    """``(model in eval mode, input)``; Swin's bias tables get unit-variance values.

    timm initialises ``relative_position_bias_table`` with std 0.02, too small for a
    parity test to notice a column given to the wrong head; N(0, 1) makes it visible.
    """
    import timm

    kwargs, side = MODELS[name]
    model = timm.create_model(name, pretrained=False, num_classes=10, **{**kwargs, **overrides})
    with torch.no_grad():
        for module in model.modules():
            table = getattr(module, "relative_position_bias_table", None)
            if isinstance(table, nn.Parameter):
                table.normal_()
    return model.eval(), torch.randn(batch, 3, side, side)


def attentions(model: nn.Module) -> dict[str, nn.Module]:
    """Every module with a fused ``qkv`` Linear and ``num_heads``, by name."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "num_heads")
    }


def head_rows(attn: nn.Module, head: int) -> torch.Tensor:
    """Rows of ``qkv.weight`` of one head: q, k and v are ``[3, heads, head_dim]``."""
    heads = attn.num_heads
    dim = attn.qkv.out_features // (3 * heads)
    return attn.qkv.weight.detach().view(3, heads, dim, -1)[:, head]


def head_columns(attn: nn.Module, head: int) -> torch.Tensor:
    """Columns of ``proj.weight`` that read one head (heads are concatenated in order)."""
    heads = attn.num_heads
    dim = attn.proj.in_features // heads
    return attn.proj.weight.detach().view(attn.proj.out_features, heads, dim)[:, head]


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)
