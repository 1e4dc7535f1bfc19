"""Ready-made ``forward_fn`` callables for ``WeightTracker``."""

from __future__ import annotations

from typing import Any

from torch import nn

from .graph import call_model

_FIXED_IN_TRAINING = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


def train_mode_forward(model: nn.Module, example_inputs: Any) -> Any:
    """Run ``model`` in training mode, with normalisation and dropout layers in eval mode.

    Torch-Pruning traces in eval mode, where branches that only run in training
    (auxiliary classifiers such as GoogLeNet's ``aux1`` / ``aux2``) never run: their layers
    get no units and a physical prune leaves them broken. Passed as ``forward_fn=``, this
    forward runs those branches, while BatchNorm keeps its running statistics (they are
    used, not updated) and dropout modules do nothing. The training flags are restored
    afterwards. Metrics then count what this forward runs, auxiliary heads included.

    Example:
        >>> tracker = WeightTracker(googlenet, x, forward_fn=train_mode_forward)  # doctest: +SKIP
    """
    modes = {module: module.training for module in model.modules()}
    try:
        model.train()
        for module in model.modules():
            if isinstance(module, _FIXED_IN_TRAINING):
                module.eval()
        return call_model(model, example_inputs)
    finally:
        for module, mode in modes.items():
            module.training = mode
