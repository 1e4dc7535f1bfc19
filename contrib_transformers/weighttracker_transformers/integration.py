"""The integrations that make ``WeightTracker`` work on Hugging Face models.

``transformers`` applies itself to every ``transformers.PreTrainedModel`` (opt out with
``WeightTracker(..., integrations=None)``):

* tracing and MAC counting call the model through :func:`~.tracing.hf_forward`
  (``use_cache=False``; a bare tensor is the model's main input) and keep the tensors of
  its ``ModelOutput`` (:func:`~.tracing.hf_outputs`); the heads, kv heads and head width
  of every attention are read off that forward;
* before a physical prune, one that the model's config could not describe is refused
  (:func:`~.sync.check_prune`); after it, the attention / MLP attributes and the config
  follow the new shapes (:func:`~.sync.sync_after_prune`), so ``save_pretrained`` then
  ``from_pretrained`` rebuilds the pruned model with the stock class.

``transformers_any_shape`` is never chosen automatically: ``WeightTracker(model, x,
integrations=["transformers_any_shape"])`` traces the same way and syncs the modules, but
allows prunes the config cannot describe (different head counts per layer, say). The model
then runs in this process and can be stored with ``torch.save`` or its pruning record; the
config keeps only the sizes that are the same in every layer.
"""

from __future__ import annotations

import sys
from typing import Any

from weighttracker_core.plugin import IntegrationSpec, hookimpl

from .sync import ANY_SHAPE, check_prune, sync_after_prune
from .tracing import hf_forward, hf_outputs

NAME = "transformers"


def applies_to(model: Any) -> bool:
    """Whether ``model`` is a Hugging Face ``PreTrainedModel``.

    transformers is not imported for this: where its model base class was never loaded, no
    model can be one (and users of other models do not pay for the import).
    """
    modeling = sys.modules.get("transformers.modeling_utils")
    base = getattr(modeling, "PreTrainedModel", None)
    return isinstance(base, type) and isinstance(model, base)


def tracker_options(model: Any) -> dict[str, Any]:
    """How to call the model for tracing (the user's own ``forward_fn`` / ``output_transform`` win)."""
    return {"forward_fn": hf_forward, "output_transform": hf_outputs}


def sync_any_shape(tracker: Any) -> None:
    """Module attributes and the uniform config sizes, without the rebuild check."""
    sync_after_prune(tracker, strict=False)


TRANSFORMERS = IntegrationSpec(
    name=NAME,
    applies_to=applies_to,
    tracker_options=tracker_options,
    before_prune=check_prune,
    after_prune=sync_after_prune,
    summary="Hugging Face PreTrainedModel: traced with use_cache=False through ModelOutput; "
    "prunes refused where the config could not describe them; module attributes and the "
    "config synced so save_pretrained -> from_pretrained reloads the pruned model.",
)

TRANSFORMERS_ANY_SHAPE = IntegrationSpec(
    name=ANY_SHAPE,
    applies_to=lambda model: False,  # chosen by name only
    tracker_options=tracker_options,
    after_prune=sync_any_shape,
    summary="Opt-in alternative to 'transformers': any prune the modules can run; the config "
    "keeps only the sizes every layer shares (save with torch.save, not save_pretrained).",
)


@hookimpl
def wt_register_integrations() -> tuple[IntegrationSpec, ...]:
    return (TRANSFORMERS, TRANSFORMERS_ANY_SHAPE)
