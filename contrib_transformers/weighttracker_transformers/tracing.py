"""Calling a Hugging Face model the way tracing and MAC counting need it.

A ``PreTrainedModel`` returns a ``ModelOutput`` (a dict that may hold a key/value cache
object next to its tensors) and, for decoders, builds a cache unless told not to. The
tracer needs tensors that depend on the weights, and nothing else:

* :func:`hf_forward` calls the model with ``use_cache=False`` (when its ``forward`` takes
  it and the inputs do not say otherwise); a bare tensor is passed as the model's main
  input (``input_ids``, ``pixel_values``, ...).
* :func:`hf_outputs` keeps the tensors of the output, in order, and drops ``None`` and
  cache objects.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from weighttracker_core import ConfigError


def takes_argument(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` has a parameter called ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def hf_forward(model: nn.Module, example_inputs: Any) -> Any:
    """Run ``model`` on ``example_inputs`` without building a key/value cache.

    ``example_inputs`` is a tensor (the model's ``main_input_name``, e.g. token ids of shape
    ``[batch, seq]``), a tuple of positional inputs, or a dict of keyword inputs.

    Example: ``hf_forward(llama, ids)`` calls ``llama(input_ids=ids, use_cache=False)``;
    ``hf_forward(vit, {"pixel_values": x})`` calls ``vit(pixel_values=x)`` (ViT's forward
    has no ``use_cache``).
    """
    args: tuple[Any, ...] = ()
    if isinstance(example_inputs, Mapping):
        kwargs = dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        kwargs = {getattr(model, "main_input_name", "input_ids"): example_inputs}
    if "use_cache" not in kwargs and takes_argument(model, "use_cache"):
        kwargs["use_cache"] = False
    return model(*args, **kwargs)


def _tensors(value: Any, out: list[torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, Mapping):
        for item in value.values():
            _tensors(item, out)
    elif isinstance(value, (tuple, list)):
        for item in value:
            _tensors(item, out)


def hf_outputs(output: Any) -> tuple[torch.Tensor, ...]:
    """The tensors of a model's output (``ModelOutput``, tuple or tensor), in order.

    Example: a ``CausalLMOutputWithPast(logits=t, past_key_values=None)`` gives ``(t,)``;
    a ``BaseModelOutputWithPooling`` gives ``(last_hidden_state, pooler_output)``.

    Raises:
        ConfigError: The output holds no tensor.
    """
    found: list[torch.Tensor] = []
    _tensors(output, found)
    if not found:
        raise ConfigError(
            f"The model returned {type(output).__name__} without any tensor, so there is "
            "nothing to trace. Pass output_transform= to WeightTracker to pick the outputs."
        )
    return tuple(found)
