"""``torchvision:NAME`` models for ``weighttracker inspect``.

Models are built with random weights (``weights=None``): nothing is downloaded.
torchvision is imported only when a model is loaded, so the plugin costs nothing for users
who never ask for one.
"""

from __future__ import annotations

import difflib
from typing import Any

from weighttracker_core.plugin import ModelSourceSpec, UnknownNameError, hookimpl

# torchvision's video and optical-flow models want 5-D clips or image pairs, and the
# detection / segmentation models return dicts; ``inspect`` needs one image tensor in and a
# tensor out, so only the classification models are offered.


def available_models() -> list[str]:
    """Names of torchvision's classification models (imports torchvision)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def load(name: str) -> Any:
    """Build torchvision's classification model ``name`` with random weights.

    Args:
        name: A name from ``torchvision.models.list_models(module=torchvision.models)``,
            e.g. ``"resnet18"`` or ``"mobilenet_v2"``.

    Raises:
        UnknownNameError: No such classification model; the message lists close names.
    """
    import torchvision

    names = available_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(
            f"torchvision has no classification model named {name!r}.{hint} "
            f"Available: {', '.join(names)}."
        )
    return torchvision.models.get_model(name, weights=None)


@hookimpl
def wt_register_model_sources() -> tuple[ModelSourceSpec, ...]:
    return (
        ModelSourceSpec(
            prefix="torchvision",
            load=load,
            default_input_shape=(1, 3, 224, 224),
            summary="torchvision classification models with random weights (weights=None).",
        ),
    )
