"""The timm attention classes whose heads weighttracker can count, prune and resync.

Each supported class computes ``qkv = self.qkv(x)`` with a fused ``nn.Linear`` laid out as
``[q; k; v]``, each ``num_heads * head_dim`` rows in head-major order, and feeds
``self.proj`` with the heads concatenated in the same order. That is the layout the core
builds head units from (a head owns its q, k and v rows and its ``proj`` input columns; a
head dimension owns one row of every head in q, k and v, and one ``proj`` column per head).

What the forward reads besides the two projections differs per class, and is what a
:class:`AttentionLayout` records:

* ``timm.layers.Attention`` (VisionTransformer, DeiT, and every timm model built from
  ``timm.models.vision_transformer.Block``): ``num_heads``, ``head_dim`` (the reshape),
  ``attn_dim`` (the reshape before ``proj``) and ``scale`` (the explicit path only).
* ``timm.models.swin_transformer.WindowAttention`` (Swin): ``num_heads`` (reshapes and the
  shifted-window mask), ``scale`` (explicit path), and ``relative_position_bias_table``,
  a per-head parameter with one column per head.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention
from torch import nn


@attrs.frozen(kw_only=True)
class AttentionLayout:
    """What one timm attention class stores about its heads.

    Attributes:
        module_type: The attention class (matched exactly: a subclass may read more).
        family: Human-readable model family, for messages and docs.
        head_dim_attr: Attribute holding the head size, if the class stores one.
        width_attrs: Attributes holding ``num_heads * head_dim``.
        head_params: Parameters with one slice per head, as ``(name, dim)``.
        head_norms: Submodules that normalize over ``head_dim`` (they would need the
            same head dimensions removed, and zeroed dimensions still count in their
            statistics, so head-dim pruning is refused where they are real layers).
    """

    module_type: type[nn.Module]
    family: str
    head_dim_attr: str | None = None
    width_attrs: tuple[str, ...] = ()
    head_params: tuple[tuple[str, int], ...] = ()
    head_norms: tuple[str, ...] = ()


LAYOUTS: tuple[AttentionLayout, ...] = (
    AttentionLayout(
        module_type=Attention,
        family="VisionTransformer / DeiT (timm.layers.Attention)",
        head_dim_attr="head_dim",
        width_attrs=("attn_dim",),
        head_norms=("q_norm", "k_norm"),
    ),
    AttentionLayout(
        module_type=WindowAttention,
        family="Swin Transformer (timm.models.swin_transformer.WindowAttention)",
        head_params=(("relative_position_bias_table", 1),),
    ),
)

_BY_TYPE = {layout.module_type: layout for layout in LAYOUTS}


def layout_of(module: nn.Module) -> AttentionLayout | None:
    """The layout of ``module`` if its exact class is supported."""
    return _BY_TYPE.get(type(module))


def attention_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, AttentionLayout]]:
    """``(name, module, layout)`` of every supported attention module, in model order."""
    for name, module in model.named_modules():
        layout = layout_of(module)
        if layout is not None and isinstance(getattr(module, "qkv", None), nn.Linear):
            yield name, module, layout


def has_real_layer(module: nn.Module, attr: str) -> bool:
    """Whether ``module.<attr>`` is a layer that does something (not ``nn.Identity``)."""
    sub = getattr(module, attr, None)
    return sub is not None and not isinstance(sub, nn.Identity)
