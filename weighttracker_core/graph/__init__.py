"""Torch-Pruning dependency graphs, checked: the only core package importing ``torch_pruning``."""

from __future__ import annotations

from .handle import (
    DependencyGraphHandle,
    RawGroup,
    RawItem,
    call_model,
    describe_inputs,
    preserved_modes,
)

__all__ = [
    "DependencyGraphHandle",
    "RawGroup",
    "RawItem",
    "call_model",
    "describe_inputs",
    "preserved_modes",
]
