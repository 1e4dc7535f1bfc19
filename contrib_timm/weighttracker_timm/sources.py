"""``timm:NAME`` models for ``weighttracker inspect`` (random weights, nothing downloaded)."""

from __future__ import annotations

import difflib

import timm
from torch import nn

from weighttracker_core import UnknownNameError
from weighttracker_core.plugin import ModelSourceSpec, hookimpl


def load_timm_model(name: str) -> nn.Module:
    """``timm.create_model(name, pretrained=False)``; unknown names get close matches.

    Raises:
        UnknownNameError: ``name`` is not a timm architecture.
    """
    known = timm.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownNameError(
            f"timm has no model called {name!r}.{hint} `timm.list_models('*vit*')` lists "
            "the names."
        )
    return timm.create_model(name, pretrained=False)


TIMM_SOURCE = ModelSourceSpec(
    prefix="timm",
    load=load_timm_model,
    summary="Any timm architecture by name, with random weights (pretrained=False).",
)


@hookimpl
def wt_register_model_sources() -> tuple[ModelSourceSpec, ...]:
    return (TIMM_SOURCE,)
