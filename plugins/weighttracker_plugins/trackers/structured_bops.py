"""``structured_bops`` tracker: BOPs of the structure that is still active.

For each counted layer ``m`` (weighted layers; normalization layers only when named in
``include``)::

    ActiveMACs_m = BaselineMACs_m * prod_a active_a / size_a     (cost axes a of m)
    BOPs_m       = ActiveMACs_m * b_weight_m * b_act_m
    compression  = 1 - sum_m BOPs_m / sum_m (BaselineMACs_m * 32 * 32)

Baseline MACs come from fvcore, once per structure; a unit is active while any of its
weights is non-zero, and a channel while every unit covering it is active (see
``calculations/cost_model.py``). Worked example: a ``Linear(4, 2)`` run on one token has 8
baseline MACs; with one of its 4 input features inactive and 8-bit weights and
activations, ``BOPs = 8 * 3/4 * 8 * 8 = 384`` against a baseline of ``8 * 1024 = 8192``,
so ``compression = 1 - 384 / 8192 = 0.953125``.

Metrics: ``compression``; with ``log_total_bops``: ``bops``, ``baseline``; with
``log_layerwise_stats``: ``modules[name] = {bops, baseline, compression_rate}``.
"""

from __future__ import annotations

from typing import Any

import torch

from weighttracker_core.plugin import TrackerSpec, hookimpl

from ._bops import BopsOptions, BopsTracker


class StructuredBops(BopsTracker):
    """Structured BOPs: active MACs from the active fraction of each cost axis."""

    inputs = ("layer_active_macs", "layer_baseline_macs")

    def active_macs(self, values: Any) -> torch.Tensor:
        return values["layer_active_macs"]


TRACKERS = (
    TrackerSpec(
        name="structured_bops",
        build=StructuredBops,
        options=BopsOptions,
        requires=("layer_active_macs", "layer_baseline_macs", "layer_weight_bits", "layer_activation_bits"),
        summary="BOPs of the active channels/heads against a dense 32-bit baseline.",
    ),
)


@hookimpl
def wt_register_trackers() -> tuple[TrackerSpec, ...]:
    return TRACKERS
