"""Bit-widths of counted layers as rows for ``tracker.bitwidths()`` (checks in :mod:`.context`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .context import BitwidthFn, Bitwidths


def bitwidth_rows(
    layers: Sequence[tuple[str, nn.Module]],
    weight_fn: BitwidthFn | None,
    activation_fn: BitwidthFn | None,
) -> list[dict[str, Any]]:
    """One row per ``(name, module)``: both bit-widths, checked, and where each came from.

    Raises:
        ConfigError: A function returned something that is not a whole number >= 1.
    """
    bits = Bitwidths(weight=weight_fn, activation=activation_fn)
    rows: list[dict[str, Any]] = [{"layer": name} for name, _ in layers]
    for kind in ("weight", "activation"):
        source = f"{kind}_bitwidth_fn" if bits.given(kind) else "default"
        for row, (name, module) in zip(rows, layers):
            row[f"{kind}_bits"], row[f"{kind}_source"] = bits.bits(kind, name, module), source
    return rows
