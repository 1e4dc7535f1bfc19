"""``GatedLinear``: a linear layer with a learnable gate per output feature.

``y = (x @ weight.T + bias) * gate``. Torch-Pruning does not know this layer; the unit rule
below teaches weighttracker which slices an output or input feature owns and how to remove
them physically.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from weighttracker_core.plugin import ParamRole, ParamSlice, UnitRule


class GatedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.gate = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias) * self.gate


def _keep(size: int, drop: Sequence[int]) -> torch.Tensor:
    dropped = {int(i) for i in drop}
    return torch.tensor([i for i in range(size) if i not in dropped], dtype=torch.long)


def _gated(layer: nn.Module) -> GatedLinear:
    if not isinstance(layer, GatedLinear):
        raise TypeError(f"GatedLinearPruner prunes GatedLinear layers, got {type(layer).__name__}.")
    return layer


class GatedLinearPruner:
    """Removes output features (rows, bias, gate) or input features (columns)."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        gated = _gated(layer)
        keep = _keep(gated.out_features, idxs)
        for name in ("weight", "bias", "gate"):
            old: torch.Tensor = getattr(gated, name)
            setattr(gated, name, nn.Parameter(old.data.index_select(0, keep.to(old.device))))
        gated.out_features = len(keep)
        return gated

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        gated = _gated(layer)
        keep = _keep(gated.in_features, idxs)
        gated.weight = nn.Parameter(gated.weight.data.index_select(1, keep.to(gated.weight.device)))
        gated.in_features = len(keep)
        return gated

    def get_out_channels(self, layer: nn.Module) -> int:
        return _gated(layer).out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return _gated(layer).in_features


GATED_LINEAR_RULE = UnitRule(
    name="wt_example_gated_linear",
    module_types=(GatedLinear,),
    out_slices=(
        ParamSlice(param="weight", dim=0),
        ParamSlice(param="bias", dim=0, role=ParamRole.BIAS),
        ParamSlice(param="gate", dim=0),
    ),
    in_slices=(ParamSlice(param="weight", dim=1),),
    layer_pruner=GatedLinearPruner(),
    unit_kind="feature",
)
