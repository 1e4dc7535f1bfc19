"""weighttracker-transformers: Hugging Face models as weighttracker models.

Installed next to ``weighttracker``, its ``transformers`` integration applies itself to
every ``transformers.PreTrainedModel``: ``WeightTracker(model, input_ids)`` finds the
heads, kv heads, MLP channels and hidden size, and physical pruning keeps the module
attributes and the config in step so that ``save_pretrained`` / ``from_pretrained``
reload the pruned model with the stock class. The helpers below are for explicit use;
the ``Trainer`` callback lives in :mod:`weighttracker_transformers.trainer`.
"""

from __future__ import annotations

from .families import FAMILIES, Family, family_of
from .sources import build_model, token_ids
from .sync import check_prune, sync_after_prune
from .tracing import hf_forward, hf_outputs
from .uniform import prune_zero_units_uniformly, uniform_zero_units

__all__ = [
    "FAMILIES",
    "Family",
    "build_model",
    "check_prune",
    "family_of",
    "hf_forward",
    "hf_outputs",
    "prune_zero_units_uniformly",
    "sync_after_prune",
    "token_ids",
    "uniform_zero_units",
]
