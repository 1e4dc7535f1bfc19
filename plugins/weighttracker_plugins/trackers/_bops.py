"""What the two BOPs trackers share: options, layer choice, bit-widths and the report.

Private to ``weighttracker_plugins.trackers`` (no hooks here). A BOPs tracker only says
how many MACs each layer has active (:meth:`BopsTracker.active_macs`); everything else --
bit-widths, the dense 32-bit baseline, ``normalization_macs_pr_module``, the metric keys --
is the same for both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs
import torch

from weighttracker_core.plugin import BuildContext, Evaluation, ConfigError, LayerCategory

from ..calculations._memo import LastResult
from ..calculations.cost import DEFAULT_BITS, read_bitwidths
from ._layers import counted_layers, layer_label

BASELINE_BITS = DEFAULT_BITS * DEFAULT_BITS  # dense baseline: 32-bit weights x 32-bit activations


def _normalization(value: Any) -> tuple[float, ...] | dict[str, float] | None:
    """``normalization_macs_pr_module`` as a tuple (or ``{layer name: MACs}``) of floats."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        out = {str(k): _mac_value(v, str(k)) for k, v in value.items()}
        return out
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().reshape(-1).tolist()
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(
            f"normalization_macs_pr_module must be a sequence of MAC counts (one per counted "
            f"layer) or a {{layer name: MACs}} dict, got {value!r}."
        )
    return tuple(_mac_value(v, f"entry {i}") for i, v in enumerate(value))


def _mac_value(value: Any, where: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(
            f"normalization_macs_pr_module[{where}] is {value!r}; MAC counts must be finite "
            "numbers >= 0."
        )
    return float(value)


_flag = attrs.validators.instance_of(bool)


@attrs.frozen(kw_only=True)
class BopsOptions:
    """Options of ``structured_bops`` and ``unstructured_bops``.

    Args:
        log_total_bops: Also report ``bops`` and ``baseline`` (the dense 32x32-bit BOPs).
        log_layerwise_stats: Also report ``modules[name] = {bops, baseline,
            compression_rate}``.
        normalization_macs_pr_module: Baseline MACs to compare against instead of the
            model's own: one number per counted layer in the tracker's layer order (as
            ``modules`` lists them), or ``{layer name: MACs}``. Use it to report compression
            of a physically pruned model against the model before the prune.
    """

    log_total_bops: bool = attrs.field(default=False, validator=_flag)
    log_layerwise_stats: bool = attrs.field(default=False, validator=_flag)
    normalization_macs_pr_module: tuple[float, ...] | dict[str, float] | None = attrs.field(
        default=None, converter=_normalization, eq=False
    )


class BopsTracker:
    """Base of the BOPs trackers: ``BOPs_m = active MACs_m * b_weight_m * b_act_m``.

    ``compression = 1 - sum_m BOPs_m / sum_m (BaselineMACs_m * 32 * 32)`` over the counted
    layers (weighted layers by default; normalization layers only when named in
    ``include``). Subclasses implement :meth:`active_macs`.
    """

    def __init__(self, ctx: BuildContext) -> None:
        self.structure = ctx.structure
        self.options: BopsOptions = ctx.options
        self.layers = counted_layers(ctx.structure, ctx.selection, ctx.name,
                                     categories=(LayerCategory.WEIGHTED, LayerCategory.ATTENTION))
        self.labels = [layer_label(info.name) for info in self.layers]
        self._rows = torch.tensor([info.index for info in self.layers], dtype=torch.int32)
        # bit-widths of weighted layers come from the shared calculations; layers of other
        # categories that include= adds are asked here, on every track() as well
        self._extra = [(i, info) for i, info in enumerate(self.layers)
                       if info.category not in (LayerCategory.WEIGHTED, LayerCategory.ATTENTION)]
        self._norm = self._normalization(ctx.name)
        self._device_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._last = LastResult()

    def _normalization(self, name: str) -> torch.Tensor | None:
        given = self.options.normalization_macs_pr_module
        if given is None:
            return None
        if isinstance(given, dict):
            names = [info.name for info in self.layers]
            missing = [n for n in names if n not in given]
            unknown = [n for n in given if n not in names]
            if missing or unknown:
                raise ConfigError(
                    f"Tracker {name!r}: normalization_macs_pr_module must give MACs for exactly "
                    f"the counted layers; missing {missing}, not counted {unknown}."
                )
            values = [given[n] for n in names]
        else:
            values = list(given)
            if len(values) != len(self.layers):
                raise ConfigError(
                    f"Tracker {name!r}: normalization_macs_pr_module has {len(values)} entries "
                    f"but the tracker counts {len(self.layers)} layers "
                    f"({', '.join(self.labels)}); give one MAC count per counted layer, in "
                    "this order."
                )
        return torch.tensor(values, dtype=torch.float64)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if device not in self._device_cache:
            norm = None if self._norm is None else self._norm.to(device)
            self._device_cache[device] = (self._rows.to(device), norm)
        return self._device_cache[device]

    def active_macs(self, values: Any) -> torch.Tensor:
        """Active MACs of every layer of the table (float64 ``[num_layers]``)."""
        raise NotImplementedError

    def _bits(self, values: Any, kind: str, rows: torch.Tensor) -> torch.Tensor:
        bits = values[f"layer_{kind}_bits"].index_select(0, rows)
        if self._extra:
            extra = read_bitwidths(values.bitwidths, self.structure, [info for _, info in self._extra], kind)
            where = torch.tensor([i for i, _ in self._extra], dtype=torch.long, device=bits.device)
            bits = bits.index_copy(0, where, torch.tensor(extra, dtype=bits.dtype, device=bits.device))
        return bits

    def _baseline(self, values: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """Dense 32x32-bit BOPs per counted layer, their sum, the sum clamped, and whether it
        is positive (static)."""
        key = ("baseline", device)
        if key not in self._device_cache:
            rows, norm = self._on(device)
            base_macs = values["layer_baseline_macs"].to(device).index_select(0, rows) if norm is None else norm
            baseline = base_macs * BASELINE_BITS
            total = baseline.sum()
            self._device_cache[key] = (baseline, total, total.clamp(min=1e-300), bool(total > 0))  # type: ignore[assignment]
        return self._device_cache[key]  # type: ignore[return-value]

    #: The calculations :meth:`active_macs` reads (their values decide it).
    inputs: tuple[str, ...] = ()

    def track(self, values: Evaluation) -> dict[str, Any]:
        if self._extra or not self.inputs:  # bit-width functions are called here: nothing to reuse
            return self._track(values)
        # a pure function of shared values: reused while they are the same objects
        names = (*self.inputs, "layer_weight_bits", "layer_activation_bits")
        return self._last.get(tuple(values[n] for n in names), lambda: self._track(values))

    def _track(self, values: Any) -> dict[str, Any]:
        macs = self.active_macs(values)
        rows, _ = self._on(macs.device)
        bops = macs.index_select(0, rows) * self._bits(values, "weight", rows) * self._bits(values, "activation", rows)
        baseline, total_baseline, clamped, positive = self._baseline(values, macs.device)
        total = bops.sum()
        # 1 - bops / baseline, and 0 without a baseline (nothing to compress)
        compression = 1 - total / clamped if positive else torch.zeros_like(total)
        out: dict[str, Any] = {"compression": compression}
        if self.options.log_total_bops:
            out["bops"] = total
            out["baseline"] = total_baseline
        if self.options.log_layerwise_stats:
            rates = _compression(bops, baseline)
            out["modules"] = {
                label: {"bops": b, "baseline": base, "compression_rate": rate}
                for label, b, base, rate in zip(self.labels, bops.unbind(), baseline.unbind(), rates.unbind())
            }
        return out


def _compression(bops: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """``1 - bops / baseline``, and 0 where the baseline is 0 (nothing to compress)."""
    return torch.where(baseline > 0, 1 - bops / baseline.clamp(min=1e-300), torch.zeros_like(bops))
