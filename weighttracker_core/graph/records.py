"""Plain records of Torch-Pruning's groups: what leaves the graph package."""

from __future__ import annotations

from typing import Any

import attrs
from torch import nn

from ..units import PruneAxis


@attrs.frozen(kw_only=True)
class RawItem:
    """One module (or unwrapped parameter) of a Torch-Pruning group."""

    module_name: str
    module: Any  # nn.Module, or the owning module of an unwrapped parameter
    param_name: str | None  # set for unwrapped parameters
    pruning_dim: int | None  # set for unwrapped parameters
    axis: PruneAxis
    pruning_fn: str
    idxs: tuple[int, ...]
    root_idxs: tuple[int, ...]


@attrs.frozen(kw_only=True)
class RawGroup:
    """A Torch-Pruning group: its root and every coupled module with indices.

    ``feeds_output`` is true when some of its channels reach a model output without
    passing through another layer (a classifier's logits, a backbone's returned
    features); ``consumer`` names the nearest layer the root feeds, for messages.
    """

    root_name: str
    root_module: nn.Module
    pruning_fn: str
    n_root: int
    items: tuple[RawItem, ...]
    feeds_output: bool = False
    consumer: str = "the model output"
