"""``unstructured_bops`` tracker: BOPs scaled by each layer's weight density.

For each counted layer ``m``::

    BOPs_m      = BaselineMACs_m * (1 - sparsity_m) * b_weight_m * b_act_m
    compression = 1 - sum_m BOPs_m / sum_m (BaselineMACs_m * 32 * 32)

``sparsity_m`` is the exact fraction of zero elements of the layer's effective weights
(``orig * mask`` under ``torch.nn.utils.prune``, parametrized weights as computed), the
same count ``unstructured_sparsity`` reports (its ``weight_param_zeros`` calculation). Worked example: a conv with 1000 baseline
MACs and 30 of its 120 weights zero, at 4-bit weights and 8-bit activations, has
``BOPs = 1000 * 0.75 * 4 * 8 = 24000``. Same baseline, options and keys as
``structured_bops``.
"""

from __future__ import annotations

from typing import Any

import torch

from weighttracker_core.plugin import BuildContext, TrackerSpec, hookimpl

from ._bops import BopsOptions, BopsTracker


class UnstructuredBops(BopsTracker):
    """Unstructured BOPs: baseline MACs times the fraction of non-zero weights."""

    inputs = ("weight_param_zeros", "layer_baseline_macs")

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__(ctx)
        self._layer_numel: dict[torch.device, torch.Tensor] = {}

    def active_macs(self, values: Any) -> torch.Tensor:
        table = values["weight_param_table"]  # per weight parameter; static
        zeros = table.per_layer(values["weight_param_zeros"])
        device = zeros.device
        if device not in self._layer_numel:  # static: weights per layer, at least 1
            self._layer_numel[device] = table.per_layer(table.numel.to(device)).clamp(min=1)
        # a layer without weights has no zeros, so its density is 1 - 0 / 1 = 1
        density = 1 - zeros / self._layer_numel[device]
        return values["layer_baseline_macs"].to(device) * density


TRACKERS = (
    TrackerSpec(
        name="unstructured_bops",
        build=UnstructuredBops,
        options=BopsOptions,
        requires=("layer_baseline_macs", "weight_param_table", "weight_param_zeros",
                  "layer_weight_bits", "layer_activation_bits"),
        summary="BOPs of the non-zero weights against a dense 32-bit baseline.",
    ),
)


@hookimpl
def wt_register_trackers() -> tuple[TrackerSpec, ...]:
    return TRACKERS
