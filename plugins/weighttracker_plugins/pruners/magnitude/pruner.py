"""The ``magnitude`` pruner itself: masks, targets and the step / finalize cycle."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, NamedTuple

import attrs
import torch
from torch import nn
from torch.nn.utils import prune

from weighttracker_core.plugin import (
    BuildContext,
    ConfigError,
    PruningError,
    effective_parameter,
)

from .config import MagnitudePrunerConfig, ModuleMagnitudePrunerConfig
from .modes import mask_mode, scheduled_mask
from .report import module_report
from .schedulers import ConstantSparsityScheduler, PolynomialDecayScheduler

__all__ = [
    "ConstantSparsityScheduler",
    "MagnitudeMask",
    "MagnitudePruner",
    "MagnitudePrunerConfig",
    "ModuleMagnitudePrunerConfig",
    "PolynomialDecayScheduler",
    "build_magnitude_pruner",
]

_STATE_VERSION = 1

# Read by their parent (nn.MultiheadAttention uses ``out_proj.weight``) without calling their
# own forward, so the pre-hook that refreshes a masked weight would never run.
_PARENT_READ = (nn.modules.linear.NonDynamicallyQuantizableLinear,)


class MagnitudeMask(prune.CustomFromMask):
    """The ``torch.nn.utils.prune`` method that carries this pruner's mask.

    A ``CustomFromMask`` with its own class so the pruner can be told apart from other
    pruning methods in a ``PruningContainer``; ``mask`` holds this pruner's share only
    (the module's ``<param>_mask`` buffer is the product of every method).
    """


class _Targets(NamedTuple):
    initial_sparsity: float
    target_sparsity: float


@attrs.define
class _Entry:
    name: str
    module: nn.Module
    config: ModuleMagnitudePrunerConfig
    mode: str
    level: float = 0.0

    @property
    def targets(self) -> _Targets:
        return _Targets(self.config.initial_sparsity, self.config.effective_target)


def _stored_param(module: nn.Module, name: str) -> torch.Tensor | None:
    """The tensor that holds a parameter: ``<name>_orig`` once torch pruning is applied."""
    params = module._parameters
    if f"{name}_orig" in params and isinstance(getattr(module, f"{name}_mask", None), torch.Tensor):
        return params[f"{name}_orig"]
    return params.get(name)


def _own_method(module: nn.Module, name: str) -> MagnitudeMask | None:
    for hook in module._forward_pre_hooks.values():
        methods = getattr(hook, "_pruning_methods", (hook,))
        for method in methods:
            if isinstance(method, MagnitudeMask) and method._tensor_name == name:
                return method
    return None


class MagnitudePruner:
    """Prunes weights by magnitude on a schedule, through ``torch.nn.utils.prune`` masks.

    ``prepare()`` sets the masks of step 0, each ``step()`` advances the schedule by one
    and updates the masks whose sparsity changed, ``finalize()`` makes them permanent and
    ``report()`` gives per-module and global sparsity. Masks only ever add zeros: the new
    mask is computed from the current effective weights, so weights zeroed earlier (by
    this pruner or by a torch pruning method) are the first to stay zero.

    Args:
        model: The model to prune (modified in place).
        config: A ``MagnitudePrunerConfig`` or a dict for ``MagnitudePrunerConfig.from_dict``.
    """

    def __init__(self, model: nn.Module, config: MagnitudePrunerConfig | Mapping[str, Any] | None = None) -> None:
        if config is None:
            config = MagnitudePrunerConfig()
        elif isinstance(config, Mapping):
            config = MagnitudePrunerConfig.from_dict(config)
        elif not isinstance(config, MagnitudePrunerConfig):
            raise ConfigError(f"config must be a MagnitudePrunerConfig or a dict, got {type(config).__name__}.")
        self.model = model
        self.config = config
        self._entries: dict[str, _Entry] = {}
        self._step_count = 0
        self._prepared = False
        self._finalized = False

    # ----------------------------------------------------------------------- state

    @property
    def step_count(self) -> int:
        """0 after ``prepare()``, +1 per ``step()``."""
        return self._step_count

    @property
    def is_prepared(self) -> bool:
        return self._prepared

    @property
    def is_finalized(self) -> bool:
        return self._finalized

    @property
    def module_names(self) -> tuple[str, ...]:
        """Names of the modules this pruner masks (known after ``prepare()``)."""
        return tuple(self._entries)

    @property
    def sparsity_levels(self) -> dict[str, float]:
        """Scheduled sparsity of each pruned module at the current step."""
        return {name: entry.level for name, entry in self._entries.items()}

    def module_config(self, name: str) -> ModuleMagnitudePrunerConfig:
        """The config a pruned module got (after ``prepare()``)."""
        try:
            return self._entries[name].config
        except KeyError:
            raise ConfigError(f"Module {name!r} is not pruned by this pruner; pruned: {list(self._entries)}.") from None

    # ----------------------------------------------------------------------- planning

    def _plan(self) -> dict[str, _Entry]:
        """Every module to prune with its config; raises before anything is changed."""
        modules = dict(self.model.named_modules())
        for name in self.config.module_name_configs:
            if name not in modules:
                close = difflib.get_close_matches(name, list(modules), n=3)
                hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ConfigError(
                    f"module_name_configs names {name!r}, which is not a module of the model.{hint} "
                    f"Names are those of model.named_modules(), e.g. 'layer1.0.conv1'."
                )
        entries: dict[str, _Entry] = {}
        owners: dict[int, str] = {}
        for name, module in modules.items():
            source, config = self.config.lookup(name, module)
            if config is None:
                continue
            explicit = source == "name"
            if isinstance(module, _PARENT_READ):
                if explicit:
                    raise ConfigError(
                        f"Module {name!r} ({type(module).__name__}) cannot be mask-pruned: its parent reads "
                        f"its weight directly, so the mask would not be refreshed. Remove it from "
                        f"module_name_configs."
                    )
                continue
            param = _stored_param(module, config.param_name)
            if param is None:
                if explicit:
                    raise ConfigError(
                        f"Module {name!r} ({type(module).__name__}) has no parameter {config.param_name!r}; "
                        f"its parameters: {sorted(n for n, _ in module.named_parameters(recurse=False))}."
                    )
                continue
            self._check_shape(name, config, tuple(param.shape))
            if _own_method(module, config.param_name) is not None:
                raise ConfigError(
                    f"{name}.{config.param_name} is already masked by another magnitude pruner; "
                    f"finalize that one first."
                )
            if id(param) in owners:
                raise ConfigError(
                    f"Modules {owners[id(param)]!r} and {name!r} share one {config.param_name!r} parameter "
                    f"(tied weights); mask at most one of them (set the other's config to None)."
                )
            owners[id(param)] = name
            entries[name] = _Entry(name, module, config, mask_mode(config, param.dim()))
        return entries

    @staticmethod
    def _check_shape(name: str, config: ModuleMagnitudePrunerConfig, shape: tuple[int, ...]) -> None:
        where = f"module {name!r} ({config.param_name} of shape {list(shape)})"
        if not shape:
            raise ConfigError(f"Cannot mask-prune {where}: it is a single number.")
        if config.block_size > 1 and config.block_size > shape[0] // 2:
            raise ConfigError(
                f"block_size={config.block_size} is too large for {where}: it must be at most half the "
                f"{shape[0]} output channels ({shape[0] // 2}). Lower block_size or give this module its "
                f"own config."
            )
        if config.n_m_ratio is not None and len(shape) < 2:
            raise ConfigError(f"n_m_ratio needs a weight of rank >= 2; {where} has rank {len(shape)}.")

    # ----------------------------------------------------------------------- the schedule

    def prepare(self) -> nn.Module:
        """Attach the masks of step 0 to every configured module (in place; a no-op when repeated).

        Raises:
            ConfigError: For a config that does not fit the model (the model is left unchanged).
        """
        if self._prepared:
            return self.model
        if self._finalized:
            raise PruningError("This pruner was finalized; create a new pruner to prune again.")
        entries = self._plan()
        for entry in entries.values():
            entry.level = entry.config.scheduler.compute_sparsity(0, entry.config.initial_sparsity, entry.targets)
            self._apply(entry, first=True)
        self._entries = entries
        self._step_count = 0
        self._prepared = True
        return self.model

    def step(self) -> None:
        """Advance the schedule by one step and update the masks whose sparsity changed.

        Raises:
            PruningError: Before ``prepare()`` or after ``finalize()``.
        """
        self._require_active("step()")
        self._step_count += 1
        for entry in self._entries.values():
            level = entry.config.scheduler.compute_sparsity(self._step_count, entry.level, entry.targets)
            if level != entry.level:
                entry.level = level
                self._apply(entry, first=False)

    def _require_active(self, what: str) -> None:
        if self._finalized:
            raise PruningError(f"{what} after finalize(): the masks are already baked in; create a new pruner.")
        if not self._prepared:
            raise PruningError(f"{what} before prepare(): call pruner.prepare() once before training.")

    def _apply(self, entry: _Entry, *, first: bool) -> None:
        module, name = entry.module, entry.config.param_name
        with torch.no_grad():
            current = effective_parameter(module, name)
            mask = scheduled_mask(current, entry.config, entry.level)
        buffer = getattr(module, f"{name}_mask", None)
        own = _own_method(module, name)
        if first or own is None or not isinstance(buffer, torch.Tensor):
            # First time, or someone ran prune.remove since: (re)attach our method; torch
            # composes it with any pruning already on this parameter.
            MagnitudeMask.apply(module, name, mask=mask)
            return
        with torch.no_grad():
            buffer.mul_(mask.to(buffer.dtype))
            own.mask = own.mask * mask.to(own.mask.dtype)
        # Refresh the attribute now; the forward pre-hook does the same before each forward.
        setattr(module, name, module._parameters[f"{name}_orig"] * buffer)

    def finalize(self) -> nn.Module:
        """Bake every mask into its parameter with ``prune.remove`` (in place) and return the model.

        Masks from other ``torch.nn.utils.prune`` methods on the same parameters are baked in
        too. The parameters are the same ``nn.Parameter`` objects as before ``prepare()``.
        """
        self._require_active("finalize()")
        for entry in self._entries.values():
            module, name = entry.module, entry.config.param_name
            if isinstance(getattr(module, f"{name}_mask", None), torch.Tensor):
                prune.remove(module, name)
        self._finalized = True
        return self.model

    # ----------------------------------------------------------------------- save and resume

    def state_dict(self) -> dict[str, Any]:
        """Where the schedule stands: the step, each module's level and this pruner's masks.

        Masks are boolean tensors (save with ``torch.save``). Together with the model's
        ``state_dict`` (which holds ``<param>_orig`` and ``<param>_mask``) it lets a new
        pruner carry on: :meth:`load_state_dict`.
        """
        modules: dict[str, Any] = {}
        for name, entry in self._entries.items():
            own = _own_method(entry.module, entry.config.param_name)
            modules[name] = {
                "config": entry.config.as_dict(),
                "level": entry.level,
                "mask": None if own is None else own.mask.detach().to("cpu", torch.bool).clone(),
            }
        return {"pruner": "magnitude", "version": _STATE_VERSION, "step_count": self._step_count,
                "prepared": self._prepared, "finalized": self._finalized, "modules": modules}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume the schedule of :meth:`state_dict` on a new pruner of a fresh model.

        Create the pruner with the same config on the model built as before, call this
        *instead of* ``prepare()`` (it puts the saved masks on the model, so the model then
        has ``<param>_orig`` / ``<param>_mask`` and takes the saved model ``state_dict``),
        then ``model.load_state_dict(saved)`` and carry on with ``step()``.

        Raises:
            ConfigError: The state is not a magnitude pruner's, or its modules or their
                configs differ from this pruner's (nothing is changed).
            PruningError: This pruner was already prepared or finalized.
        """
        if not isinstance(state, Mapping) or state.get("pruner") != "magnitude":
            got = state.get("pruner") if isinstance(state, Mapping) else type(state).__name__
            raise ConfigError(f"This is not the state of a 'magnitude' pruner (its 'pruner' entry is "
                              f"{got!r}); pass what pruner.state_dict() of a magnitude pruner returned.")
        if state.get("version") != _STATE_VERSION:
            raise ConfigError(f"'magnitude' pruner state version {state.get('version')!r} cannot be "
                              f"read here (this version reads {_STATE_VERSION}).")
        if self._prepared or self._finalized:
            raise PruningError("load_state_dict needs a pruner that was not prepared yet; create a "
                               "new one with tracker.create_pruner('magnitude', config=...).")
        saved = state["modules"]
        if not state["prepared"]:
            return
        entries = self._plan()
        if list(entries) != list(saved):
            extra = [n for n in entries if n not in saved] or [n for n in saved if n not in entries]
            raise ConfigError(
                f"The saved magnitude pruner masked other modules: {extra[0]!r} is in only one of "
                f"this pruner ({len(entries)} modules) and the state ({len(saved)}). Create it with "
                "the saved config on the model built as before."
            )
        for name, entry in entries.items():
            if entry.config.as_dict() != saved[name]["config"]:
                raise ConfigError(
                    f"Module {name!r} has config {entry.config.as_dict()} here, "
                    f"{saved[name]['config']} in the saved state; use the saved config."
                )
            mask = saved[name]["mask"]
            shape = tuple(_stored_param(entry.module, entry.config.param_name).shape)
            if not state["finalized"] and (mask is None or tuple(mask.shape) != shape):
                raise ConfigError(
                    f"The saved mask of {name!r} has shape {None if mask is None else list(mask.shape)}, "
                    f"the parameter {list(shape)}; the model is not built as before."
                )
        if not state["finalized"]:
            for name, entry in entries.items():
                param = _stored_param(entry.module, entry.config.param_name)
                mask = saved[name]["mask"].to(param.device, param.dtype)
                MagnitudeMask.apply(entry.module, entry.config.param_name, mask=mask)
        for name, entry in entries.items():
            entry.level = float(saved[name]["level"])
        self._entries = entries
        self._step_count = int(state["step_count"])
        self._prepared = True
        self._finalized = bool(state["finalized"])

    def report(self) -> dict[str, dict[str, Any]]:
        """Sparsity per pruned module plus a ``"global"`` entry (plain Python numbers).

        Per module: ``mode``, ``param_name``, ``scheduled_sparsity``, ``target_sparsity``,
        ``num_params``, ``num_zeros``, ``unstructured_sparsity`` (zeros / params of the
        effective weight), ``structured_sparsity`` (all-zero slices of dim 0), and
        ``block_sparsity`` (block modes) or ``n_m_block_fraction`` (n:m: complete blocks of
        ``m`` with at least ``n`` zeros). Global: ``num_modules``, ``num_params``,
        ``num_zeros``, ``unstructured_sparsity``, ``step_count``.
        """
        if not self._prepared:
            raise PruningError("report() before prepare(): call pruner.prepare() first.")
        out: dict[str, dict[str, Any]] = {}
        total = zeros = 0
        for name, entry in self._entries.items():
            with torch.no_grad():
                weight = effective_parameter(entry.module, entry.config.param_name).detach()
            stats = module_report(weight, entry.config, entry.mode)
            stats["scheduled_sparsity"] = entry.level
            stats["target_sparsity"] = entry.config.effective_target
            out[name] = stats
            total += stats["num_params"]
            zeros += stats["num_zeros"]
        out["global"] = {
            "num_modules": len(self._entries),
            "num_params": total,
            "num_zeros": zeros,
            "unstructured_sparsity": zeros / total if total else 0.0,
            "step_count": self._step_count,
        }
        return out


def build_magnitude_pruner(ctx: BuildContext) -> MagnitudePruner:
    """``PrunerSpec.build``: a pruner over the tracker's model with ``ctx.options`` as config."""
    return MagnitudePruner(ctx.structure.model, ctx.options)
