"""``nvidia_2_4_sparsity`` tracker: how close the weights are to 2:4 sparsity.

Sparse tensor cores skip half of every block of 4 consecutive weights along a GEMM's
reduction (input) axis. Blocks are cut along the input axis of each weight:

* ``Linear`` / attention projections ``[out, in]``: 4 consecutive columns of one row;
* convolutions ``[K, C/groups, *kernel]``: 4 consecutive input channels at one
  (output channel, kernel position) -- the ``C`` axis of the ``[K, *kernel, C]`` layout;
* transposed convolutions ``[C, K/groups, *kernel]``: 4 consecutive input channels along
  dim 0.

A block is *strict* with exactly 2 zeros and *eligible* with at least 2 (a block with 3 or
4 zeros can still be stored 2:4). When the input axis length ``C`` is not a multiple of 4,
the last ``C % 4`` elements of every row form an incomplete block: they are reported as
``tail_elements``, belong to no block, and stop the layer counting as strict / eligible.

Aggregation (global fractions): blocks are pooled over every counted weight, so
``strict_block_fraction = sum_layers strict_blocks / sum_layers num_blocks`` (a layer weighs
by its number of complete blocks, as element-weighted sparsity does; layers with a tail
still contribute their complete blocks). A layer is strict (eligible) when it has no tail,
at least one block, and every block is strict (eligible). With no complete block at all the
fractions are 0.

Worked example: a ``Linear(6, 1)`` row ``[0, 1, 0, 2, 0, 3]`` has one block
``[0, 1, 0, 2]`` (2 zeros: strict and eligible) and a 2-element tail ``[0, 3]``:
``strict_block_fraction = 1.0``, ``tail_elements = 2``, and the layer is neither strict nor
eligible.

Counted layers: ``weighted`` layers except ``nn.Embedding`` (a lookup, not a GEMM), plus
any layer named in ``include=`` by instance or type; only weight parameters with 2 or more
dimensions have an input axis (a 1-D weight contributes nothing).
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch
from torch import nn

from weighttracker_core.plugin import BuildContext, Evaluation, TrackerSpec, hookimpl

from ..calculations._memo import LastResult
from ..calculations.structure import BLOCK, input_axis
from ._layers import counted_layers, layer_label



@attrs.frozen(kw_only=True)
class Nvidia24Options:
    """``log_layerwise_stats``: add ``layers[name]`` with each layer's own figures."""

    log_layerwise_stats: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))


@attrs.frozen
class _Param:
    name: str
    layer: int  # position in the tracker's layer list
    outer: int  # product of dims before the input axis
    channels: int  # input axis length
    inner: int  # product of dims after it

    @property
    def blocks(self) -> int:
        return self.outer * (self.channels // BLOCK) * self.inner

    @property
    def tail(self) -> int:
        return self.outer * (self.channels % BLOCK) * self.inner


def block_histogram(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """How many complete blocks of 4 along ``axis`` hold 0, 1, 2, 3 and 4 zeros.

    Returns int64 ``[5]``. ``[[0., 1., 0., 2., 5.]]`` with ``axis=1`` gives
    ``tensor([0, 0, 1, 0, 0])``: one block with two zeros (the 5 is a tail element).

    The zero mask is viewed as ``[outer, C // 4, 4, inner]`` (no copy) and its four block
    lanes are added as ``uint8``; one ``bincount`` then histograms the blocks (under
    ``torch.use_deterministic_algorithms`` on an accelerator, five comparisons instead).
    """
    shape = weight.shape
    outer = math.prod(shape[:axis])
    channels = shape[axis]
    inner = math.prod(shape[axis + 1 :])
    full = channels // BLOCK * BLOCK
    zero = (weight.reshape(outer, channels, inner)[:, :full] == 0).view(torch.uint8)
    lanes = zero.reshape(outer, full // BLOCK, BLOCK, inner)
    per_block = lanes[:, :, 0] + lanes[:, :, 1]
    per_block += lanes[:, :, 2]
    per_block += lanes[:, :, 3]
    flat = per_block.reshape(-1)
    if flat.device.type != "cpu" and torch.are_deterministic_algorithms_enabled():
        return torch.stack([(flat == k).sum() for k in range(BLOCK + 1)])
    return torch.bincount(flat, minlength=BLOCK + 1)


class Nvidia24Sparsity:
    """2:4 block statistics of the selected layers (see the module docstring).

    Metrics: ``strict_block_fraction``, ``nvidia_eligible_block_fraction``,
    ``tail_elements``, ``num_blocks``, ``num_strict_blocks``, ``num_eligible_blocks``,
    ``num_layers``, ``num_strict_layers``, ``num_eligible_layers``,
    ``num_layers_with_tail``; with ``log_layerwise_stats`` also ``layers[name]`` with
    ``strict_block_fraction``, ``nvidia_eligible_block_fraction``, ``num_blocks``,
    ``tail_elements``, ``strict`` and ``eligible``.
    """

    def __init__(self, ctx: BuildContext) -> None:
        self.structure = ctx.structure
        self.options: Nvidia24Options = ctx.options
        layers = counted_layers(ctx.structure, ctx.selection, ctx.name, skip_types=(nn.Embedding,))
        self.params: list[_Param] = []
        self.axes: list[int] = []
        self.labels: list[str] = []
        for info in layers:
            module = ctx.structure.module(info.name)
            axis = input_axis(module)
            shapes = [(n, tuple(ctx.structure.resolver(n).shape)) for n in info.weight_params]
            shapes = [(n, s) for n, s in shapes if len(s) >= 2]
            if not shapes:
                continue
            for name, shape in shapes:
                self.params.append(
                    _Param(name, len(self.labels), math.prod(shape[:axis]), shape[axis],
                           math.prod(shape[axis + 1 :]))
                )
                self.axes.append(axis)
            self.labels.append(layer_label(info.name))
        param_layer = torch.tensor([p.layer for p in self.params], dtype=torch.int32)
        blocks = torch.zeros(len(self.labels), dtype=torch.float64)
        tails = torch.zeros(len(self.labels), dtype=torch.float64)
        if self.params:
            per_param = torch.tensor([[p.blocks, p.tail] for p in self.params], dtype=torch.float64)
            blocks.index_add_(0, param_layer, per_param[:, 0])
            tails.index_add_(0, param_layer, per_param[:, 1])
        # histograms come from the shared one-pass weight_scan; a weight it does not cover
        # (an embedding named in include=) is histogrammed here
        scanner = ctx.graph.evaluation()["weight_scanner"]  # static: cached per structure
        scanned = {name: i for i, (name, _) in enumerate(scanner.blocks)}
        self._rows = [scanned.get(p.name) for p in self.params]
        self._missing = [i for i, row in enumerate(self._rows) if row is None]
        rows = torch.tensor([-1 if r is None else r for r in self._rows], dtype=torch.int32)
        self._static = (param_layer, blocks, tails, rows.clamp(min=0))
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._last = LastResult()

    def _histograms(self, values: Any, rows: torch.Tensor) -> torch.Tensor:
        """int64 ``[num_params, 5]``: blocks with 0..4 zeros of each counted weight."""
        histograms = values["weight_scan"].block_zeros.index_select(0, rows)
        if self._missing:
            with torch.no_grad():
                extra = torch.stack([
                    block_histogram(self.structure.resolver(self.params[i].name), self.axes[i])
                    for i in self._missing
                ]).to(histograms)
            histograms = histograms.index_copy(
                0, torch.tensor(self._missing, device=histograms.device), extra)
        return histograms

    def _statics(self, device: torch.device) -> tuple[Any, ...]:
        if device not in self._on:
            index, blocks, tails, rows = (t.to(device) for t in self._static)
            total = blocks.sum()
            self._on[device] = (
                index, blocks, tails, rows, (tails == 0) & (blocks > 0), total.clamp(min=1),
                tails.sum().to(torch.int64), total.to(torch.int64), (tails > 0).sum(),
            )
        return self._on[device]

    def track(self, values: Evaluation) -> dict[str, Any]:
        if self._missing:  # histograms read from the weights here: nothing to reuse
            return self._track(values)
        # a pure function of the shared histograms: reused while the scan hands out the same
        return self._last.get((values["weight_scan"].block_zeros,), lambda: self._track(values))

    def _track(self, values: Any) -> dict[str, Any]:
        num_layers = len(self.labels)
        if not self.params:
            zero = torch.zeros((), dtype=torch.float64)
            return {
                "strict_block_fraction": zero, "nvidia_eligible_block_fraction": zero,
                "tail_elements": 0, "num_blocks": 0, "num_strict_blocks": 0,
                "num_eligible_blocks": 0, "num_layers": 0, "num_strict_layers": 0,
                "num_eligible_layers": 0, "num_layers_with_tail": 0,
            }
        device = values["weight_scan"].block_zeros.device
        index, blocks, tails, rows, clean, total, tail_elements, num_blocks, with_tail = self._statics(device)
        per_layer = torch.zeros(num_layers, 5, dtype=torch.int64, device=device)
        per_layer.index_add_(0, index, self._histograms(values, rows))
        # strict: exactly 2 zeros; eligible: at least 2 (by layer; exact in float64)
        counts = torch.stack((per_layer[:, 2], per_layer[:, 2:].sum(1)))
        totals = counts.sum(1)
        layer_strict, layer_eligible = counts.to(torch.float64).unbind()
        fractions = totals / total
        layer_flags = clean & (torch.stack((layer_strict, layer_eligible)) == blocks)
        strict_layers, eligible_layers = layer_flags.unbind()
        flag_counts = layer_flags.sum(1)
        out: dict[str, Any] = {
            "strict_block_fraction": fractions[0],
            "nvidia_eligible_block_fraction": fractions[1],
            "tail_elements": tail_elements,
            "num_blocks": num_blocks,
            "num_strict_blocks": totals[0],
            "num_eligible_blocks": totals[1],
            "num_layers": num_layers,
            "num_strict_layers": flag_counts[0],
            "num_eligible_layers": flag_counts[1],
            "num_layers_with_tail": with_tail,
        }
        if self.options.log_layerwise_stats:
            rows = zip(
                self.labels,
                (layer_strict / blocks.clamp(min=1)).tolist(),
                (layer_eligible / blocks.clamp(min=1)).tolist(),
                blocks.tolist(),
                tails.tolist(),
                strict_layers.tolist(),
                eligible_layers.tolist(),
            )
            out["layers"] = {
                label: {
                    "strict_block_fraction": s,
                    "nvidia_eligible_block_fraction": e,
                    "num_blocks": int(b),
                    "tail_elements": int(t),
                    "strict": bool(sl),
                    "eligible": bool(el),
                }
                for label, s, e, b, t, sl, el in rows
            }
        return out


@hookimpl
def wt_register_trackers() -> tuple[TrackerSpec, ...]:
    return (
        TrackerSpec(
            name="nvidia_2_4_sparsity",
            build=Nvidia24Sparsity,
            options=Nvidia24Options,
            requires=("weight_scanner", "weight_scan"),
            summary="Share of 4-weight blocks along the input axis that fit NVIDIA 2:4 sparsity.",
        ),
    )
