"""``l2_norm_distribution`` tracker: per group, how the units' L2 norms spread.

Meant for watching a group-lasso run: as the penalty works, the lower quantiles of a group
fall towards zero and ``num_below_threshold`` grows before units become exactly zero.

A unit's norm is the L2 norm of every weight it owns (all slices of all members, the same
``w_u`` the group lasso penalises); with ``normalized=True`` it is divided by
``sqrt(p_u)`` (``p_u``: the unit's element count), i.e. the root mean square of its
weights, so groups of different widths compare. Quantiles interpolate linearly, as
``torch.quantile`` does.

Worked example: a group with unit norms ``[0, 3, 4, 5]`` and the default options gives
``min 0, p25 2.25, p50 3.5, p75 4.25, max 5, mean 3, num_below_threshold 1``
(``p25``: position ``0.25 * 3 = 0.75`` between 0 and 3).

Per group (key: group name) the metrics are ``num_units``, ``min``, ``p<q>`` for each
quantile (``p50`` for 0.5, ``p2.5`` for 0.025), ``max``, ``mean`` and
``num_below_threshold`` (norms strictly below ``threshold``). ``include`` / ``ignore``:
norms over the selected layers' weights only; groups with no selected weight are left out.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch

from weighttracker_core.plugin import BuildContext, Evaluation, TrackerSpec, hookimpl

from ._layers import group_labels


def _quantiles(value: Any) -> tuple[float, ...]:
    return tuple(float(q) for q in value)


def _check_quantiles(instance: Any, attribute: Any, value: tuple[float, ...]) -> None:
    bad = [q for q in value if not (math.isfinite(q) and 0.0 <= q <= 1.0)]
    if bad:
        raise ValueError(f"quantiles must lie in [0, 1]; got {bad} in {list(value)}.")


@attrs.frozen(kw_only=True)
class L2NormDistributionOptions:
    """Options of ``l2_norm_distribution``.

    Args:
        quantiles: Quantiles to report, each in ``[0, 1]``.
        threshold: Norms strictly below it are counted in ``num_below_threshold`` (>= 0).
        normalized: Divide each norm by the square root of the unit's element count.
    """

    quantiles: tuple[float, ...] = attrs.field(default=(0.25, 0.5, 0.75), converter=_quantiles,
                                               validator=_check_quantiles)
    threshold: float = attrs.field(default=1e-3, converter=float, validator=attrs.validators.ge(0.0))
    normalized: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))


def quantile_key(q: float) -> str:
    """``0.5 -> "p50"``, ``0.025 -> "p2.5"``."""
    return f"p{round(q * 100, 6):g}"


def segment_summary(
    values: torch.Tensor, segment: torch.Tensor, num_segments: int, quantiles: tuple[float, ...],
    threshold: float,
) -> dict[str, torch.Tensor]:
    """Min, quantiles, max, mean and count below ``threshold`` of each segment's values.

    Two stable sorts put every segment's values in order, so the whole summary is a
    handful of kernels whatever the number of segments. Empty segments give 0.

    >>> s = segment_summary(torch.tensor([4., 0., 9., 3.]), torch.tensor([0, 0, 1, 0]), 2, (0.5,), 1.0)
    >>> s["p50"].tolist(), s["max"].tolist(), s["num_below_threshold"].tolist()
    ([3.0, 9.0], [4.0, 9.0], [1, 0])
    """
    device = values.device
    by_value = torch.sort(values, stable=True)
    segment_sorted, order = torch.sort(segment.index_select(0, by_value.indices), stable=True)
    ordered = by_value.values.index_select(0, order)
    counts = torch.zeros(num_segments, dtype=torch.long, device=device).index_add_(
        0, segment, torch.ones_like(segment)
    )
    starts = counts.cumsum(0) - counts
    last = (counts - 1).clamp(min=0)
    safe = counts > 0

    def at(offset: torch.Tensor) -> torch.Tensor:
        index = (starts + offset).clamp(max=max(len(ordered) - 1, 0))
        if not len(ordered):
            return torch.zeros_like(starts, dtype=values.dtype)
        picked = ordered.index_select(0, index)
        return torch.where(safe, picked, torch.zeros_like(picked))

    out: dict[str, torch.Tensor] = {"min": at(torch.zeros_like(counts))}
    for q in quantiles:
        position = q * last.to(torch.float64)
        low = position.floor().to(torch.long)
        high = position.ceil().to(torch.long)
        frac = (position - low.to(torch.float64)).to(values.dtype)
        lo, hi = at(low), at(high)
        out[quantile_key(q)] = lo + (hi - lo) * frac
    out["max"] = at(last)
    sums = torch.zeros(num_segments, dtype=values.dtype, device=device).index_add_(0, segment, values)
    out["mean"] = sums / counts.clamp(min=1).to(values.dtype)
    below = (values < threshold).to(torch.long)
    out["num_below_threshold"] = torch.zeros(num_segments, dtype=torch.long, device=device).index_add_(
        0, segment, below
    )
    out["num_units"] = counts
    return out


class L2NormDistribution:
    """Summary of the units' L2 norms in every group (see the module docstring)."""

    def __init__(self, ctx: BuildContext) -> None:
        self.structure = ctx.structure
        self.options: L2NormDistributionOptions = ctx.options
        self.everything = ctx.selection.is_everything
        if not self.everything:
            self.structure.selected_modules(ctx.selection, None)  # ConfigError if nothing selected
        self.plan = self.structure.plan(None if self.everything else ctx.selection)
        numel = self.plan.unit_numel()
        self._units = (numel > 0).nonzero().flatten()
        self._numel = numel.index_select(0, self._units)
        owners = self.structure.group_of_unit.index_select(0, self._units)
        self._groups = owners.unique().tolist()
        # segment id of each kept unit: its group's position among the listed groups
        remap = torch.full((len(self.structure.groups),), -1, dtype=torch.long)
        remap[self._groups] = torch.arange(len(self._groups))
        self._segment = remap.index_select(0, owners)
        labels = group_labels(self.structure.groups)
        self._labels = [labels[g] for g in self._groups]
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _norms(self, values: Any) -> torch.Tensor:
        if self.everything:
            return values["unit_l2_norm"]
        with torch.no_grad():
            return self.plan.unit_reduce("l2")

    def track(self, values: Evaluation) -> dict[str, Any]:
        norms = self._norms(values).detach()
        device = norms.device
        if device not in self._on:
            self._on[device] = (self._units.to(device), self._segment.to(device), self._numel.to(device))
        units, segment, numel = self._on[device]
        kept = norms.index_select(0, units)
        if self.options.normalized:
            kept = kept / numel.to(kept.dtype).sqrt()
        summary = segment_summary(kept, segment, len(self._groups), self.options.quantiles,
                                  self.options.threshold)
        columns = {key: value.tolist() for key, value in summary.items()}
        order = ["num_units", "min", *(quantile_key(q) for q in self.options.quantiles), "max", "mean",
                 "num_below_threshold"]
        return {
            "groups": {
                label: {key: columns[key][i] for key in order}
                for i, label in enumerate(self._labels)
            }
        }


@hookimpl
def wt_register_trackers() -> tuple[TrackerSpec, ...]:
    return (
        TrackerSpec(
            name="l2_norm_distribution",
            build=L2NormDistribution,
            options=L2NormDistributionOptions,
            requires=("unit_l2_norm",),
            summary="Per group: min, quantiles, max and count below a threshold of the units' L2 norms.",
        ),
    )
