"""Bit-widths of counted layers as rows for ``tracker.bitwidths()`` (checks in :mod:`.context`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from .context import BitwidthFn, Bitwidths


def read_bitwidths(fn: BitwidthFn | None, layers: Iterable[tuple[str, nn.Module]], kind: str) -> list[int]:
    """``kind`` (``"weight"`` / ``"activation"``) bit-widths of ``layers``, checked.

    ``fn`` is called once per ``(name, module)``; without one every layer counts 32 bits.

    Raises:
        ConfigError: ``fn`` returned something that is not a whole number >= 1.
    """
    bits = Bitwidths(**{kind: fn})
    return [bits.bits(kind, name, module) for name, module in layers]


def bitwidth_rows(
    layers: Sequence[tuple[str, nn.Module]],
    weight_fn: BitwidthFn | None,
    activation_fn: BitwidthFn | None,
) -> list[dict[str, Any]]:
    """One row per ``(name, module)``: both bit-widths, checked, and where each came from."""
    rows: list[dict[str, Any]] = [{"layer": name} for name, _ in layers]
    for kind, fn in (("weight", weight_fn), ("activation", activation_fn)):
        source = "default" if fn is None else f"{kind}_bitwidth_fn"
        for row, bits in zip(rows, read_bitwidths(fn, layers, kind)):
            row[f"{kind}_bits"], row[f"{kind}_source"] = bits, source
    return rows
