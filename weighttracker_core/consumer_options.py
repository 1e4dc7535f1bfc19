"""Options of trackers, regularizers and pruners: routing keywords and building options objects.

``create_tracker(["a", "b"], opt=1)`` hands ``opt`` to every listed tracker whose options
class accepts it; an option no listed tracker accepts is an error. Validation errors of an
options class become :class:`ConfigError` naming the plugin-registered name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .errors import ConfigError


def accepted_options(options_cls: type | None) -> set[str]:
    """The keyword names an attrs options class takes (its fields' aliases)."""
    if options_cls is None or not attrs.has(options_cls):
        return set()
    return {f.alias or f.name for f in attrs.fields(options_cls)}


def build_options(kind: str, name: str, options_cls: type | None, values: Mapping[str, Any]) -> Any:
    """Instantiate an attrs options class, turning its validation errors into ConfigError."""
    if options_cls is None:
        if values:
            raise ConfigError(f"The {kind} {name!r} takes no options; got {sorted(values)}.")
        return None
    try:
        return options_cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"Invalid options for {kind} {name!r}: {err}") from err


def tracker_names(kind_or_kinds: Any) -> list[Any]:
    """``"a"`` or ``["a", "b"]`` as a list of names; an empty list is an error."""
    kinds = list(kind_or_kinds) if isinstance(kind_or_kinds, (list, tuple)) else [kind_or_kinds]
    if not kinds:
        raise ConfigError("create_tracker needs at least one tracker name.")
    return kinds


def route_options(specs: Sequence[Any], options: Mapping[str, Any]) -> list[Any]:
    """Per tracker spec, its options object built from the keywords it accepts.

    Raises:
        ConfigError: An option none of ``specs`` accepts, or one a tracker refuses.
    """
    accepted = [accepted_options(s.options) for s in specs]
    for option in options:
        if not any(option in names for names in accepted):
            listed = "; ".join(f"{s.name}: {sorted(a) or 'none'}" for s, a in zip(specs, accepted))
            raise ConfigError(
                f"Option {option!r} is not accepted by tracker(s) "
                f"{', '.join(s.name for s in specs)}. Accepted: {listed}"
            )
    return [
        build_options("tracker", s.name, s.options, {k: v for k, v in options.items() if k in a})
        for s, a in zip(specs, accepted)
    ]


def pruner_config(spec: Any, config: Any, options: Mapping[str, Any]) -> Any:
    """A pruner's config object from ``config=`` (a dict or the config class) or keywords."""
    if config is not None and options:
        raise ConfigError("Pass either config= or keyword options to create_pruner, not both.")
    if config is None:
        return build_options("pruner", spec.name, spec.config, options)
    if isinstance(config, Mapping):
        from_dict = getattr(spec.config, "from_dict", None)
        try:
            return from_dict(dict(config)) if from_dict else spec.config(**config)
        except (TypeError, ValueError, KeyError) as err:
            raise ConfigError(f"Invalid config for pruner {spec.name!r}: {err}") from err
    if spec.config is not None and not isinstance(config, spec.config):
        raise ConfigError(
            f"config for pruner {spec.name!r} must be a dict or {spec.config.__name__}, "
            f"got {type(config).__name__}."
        )
    return config
