"""Resolving ``MODEL`` arguments and ``--input-shape`` for ``weighttracker inspect``.

``PREFIX:NAME`` asks the model source registered for ``PREFIX`` (``torchvision``,
``timm``, ... through the ``wt_register_model_sources`` hook); anything else of the form
``package.module:factory`` imports the module and calls the factory without arguments.
"""

from __future__ import annotations

import importlib
import math
import re
import traceback
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, UnknownNameError, WeightTrackerError
from ..registry import Registries

DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)

#: Most elements ``--input-shape`` may have: 2**24, 64 MiB of float32 (1,3,2048,2048 fits).
#: Structures and per-layer counts do not need a large input, and the model's activations
#: are usually many times larger than the input.
MAX_INPUT_ELEMENTS = 2**24


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
            f"--input-shape {_clip(text)!r} is not a shape: give positive integers separated by "
            "commas, e.g. --input-shape 1,3,224,224."
        )
    check_input_size(shape)
    return shape


def check_input_size(shape: tuple[int, ...]) -> None:
    """Refuse a shape with more than :data:`MAX_INPUT_ELEMENTS` elements, before allocating it."""
    numel = math.prod(shape)
    if numel > MAX_INPUT_ELEMENTS:
        raise ConfigError(
            f"--input-shape {','.join(map(str, shape))} has {numel:,} elements; inspect allows at "
            f"most {MAX_INPUT_ELEMENTS:,} (64 MiB of float32). Structures and metrics do not depend "
            "on the input size: pass the smallest shape the model accepts, e.g. 1,3,224,224."
        )


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _where(err: BaseException) -> str:
    """`` (at file:line)`` of the innermost frame that raised ``err``, or ``""``."""
    if isinstance(err, SyntaxError) and err.filename:
        return f" (at {err.filename}:{err.lineno})"
    frames = traceback.extract_tb(err.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _is_missing(err: ImportError, module: str) -> bool:
    """Whether ``err`` says that ``module`` itself (or a parent package) does not exist."""
    name = getattr(err, "name", None)
    return isinstance(err, ModuleNotFoundError) and bool(name) and (
        module == name or module.startswith(f"{name}.")
    )


def _first_line(err: BaseException) -> str:
    text = (err.msg if isinstance(err, SyntaxError) and err.msg else str(err)).strip().splitlines()
    return f"{type(err).__name__}: {_clip(text[0], 300) if text else ''}"


def parse_config(items: list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """``["hidden_size=64,num_hidden_layers=2", "vocab_size=128"]`` as ``{key: value}``.

    Values stay strings; the model source converts them.

    Raises:
        ConfigError: a piece is not ``key=value``, or a key is given twice.
    """
    out: dict[str, str] = {}
    for item in items or ():
        for piece in (p.strip() for p in item.split(",")):
            if not piece:
                continue
            key, sep, value = piece.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key.isidentifier() or not value:
                raise ConfigError(
                    f"--config {_clip(piece)!r} is not KEY=VALUE: give comma-separated settings, "
                    "e.g. --config hidden_size=64,num_hidden_layers=2."
                )
            if key in out:
                raise ConfigError(f"--config sets {key!r} twice ({out[key]!r} and {value!r}); keep one.")
            out[key] = value
    return out


def model_source(spec: str, regs: Registries) -> Any:
    """The model source ``spec`` names (``PREFIX:NAME``), or ``None`` for a factory."""
    prefix, sep, name = spec.partition(":")
    return regs.model_sources.get(prefix) if sep and name and prefix in regs.model_sources else None


def load_model(
    spec: str, regs: Registries, config: dict[str, str] | None = None
) -> tuple[nn.Module, tuple[int, ...]]:
    """The model ``spec`` names and its default input shape.

    ``config`` (from ``--config``) goes to a model source that accepts it.

    Raises:
        ConfigError: ``spec`` is malformed, the factory fails or returns no module, or
            ``config`` is given for a model that does not take one.
        UnknownNameError: no source or module matches (the message lists the sources).
    """
    prefix, sep, name = spec.partition(":")
    sources = regs.model_sources
    listed = ", ".join(f"{p}:NAME" for p in sources.names()) or "no model sources installed"
    if not sep or not prefix or not name:
        raise ConfigError(
            f"MODEL {spec!r} must look like PREFIX:NAME ({listed}) or package.module:factory."
        )
    if config:
        takes = [p for p in sources.names() if sources.get(p).accepts_config]
        if prefix not in sources or not sources.get(prefix).accepts_config:
            raise ConfigError(
                f"--config was given, but {spec!r} does not take a config; only the model "
                f"sources {', '.join(f'{p}:NAME' for p in takes) or '(none installed)'} do. "
                "Drop --config for this model."
            )
    if prefix in sources:
        source = sources.get(prefix)
        return _check_module(_from_source(source, prefix, name, config), spec), tuple(source.default_input_shape)
    factory = _factory(spec, _import_module(spec, prefix, listed), listed)
    try:
        model = factory()
    except (Exception, SystemExit) as err:
        raise ConfigError(
            f"MODEL {spec!r}: calling {name}() failed with {_first_line(err)}{_where(err)}. The "
            "factory must build the model without arguments."
        ) from None
    return _check_module(model, spec), DEFAULT_INPUT_SHAPE


def _from_source(source: Any, prefix: str, name: str, config: dict[str, str] | None) -> Any:
    try:
        return source.load(name, config=dict(config)) if config else source.load(name)
    except WeightTrackerError:
        raise
    except (Exception, SystemExit) as err:
        raise UnknownNameError(
            f"Model source {prefix!r} could not build {name!r}: {_first_line(err)}"
        ) from err


def _import_module(spec: str, prefix: str, listed: str) -> Any:
    """The module of a ``package.module:factory`` spec, with errors that say what to fix."""
    try:
        return importlib.import_module(prefix)
    except ImportError as err:
        if not _is_missing(err, prefix):
            raise ConfigError(
                f"MODEL {spec!r}: importing {prefix!r} failed with {_first_line(err)}{_where(err)}. "
                "Install what it imports, or fix the module."
            ) from None
        raise UnknownNameError(
            f"MODEL {spec!r}: {prefix!r} is neither an installed model source ({listed}) nor an "
            f"importable module ({_first_line(err)}). Install the plugin that provides "
            f"{prefix!r} models, or name a factory as package.module:function of a module "
            "that is installed or on PYTHONPATH."
        ) from None
    except (Exception, SystemExit) as err:
        # the user's module itself raised (or called sys.exit) while it was imported
        if isinstance(err, SystemExit):
            advice = ("The module ended the program while being imported; put script code under "
                      "`if __name__ == '__main__':`.")
        else:
            advice = "Fix the module so that it imports without errors."
        raise ConfigError(
            f"MODEL {spec!r}: importing {prefix!r} failed with {_first_line(err)}{_where(err)}. "
            f"{advice}"
        ) from None


def _factory(spec: str, module: Any, listed: str) -> Any:
    """The callable ``name`` (dotted) of ``module``."""
    prefix, _, name = spec.partition(":")
    factory: Any = module
    for part in name.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            hint = "" if "." in prefix else f" No model source {prefix!r} is installed ({listed})."
            raise UnknownNameError(
                f"MODEL {spec!r}: module {prefix!r} has no attribute {name!r}; name a function "
                f"or class that builds the model without arguments.{hint}"
            ) from None
        except Exception as err:  # a module-level __getattr__ that raises
            raise ConfigError(
                f"MODEL {spec!r}: looking up {name!r} in {prefix!r} failed with "
                f"{_first_line(err)}{_where(err)}."
            ) from None
    if not callable(factory):
        raise ConfigError(f"MODEL {spec!r}: {name!r} is a {type(factory).__name__}, not callable.")
    return factory


def _check_module(model: Any, spec: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"MODEL {spec!r} gave a {type(model).__name__}, not a torch.nn.Module.")
    return model


def example_input(model: nn.Module, spec: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A random input of ``shape``, checked by one forward pass in eval mode.

    Raises:
        ConfigError: the model rejects an input of this shape.
    """
    check_input_size(shape)  # also for a model source's default shape
    shown = ",".join(map(str, shape))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        x = torch.randn(shape, device=device)
    except (RuntimeError, MemoryError) as err:
        raise ConfigError(
            f"Cannot allocate an input of shape {shown} ({_first_line(err)}); pass a smaller "
            "--input-shape."
        ) from None
    return _checked_forward(model, spec, x, shown)


def source_example_input(
    model: nn.Module, spec: str, source: Any, shape: tuple[int, ...] | None
) -> torch.Tensor:
    """The model source's own example input (token ids, say), checked by one forward pass.

    Raises:
        ConfigError: the source cannot build one of ``shape``, or the model rejects it.
    """
    if shape is not None:
        check_input_size(shape)
    try:
        x = source.example_input(model, shape)
    except WeightTrackerError:
        raise
    except Exception as err:
        raise ConfigError(
            f"Model source {source.prefix!r} could not build an example input"
            + (f" of shape {','.join(map(str, shape))}" if shape else "")
            + f" for {spec}: {_first_line(err)}. Pass --input-shape with the shape it expects."
        ) from None
    if not isinstance(x, torch.Tensor):
        raise ConfigError(
            f"Model source {source.prefix!r} gave a {type(x).__name__} as example input for "
            f"{spec}; it must give a tensor (a bug in the plugin)."
        )
    check_input_size(tuple(x.shape))
    return _checked_forward(model, spec, x, ",".join(map(str, x.shape)))


def _checked_forward(model: nn.Module, spec: str, x: torch.Tensor, shown: str) -> torch.Tensor:
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except MemoryError as err:
        raise ConfigError(
            f"{spec} ran out of memory on an input of shape {shown} ({_first_line(err)}); pass a "
            "smaller --input-shape."
        ) from None
    except Exception as err:
        if isinstance(err, RuntimeError) and "allocate" in str(err):
            raise ConfigError(
                f"{spec} ran out of memory on an input of shape {shown} ({_first_line(err)}); "
                "pass a smaller --input-shape."
            ) from None
        raise ConfigError(
            f"An input of shape {shown} does not fit {spec}: "
            f"{_first_line(err)}. Pass --input-shape with the shape the model expects."
        ) from None
    return x
