"""Reading pruner configs from plain dicts and YAML (shared by the pruners' attrs configs).

No hook implementations here: this module is a helper, not a plugin.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import attrs
import yaml

from weighttracker_core import ConfigError


def check_keys(owner: str, given: Mapping[str, Any], allowed: tuple[str, ...], noun: str = "key") -> None:
    """Refuse a key of ``given`` not in ``allowed``, naming it and every allowed one."""
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise ConfigError(
            f"Unknown {noun} {unknown[0]!r} in {owner}; allowed {noun}s: {', '.join(allowed)}."
        )


def config_from_dict(cls: type, data: Any, owner: str, noun: str = "key") -> Any:
    """``cls(**data)`` after checking that ``data`` is a mapping of ``cls``'s fields."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{owner} must be built from a dict, got {data!r}.")
    check_keys(owner, data, tuple(f.name for f in attrs.fields(cls)), noun)
    return cls(**dict(data))


def load_yaml(source: IO[str] | str | os.PathLike[str]) -> Any:
    """YAML from a stream, a file path, or (a ``str`` with a newline or ``:``) YAML text."""
    if hasattr(source, "read"):
        return yaml.safe_load(source)  # type: ignore[arg-type]
    if isinstance(source, str) and not Path(source).is_file() and ("\n" in source or ":" in source):
        return yaml.safe_load(source)
    try:
        with open(os.fspath(source), encoding="utf-8") as stream:
            return yaml.safe_load(stream)
    except OSError as err:
        raise ConfigError(f"Cannot read the YAML config {source!r}: {err.strerror}.") from err
