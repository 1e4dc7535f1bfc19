"""weighttracker-timm: attention heads of timm models as weighttracker units.

Installed next to ``weighttracker``, its ``timm_vit`` integration applies itself to timm
ViT / DeiT / Swin models; the helpers below are for explicit use.
"""

from __future__ import annotations

from .vit import infer_vit_num_heads, sync_vit_attention_metadata

__all__ = ["infer_vit_num_heads", "sync_vit_attention_metadata"]
