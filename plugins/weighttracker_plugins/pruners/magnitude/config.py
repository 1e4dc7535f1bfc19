"""attrs configs of the ``magnitude`` mask pruner.

``ModuleMagnitudePrunerConfig`` says how one parameter is pruned; ``MagnitudePrunerConfig``
says which modules get which config (per name, then per type, then global). Both are
immutable and convert from/to plain dicts and YAML, e.g.::

    MagnitudePrunerConfig.from_dict({
        "global_config": {"target_sparsity": 0.5},
        "module_type_configs": {"Linear": {"n_m_ratio": [2, 4]}},
        "module_name_configs": {"head": None},   # None: never prune ``head``
    })
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from numbers import Integral, Real
from typing import IO, Any

import attrs
import torch
from torch import nn

from weighttracker_core import ConfigError

from .._config_io import config_from_dict, load_yaml, quote
from .schedulers import ConstantSparsityScheduler, PolynomialDecayScheduler, to_scheduler

__all__ = ["GRANULARITIES", "SUPPORTED_MODULES", "MagnitudePrunerConfig", "ModuleMagnitudePrunerConfig"]

GRANULARITIES = ("per_scalar", "per_channel", "per_kernel")
# Layers the global config covers; type and name configs may name other layers.
SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _ratio(value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ConfigError(f"A sparsity must be a number in [0, 1], got {quote(value)}.")
    return float(value)


def _in_unit_interval(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(
            f"{attribute.name}={quote(value)} is outside [0, 1]; a sparsity is the fraction of weights "
            f"set to zero (0.5 zeroes half)."
        )


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ConfigError(f"{name} must be a whole number, got {quote(value)}.")
    return int(value)


def _block_size(value: Any) -> int:
    size = _int("block_size", value)
    if size < 1:
        raise ConfigError(f"block_size={size} must be >= 1 (1 disables block sparsity).")
    return size


def _dim(value: Any) -> int:
    dim = _int("dim", value)
    if dim not in (0, 1):
        raise ConfigError(
            f"dim={dim} is not allowed; n:m blocks run along dim 0 (output channels) or 1 (input channels)."
        )
    return dim


def _n_m_ratio(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ConfigError(f"n_m_ratio={quote(value)} must be a pair (n, m) such as (2, 4), or None.")
    n, m = (_int("n_m_ratio entries", v) for v in value)
    if m < 1 or not 0 <= n <= m:
        raise ConfigError(
            f"n_m_ratio={(n, m)} is not allowed: m must be >= 1 and n (the zeros per block of m) "
            f"between 0 and m."
        )
    return (n, m)


def _granularity(_inst: Any, _attribute: attrs.Attribute, value: Any) -> None:
    if value not in GRANULARITIES:
        raise ConfigError(f"granularity={quote(value)} is not allowed; choose one of {', '.join(GRANULARITIES)}.")


def _param_name(_inst: Any, _attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not value.isidentifier():
        raise ConfigError(f"param_name={quote(value)} must be the name of a parameter, such as 'weight'.")


@attrs.frozen(kw_only=True)
class ModuleMagnitudePrunerConfig:
    """How one parameter of one module is pruned.

    Modes: unstructured (default), block (``block_size > 1``: blocks of rows of dim 0
    with the lowest L2 norm), n:m (``n_m_ratio=(n, m)``: ``n`` zeros in every ``m``
    weights along ``dim``; ``target_sparsity`` is then ignored and becomes ``n / m``),
    and per-channel / per-kernel (``granularity``, weights of rank >= 3).

    Args:
        scheduler: When the sparsity changes (default: the target from step 0 on).
        initial_sparsity: Fraction of zeros at the start of the schedule.
        target_sparsity: Fraction of zeros at its end.
        granularity: ``per_scalar``, ``per_channel`` or ``per_kernel``.
        block_size: Rows of dim 0 pruned together (at most half the output channels).
        n_m_ratio: ``(n, m)``: zero ``n`` of every ``m`` weights; needs ``block_size=1``,
            ``granularity="per_scalar"`` and ``initial_sparsity=0``.
        dim: Axis of the n:m blocks: 1 (input channels, default) or 0 (output channels).
        param_name: Parameter to prune.

    Raises:
        ConfigError: For a value out of range or a forbidden combination.
    """

    scheduler: ConstantSparsityScheduler | PolynomialDecayScheduler = attrs.field(
        factory=ConstantSparsityScheduler, converter=to_scheduler
    )
    initial_sparsity: float = attrs.field(default=0.0, converter=_ratio, validator=_in_unit_interval)
    target_sparsity: float = attrs.field(default=0.5, converter=_ratio, validator=_in_unit_interval)
    granularity: str = attrs.field(default="per_scalar", validator=_granularity)
    block_size: int = attrs.field(default=1, converter=_block_size)
    n_m_ratio: tuple[int, int] | None = attrs.field(default=None, converter=_n_m_ratio)
    dim: int = attrs.field(default=1, converter=_dim)
    param_name: str = attrs.field(default="weight", validator=_param_name)

    def __attrs_post_init__(self) -> None:
        if self.n_m_ratio is None:
            return
        clashes = []
        if self.block_size != 1:
            clashes.append(f"block_size={self.block_size} (must be 1)")
        if self.granularity != "per_scalar":
            clashes.append(f"granularity={self.granularity!r} (must be 'per_scalar')")
        if self.initial_sparsity != 0.0:
            clashes.append(f"initial_sparsity={self.initial_sparsity} (must be 0.0)")
        if clashes:
            raise ConfigError(
                f"n_m_ratio={self.n_m_ratio} cannot be combined with {'; '.join(clashes)}. "
                f"n:m sparsity is its own mode: drop the other settings or set n_m_ratio=None."
            )

    @property
    def effective_target(self) -> float:
        """The sparsity the schedule heads for: ``n / m`` in n:m mode, else ``target_sparsity``."""
        if self.n_m_ratio is not None:
            n, m = self.n_m_ratio
            return n / m
        return self.target_sparsity

    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any]) -> ModuleMagnitudePrunerConfig:
        """Build from plain values; ``scheduler`` may be a dict, ``n_m_ratio`` a list.

        Raises:
            ConfigError: For an unknown key (naming it and the allowed keys) or a bad value.
        """
        return config_from_dict(cls, config_dict, "ModuleMagnitudePrunerConfig")

    @classmethod
    def from_yaml(cls, yml: IO[str] | str | os.PathLike[str]) -> ModuleMagnitudePrunerConfig:
        """Build from a YAML stream or the path of a YAML file."""
        return cls.from_dict(load_yaml(yml) or {})

    def as_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples), ready for ``yaml.safe_dump`` and ``from_dict``."""
        return {
            "scheduler": self.scheduler.as_dict(),
            "initial_sparsity": self.initial_sparsity,
            "target_sparsity": self.target_sparsity,
            "granularity": self.granularity,
            "block_size": self.block_size,
            "n_m_ratio": list(self.n_m_ratio) if self.n_m_ratio is not None else None,
            "dim": self.dim,
            "param_name": self.param_name,
        }


def _module_config(value: Any, where: str) -> ModuleMagnitudePrunerConfig | None:
    if value is None or isinstance(value, ModuleMagnitudePrunerConfig):
        return value
    if isinstance(value, Mapping):
        return ModuleMagnitudePrunerConfig.from_dict(value)
    raise ConfigError(
        f"{where} must be a ModuleMagnitudePrunerConfig, a dict of its fields or None, got {quote(value)}."
    )


def _global_config(value: Any) -> ModuleMagnitudePrunerConfig | None:
    return _module_config(value, "global_config")


def _type_key(key: Any) -> type | str:
    if isinstance(key, str) and key:
        check_type_key(key, strict=False)
        return key
    if isinstance(key, type) and issubclass(key, nn.Module):
        return key
    raise ConfigError(
        f"module_type_configs key {quote(key)} must be a module class (torch.nn.Linear) or its name ('Linear')."
    )


def _type_configs(value: Any) -> dict[type | str, ModuleMagnitudePrunerConfig | None]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"module_type_configs must be a dict, got {quote(value)}.")
    return {_type_key(k): _module_config(v, f"module_type_configs[{quote(k)}]") for k, v in value.items()}


def type_names(cls: type) -> set[str]:
    """The strings a ``module_type_configs`` key may use for ``cls``.

    The class name (``"Linear"``), its full path (``"torch.nn.modules.linear.Linear"``)
    and, for torch layers, ``"torch.nn.Linear"``.
    """
    names = {cls.__name__, f"{cls.__module__}.{cls.__qualname__}"}
    if cls.__module__.startswith("torch.nn.modules"):
        names.add(f"torch.nn.{cls.__name__}")
    return names


def _module_classes() -> list[type]:
    """Every subclass of ``nn.Module`` defined in this process (``nn.Module`` included)."""
    seen: set[type] = {nn.Module}
    stack: list[type] = [nn.Module]
    while stack:
        for sub in type.__subclasses__(stack.pop()):
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
    return list(seen)


# String keys found to name a module class. Only positive answers are kept: a class
# defined later can turn an unknown name into a known one, never the other way round.
_KNOWN_TYPE_KEYS: set[str] = set()


def check_type_key(key: str, strict: bool = True) -> None:
    """Refuse a ``module_type_configs`` name that no module class has.

    A name is known when some subclass of ``nn.Module`` defined in this process has it
    (see :func:`type_names`). An unknown name can never match a layer of a model, whose
    classes are necessarily defined, so :meth:`MagnitudePrunerConfig.lookup` refuses it
    (``strict=True``). When a config is built the model's classes may not be imported
    yet, so there only names that differ from a known one in letter case alone
    (``"Conv2D"`` for ``"Conv2d"``) are refused (``strict=False``).

    Raises:
        ConfigError: Naming the key and the closest known names.
    """
    if key in _KNOWN_TYPE_KEYS:
        return
    names: dict[str, type] = {}
    for cls in _module_classes():
        for name in type_names(cls):
            names.setdefault(name, cls)
    if key in names:
        _KNOWN_TYPE_KEYS.add(key)
        return
    same_but_case = sorted(n for n in names if n.casefold() == key.casefold())
    if not strict and not same_but_case:
        return
    close = same_but_case or difflib.get_close_matches(key, list(names), n=3, cutoff=0.7)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ConfigError(
        f"module_type_configs key {quote(key)} is not the name of any module class, so it would "
        f"match no layer.{hint} Use the class itself (torch.nn.Conv2d) or a name it has: "
        f"type(module).__name__ ('Conv2d'), the full path ('torch.nn.modules.conv.Conv2d') or, "
        f"for torch layers, 'torch.nn.Conv2d'; names are case-sensitive."
    )


def _name_configs(value: Any) -> dict[str, ModuleMagnitudePrunerConfig | None]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"module_name_configs must be a dict, got {quote(value)}.")
    out = {}
    for key, config in value.items():
        if not isinstance(key, str):
            raise ConfigError(f"module_name_configs key {quote(key)} must be a module name such as 'layer1.0.conv1'.")
        out[key] = _module_config(config, f"module_name_configs[{quote(key)}]")
    return out


def type_key_matches(key: type | str, cls: type) -> bool:
    """Whether a ``module_type_configs`` key names ``cls`` (a string: one of :func:`type_names`)."""
    if isinstance(key, type):
        return key is cls
    return key in type_names(cls)


def type_key_name(key: type | str) -> str:
    return key if isinstance(key, str) else f"{key.__module__}.{key.__qualname__}"


@attrs.frozen(kw_only=True)
class MagnitudePrunerConfig:
    """Which module gets which ``ModuleMagnitudePrunerConfig``.

    A module's config is looked up by its full name in ``module_name_configs``, then by
    its class (nearest in the class hierarchy) in ``module_type_configs``, then
    ``global_config``, which covers only ``Linear`` and ``Conv1d/2d/3d`` layers. A
    ``None`` config means "do not prune". With nothing given at all, the global config is
    the default ``ModuleMagnitudePrunerConfig()`` (50 % unstructured).

    Args:
        global_config: Config for every supported layer without a more specific one.
        module_type_configs: ``{module class or class name: config or None}``.
        module_name_configs: ``{module name: config or None}``; names as in
            ``model.named_modules()``.
    """

    global_config: ModuleMagnitudePrunerConfig | None = attrs.field(default=None, converter=_global_config)
    module_type_configs: dict[type | str, ModuleMagnitudePrunerConfig | None] = attrs.field(
        factory=dict, converter=_type_configs
    )
    module_name_configs: dict[str, ModuleMagnitudePrunerConfig | None] = attrs.field(
        factory=dict, converter=_name_configs
    )

    def __attrs_post_init__(self) -> None:
        if self.global_config is None and not self.module_type_configs and not self.module_name_configs:
            object.__setattr__(self, "global_config", ModuleMagnitudePrunerConfig())

    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any]) -> MagnitudePrunerConfig:
        """Build from nested plain values (module configs as dicts or ``None``).

        Raises:
            ConfigError: For an unknown key at any level (naming it and the allowed keys).
        """
        return config_from_dict(cls, config_dict, "MagnitudePrunerConfig")

    @classmethod
    def from_yaml(cls, yml: IO[str] | str | os.PathLike[str]) -> MagnitudePrunerConfig:
        """Build from a YAML stream or the path of a YAML file."""
        return cls.from_dict(load_yaml(yml) or {})

    def as_dict(self) -> dict[str, Any]:
        """Plain nested values; class keys of ``module_type_configs`` become their full names."""

        def plain(config: ModuleMagnitudePrunerConfig | None) -> dict[str, Any] | None:
            return None if config is None else config.as_dict()

        return {
            "global_config": plain(self.global_config),
            "module_type_configs": {type_key_name(k): plain(v) for k, v in self.module_type_configs.items()},
            "module_name_configs": {k: plain(v) for k, v in self.module_name_configs.items()},
        }

    def set_global(self, global_config: ModuleMagnitudePrunerConfig | Mapping[str, Any] | None) -> MagnitudePrunerConfig:
        """A copy with another global config (configs are immutable)."""
        return attrs.evolve(self, global_config=global_config)

    def set_module_type(
        self, object_type: type | str, opt_config: ModuleMagnitudePrunerConfig | Mapping[str, Any] | None
    ) -> MagnitudePrunerConfig:
        """A copy with the config of one module type set (replacing an earlier one)."""
        configs = {k: v for k, v in self.module_type_configs.items() if k != object_type}
        configs[object_type] = opt_config  # type: ignore[assignment]
        return attrs.evolve(self, module_type_configs=configs)

    def set_module_name(
        self, module_name: str, opt_config: ModuleMagnitudePrunerConfig | Mapping[str, Any] | None
    ) -> MagnitudePrunerConfig:
        """A copy with the config of one named module set (replacing an earlier one)."""
        return attrs.evolve(self, module_name_configs={**self.module_name_configs, module_name: opt_config})

    def lookup(self, name: str, module: nn.Module) -> tuple[str | None, ModuleMagnitudePrunerConfig | None]:
        """``(source, config)`` for one module; ``source`` is ``"name"``, ``"type"``, ``"global"`` or
        ``None`` (no entry covers the module).

        Raises:
            ConfigError: A string key of ``module_type_configs`` is the name of no module
                class defined in this process (a typo such as ``"Conv2d "``); the message
                names the key and the closest names.
        """
        for key in self.module_type_configs:
            if isinstance(key, str):
                check_type_key(key)
        if name in self.module_name_configs:
            return "name", self.module_name_configs[name]
        for cls in type(module).__mro__:
            for key, config in self.module_type_configs.items():
                if type_key_matches(key, cls):
                    return "type", config
        if isinstance(module, SUPPORTED_MODULES):
            return "global", self.global_config
        return None, None
