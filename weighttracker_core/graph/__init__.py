"""Torch-Pruning dependency graphs, checked: the only core package importing ``torch_pruning``."""

from __future__ import annotations

from .attention import ROTARY_HALF, ROTARY_INTERLEAVED, ROTARY_UNKNOWN, FoundAttention
from .handle import DependencyGraphHandle
from .records import RawGroup, RawItem
from .tracing import call_model, describe_inputs, preserved_modes

__all__ = [
    "ROTARY_HALF",
    "ROTARY_INTERLEAVED",
    "ROTARY_UNKNOWN",
    "DependencyGraphHandle",
    "FoundAttention",
    "RawGroup",
    "RawItem",
    "call_model",
    "describe_inputs",
    "preserved_modes",
]
