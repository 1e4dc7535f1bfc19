"""Resolving ``MODEL`` arguments and ``--input-shape`` for ``weighttracker inspect``.

``PREFIX:NAME`` asks the model source registered for ``PREFIX`` (``torchvision``,
``timm``, ... through the ``wt_register_model_sources`` hook); anything else of the form
``package.module:factory`` imports the module and calls the factory without arguments.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnknownNameError, WeightTrackerError
from ..registry import Registries

DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) as a tuple of positive ints.

    Raises:
        ConfigError: anything else, naming the value.
    """
    parts = [p for p in re.split(r"[,x\s]+", text.strip()) if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise ConfigError(
            f"--input-shape {text!r} is not a shape: give positive integers separated by "
            "commas, e.g. --input-shape 1,3,224,224."
        )
    return shape


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def load_model(spec: str, regs: Registries) -> tuple[nn.Module, tuple[int, ...]]:
    """The model ``spec`` names and its default input shape.

    Raises:
        ConfigError: ``spec`` is malformed, or the factory fails or returns no module.
        UnknownNameError: no source or module matches (the message lists the sources).
    """
    prefix, sep, name = spec.partition(":")
    sources = regs.model_sources
    listed = ", ".join(f"{p}:NAME" for p in sources.names()) or "no model sources installed"
    if not sep or not prefix or not name:
        raise ConfigError(
            f"MODEL {spec!r} must look like PREFIX:NAME ({listed}) or package.module:factory."
        )
    if prefix in sources:
        source = sources.get(prefix)
        try:
            model = source.load(name)
        except WeightTrackerError:
            raise
        except Exception as err:
            raise UnknownNameError(
                f"Model source {prefix!r} could not build {name!r}: {_first_line(err)}"
            ) from err
        return _check_module(model, spec), tuple(source.default_input_shape)
    try:
        module = importlib.import_module(prefix)
    except ImportError as err:
        raise UnknownNameError(
            f"MODEL {spec!r}: {prefix!r} is neither an installed model source ({listed}) nor an "
            f"importable module ({_first_line(err)}). Install the plugin that provides "
            f"{prefix!r} models, or name a factory as package.module:function of a module "
            "that is installed or on PYTHONPATH."
        ) from None
    factory: Any = module
    for part in name.split("."):
        if not hasattr(factory, part):
            hint = "" if "." in prefix else f" No model source {prefix!r} is installed ({listed})."
            raise UnknownNameError(
                f"MODEL {spec!r}: module {prefix!r} has no attribute {name!r}; name a function "
                f"or class that builds the model without arguments.{hint}"
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise ConfigError(f"MODEL {spec!r}: {name!r} is a {type(factory).__name__}, not callable.")
    try:
        model = factory()
    except Exception as err:
        raise ConfigError(
            f"MODEL {spec!r}: calling {name}() failed with {_first_line(err)}. The factory must "
            "build the model without arguments."
        ) from err
    return _check_module(model, spec), DEFAULT_INPUT_SHAPE


def _check_module(model: Any, spec: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"MODEL {spec!r} gave a {type(model).__name__}, not a torch.nn.Module.")
    return model


def example_input(model: nn.Module, spec: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A random input of ``shape``, checked by one forward pass in eval mode.

    Raises:
        ConfigError: the model rejects an input of this shape.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.randn(shape, device=device)
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except Exception as err:
        raise ConfigError(
            f"An input of shape {','.join(map(str, shape))} does not fit {spec}: "
            f"{_first_line(err)}. Pass --input-shape with the shape the model expects."
        ) from None
    return x
