"""``unstructured_sparsity`` tracker and the per-layer zero counts it shares.

Sparsity is the exact fraction of zero weights, weighted by element count: layers with
more weights weigh more (it is *not* the mean of per-layer fractions). Weights are the
parameters the unit rules call weights (``ModuleInfo.weight_params``: ``weight`` of convs,
linears, embeddings; ``in_proj_weight`` / ``out_proj.weight`` of attention), read as the
layer really uses them: ``weight_orig * weight_mask`` under ``torch.nn.utils.prune``, the
computed value under ``torch.nn.utils.parametrize`` (a fake quantizer's rounded zeros count).

Worked example: a ``Linear(4, 2)`` with 3 zeros out of 8 and a ``Conv2d(2, 4, 2)`` with 0
zeros out of 32 give ``sparsity = 3 / 40 = 0.075`` (the mean of the layer fractions would
be ``(3 / 8 + 0) / 2 = 0.1875``).

Normalisation layers (their scales are weights of a different kind, and structured
sparsity shows up in the layers they follow) are not counted unless named in
``include=`` by type or instance; the same holds for ``other`` layers (PReLU slopes).

Calculations registered here (other trackers may require them):

* ``weight_param_table`` (static): the :class:`WeightParams` table (every weight parameter
  of the layer table, its layer, size and storage identity).
* ``weight_param_zeros`` (per evaluation): zeros of each of those parameters (float64),
  counted in the shared one-pass ``weight_scan``; ``table.per_layer(zeros)`` sums them
  per layer.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from weighttracker_core.plugin import (
    BuildContext,
    CalculationSpec,
    Evaluation,
    Lifetime,
    TrackerSpec,
    hookimpl,
)

from ..calculations._memo import LastResult, reuse
from ._layers import WeightParams, counted_layers, layer_label

# ---------------------------------------------------------------------------- calculations


def weight_param_table(evaluation: Evaluation) -> WeightParams:
    return WeightParams.build(evaluation.structure)


def weight_param_zeros(evaluation: Evaluation) -> torch.Tensor:
    table: WeightParams = evaluation["weight_param_table"]
    nonzeros = evaluation["weight_scan"].nonzeros  # counted in the shared one-pass scan
    numel = table.on(nonzeros.device)[1]
    return reuse(evaluation.structure, "weight_param_zeros", (numel, nonzeros), lambda: numel - nonzeros)


CALCULATIONS = (
    CalculationSpec(name="weight_param_table", compute=weight_param_table, lifetime=Lifetime.STATIC,
                    summary="Weight parameters of every counted layer (names, sizes, layer)."),
    CalculationSpec(name="weight_param_zeros", compute=weight_param_zeros,
                    requires=("weight_param_table", "weight_scan"),
                    summary="Zero elements of each effective weight parameter."),
)

# --------------------------------------------------------------------------------- tracker


@attrs.frozen(kw_only=True)
class UnstructuredSparsityOptions:
    """``log_layerwise_stats``: report ``layers[name]`` (on by default)."""

    log_layerwise_stats: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))


class UnstructuredSparsity:
    """Exact zero-weight fraction of the selected layers, and of each of them.

    Metrics: ``sparsity`` (zeros / weights over every counted layer; shared storage of
    tied weights counted once), ``num_zero_weights``, ``num_weights`` and, with
    ``log_layerwise_stats``, ``layers[name]`` (each layer's own fraction).
    """

    def __init__(self, ctx: BuildContext) -> None:
        self.options: UnstructuredSparsityOptions = ctx.options
        self.layers = counted_layers(ctx.structure, ctx.selection, ctx.name)
        table: WeightParams = ctx.graph.evaluation()["weight_param_table"]  # static: cached
        keep = table.unique(info.index for info in self.layers).to(torch.float64)
        self._num_weights = int((table.numel * keep).sum())
        rows = torch.tensor([info.index for info in self.layers], dtype=torch.long)
        layer_numel = table.per_layer(table.numel)[rows]
        present = layer_numel > 0
        self._labels = [layer_label(i.name) for i, p in zip(self.layers, present.tolist()) if p]
        self._static = (keep, rows[present], layer_numel[present])
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._last = LastResult()

    def track(self, values: Evaluation) -> dict[str, Any]:
        # a pure function of the shared zero counts
        return self._last.get((values["weight_param_zeros"],), lambda: self._track(values))

    def _track(self, values: Any) -> dict[str, Any]:
        zeros = values["weight_param_zeros"]
        table: WeightParams = values["weight_param_table"]
        device = zeros.device
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in self._static)
        keep, rows, layer_numel = self._on[device]
        num_zero = (zeros * keep).sum()
        out: dict[str, Any] = {
            "sparsity": num_zero / max(self._num_weights, 1),
            "num_zero_weights": num_zero.to(torch.int64),
            "num_weights": self._num_weights,
        }
        if self.options.log_layerwise_stats:
            fractions = (table.per_layer(zeros).index_select(0, rows) / layer_numel).tolist()
            out["layers"] = dict(zip(self._labels, fractions))
        return out


TRACKERS = (
    TrackerSpec(
        name="unstructured_sparsity",
        build=UnstructuredSparsity,
        options=UnstructuredSparsityOptions,
        requires=("weight_param_table", "weight_param_zeros"),
        summary="Exact fraction of zero weights (element-weighted), total and per layer.",
    ),
)


@hookimpl
def wt_register_calculations() -> tuple[CalculationSpec, ...]:
    return CALCULATIONS


@hookimpl
def wt_register_trackers() -> tuple[TrackerSpec, ...]:
    return TRACKERS
