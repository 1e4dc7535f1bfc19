"""Checking ``WeightTracker`` options where they enter.

Every option is checked for its type before anything is traced, and every module an
option names must be part of the model, so a typo is an error naming the value rather
than an ``AttributeError`` from deep inside, or an option that silently does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from .errors import ConfigError
from .heads import AttentionLayout


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_model(value: Any) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(value).__name__}.")
    return value


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {_describe(value)}.")
    return value


def check_callable(value: Any, name: str, signature: str) -> Any:
    if value is not None and not callable(value):
        raise ConfigError(f"{name} must be a callable {signature} or None, got {_describe(value)}.")
    return value


def check_bitwidth_fn(value: Any, name: str) -> Any:
    """A ``weight_bitwidth_fn`` / ``activation_bitwidth_fn``: a callable or ``None``."""
    return check_callable(value, name, "(name, module) -> int")


def _as_list(value: Any, name: str, what: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (nn.Module, type, str, bytes)) or not isinstance(value, (Sequence, set, frozenset)):
        raise ConfigError(
            f"{name} must be a list of {what}, got {_describe(value)}; wrap a single one in a "
            f"list: {name}=[...]."
        )
    return list(value)


def check_modules(model: nn.Module, value: Any, name: str) -> tuple[nn.Module, ...]:
    """``value`` as a tuple of modules of ``model`` (a list of module instances)."""
    members = {id(m) for m in model.modules()}
    out = []
    for item in _as_list(value, name, "modules of the model"):
        if isinstance(item, type):
            raise ConfigError(
                f"{name} takes module instances (model.fc), not the type {item.__name__}; "
                f"list the instances, e.g. [m for m in model.modules() if isinstance(m, "
                f"{item.__name__})]."
            )
        if not isinstance(item, nn.Module):
            hint = (
                f" For a module named {item!r} pass model.get_submodule({item!r})."
                if isinstance(item, str) else ""
            )
            raise ConfigError(
                f"{name} takes modules of the model, got {_describe(item)} "
                f"({type(item).__name__}).{hint}"
            )
        if id(item) not in members:
            raise ConfigError(
                f"{name} lists a {type(item).__name__} that is not part of the model; pass "
                "modules of this model (model.<submodule>)."
            )
        out.append(item)
    return tuple(out)


def check_module_types(value: Any, name: str) -> tuple[type, ...] | None:
    """``value`` as a tuple of ``nn.Module`` subclasses (or ``None``)."""
    if value is None:
        return None
    out = []
    for item in _as_list(value, name, "nn.Module subclasses"):
        if not (isinstance(item, type) and issubclass(item, nn.Module)):
            hint = f" (for {item!r} pass torch.nn.{item})" if isinstance(item, str) and hasattr(nn, item) else ""
            raise ConfigError(
                f"{name} takes nn.Module subclasses such as torch.nn.Conv2d, got "
                f"{_describe(item)}{hint}."
            )
        out.append(item)
    return tuple(out)


def check_num_heads(value: Any) -> dict[nn.Module, int] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"num_heads must be a dict {{module: heads}}, got {_describe(value)}."
        )
    for module in value:
        if not isinstance(module, nn.Module):
            raise ConfigError(
                f"num_heads keys must be modules of the model (model.attn.qkv), got "
                f"{_describe(module)}."
            )
    return dict(value)


def check_layouts(value: Any) -> tuple[AttentionLayout, ...]:
    out = []
    for item in _as_list(value, "attention_layouts", "AttentionLayout objects"):
        if not isinstance(item, AttentionLayout):
            raise ConfigError(
                f"attention_layouts takes AttentionLayout objects, got {_describe(item)}."
            )
        out.append(item)
    return tuple(out)


def check_hooks(value: Any) -> tuple[Callable[..., Any], ...]:
    hooks = tuple(_as_list(value, "post_prune_hooks", "callables hook(tracker)"))
    for hook in hooks:
        if not callable(hook):
            raise ConfigError(f"post_prune_hooks must be callables, got {_describe(hook)}.")
    return hooks


def check_selection(model: nn.Module, value: Any, name: str) -> tuple[Any, ...]:
    """``include`` / ``ignore`` / ``ignore_prune``: module instances of the model or types."""
    members = {id(m) for m in model.modules()}
    out = []
    for item in _as_list(value, name, "modules of the model or nn.Module subclasses"):
        if isinstance(item, type) and issubclass(item, nn.Module):
            out.append(item)
            continue
        if isinstance(item, nn.Module):
            if id(item) not in members:
                raise ConfigError(f"{name} lists a {type(item).__name__} that is not part of the model.")
            out.append(item)
            continue
        hint = f" For a module named {item!r} pass model.get_submodule({item!r})." if isinstance(item, str) else ""
        raise ConfigError(
            f"{name} accepts module instances and nn.Module subclasses; got {_describe(item)}.{hint}"
        )
    return tuple(out)
