"""Shaping tracker metrics for output: tensors to Python numbers, nested keys to flat ones."""

from __future__ import annotations

import math
from collections.abc import Container, Iterator, Mapping
from typing import Any

import torch

_PLAIN = frozenset({int, float, bool, str, type(None)})


def to_python(value: Any) -> Any:
    """Tensors become Python numbers or lists, recursively.

    ``{"a": tensor(2.)}`` gives ``{"a": 2.0}``; ``tensor([1, 2])`` gives ``[1, 2]``.
    """
    kind = type(value)
    if kind in _PLAIN:  # most leaves: no abstract-class check per number
        return value
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 else value.tolist()
    if kind is dict or isinstance(value, Mapping):
        return {k: to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_python(v) for v in value)
    return value


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` becomes ``{"a/b": 1}`` (Weights & Biases style keys)."""
    return dict(iter_flat(metrics, prefix))


def iter_flat(
    metrics: Mapping[str, Any], prefix: str = "", skip: Container[str] = ()
) -> Iterator[tuple[str, Any]]:
    """``("a/b", value)`` for every leaf of nested ``metrics``, leaving out subtrees ``skip`` names."""
    for key, value in metrics.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            if str(key) not in skip:
                yield from iter_flat(value, path, skip)
        else:
            yield path, value


def finite_scalars(metrics: Mapping[str, Any], prefix: str = "weighttracker") -> dict[str, float]:
    """Every finite number of (nested) ``metrics`` as a float, under flat ``prefix/a/b`` keys.

    What training loggers take: per-layer lists and strings are left out, one-element
    tensors become numbers, booleans 0/1. ``{"structured_bops": {"compression": 0.25,
    "modules": {...}}}`` gives ``{"weighttracker/structured_bops/compression": 0.25, ...}``.
    """
    out: dict[str, float] = {}
    for key, value in iter_flat(metrics):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            out[f"{prefix}/{key}" if prefix else key] = float(value)
    return out
