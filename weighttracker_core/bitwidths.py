"""Bit-widths of counted layers: reading the user's functions and checking what they return."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

#: ``(name, module) -> bits``, as passed to ``WeightTracker(weight_bitwidth_fn=...)``.
BitwidthFn = Callable[[str, nn.Module], Any]

#: What a layer counts with when no function is given.
DEFAULT_BITS = 32


def is_whole_number(value: Any) -> bool:
    """Whether ``value`` is a whole number: int, integral float or scalar tensor."""
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return False
        value = value.item()
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value) and value.is_integer()


def check_bitwidth(value: Any, layer: str, kind: str) -> int:
    """``value`` as an int if it is a whole number >= 1, else ``ConfigError``.

    ``check_bitwidth(8.0, "fc", "weight")`` gives ``8``; ``0`` and ``4.5`` are refused.
    """
    number = value.item() if is_whole_number(value) and isinstance(value, torch.Tensor) else value
    if not is_whole_number(value) or int(number) < 1:
        raise ConfigError(
            f"{kind}_bitwidth_fn returned {value!r} for layer {layer!r}; bit-widths must be "
            "whole numbers >= 1 (int, integral float or scalar tensor)."
        )
    return int(number)


def read_bitwidths(fn: BitwidthFn | None, layers: Iterable[tuple[str, nn.Module]], kind: str) -> list[int]:
    """``kind`` (``"weight"`` / ``"activation"``) bit-widths of ``layers``, checked.

    ``fn`` is called once per ``(name, module)``; without one every layer counts 32 bits.

    Raises:
        ConfigError: ``fn`` returned something that is not a whole number >= 1.
    """
    if fn is None:
        return [DEFAULT_BITS for _ in layers]
    return [check_bitwidth(fn(name, module), name, kind) for name, module in layers]


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
