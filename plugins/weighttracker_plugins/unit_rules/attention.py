"""Unit rule for ``nn.MultiheadAttention`` (SPEC §3.3).

An embedding channel owns its input column of ``in_proj_weight`` (q, k and v alike) and its
output row of ``out_proj`` (weight and bias). Heads and head dimensions (with ``num_heads``)
are built by the core from the fused ``in_proj_weight``: a head owns its q, k and v rows and
its input columns of ``out_proj``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from weighttracker_core import ParamRole, ParamSlice, PruneAxis, UnitRule, hookimpl


def embedding_slices(mha: nn.MultiheadAttention) -> tuple[ParamSlice, ...]:
    inputs = (
        (ParamSlice(param="in_proj_weight", dim=1),)
        if mha._qkv_same_embed_dim
        else (ParamSlice(param="q_proj_weight", dim=1),)
    )
    return inputs + (
        ParamSlice(param="out_proj.weight", dim=0),
        ParamSlice(param="out_proj.bias", dim=0, role=ParamRole.BIAS),
    )


def refuse_embedding_prune(mha: nn.MultiheadAttention, axis: PruneAxis, idxs: Sequence[int]) -> str | None:
    if not idxs:
        return None
    return ("nn.MultiheadAttention ties its embedding width to its attention width; "
            "removing embedding channels would change the attention itself. Prune heads "
            "(num_heads=..., prune_num_heads=True) or exclude this group with ignore_prune")


MULTIHEAD_ATTENTION = UnitRule(
    name="multihead_attention",
    module_types=(nn.MultiheadAttention,),
    out_slices=embedding_slices,
    in_slices=embedding_slices,
    weight_params=("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"),
    cost_axes=("feature", "head"),
    unit_kind="feature",
    validate_prune=refuse_embedding_prune,
)


@hookimpl
def wt_register_unit_rules() -> tuple[UnitRule, ...]:
    return (MULTIHEAD_ATTENTION,)
