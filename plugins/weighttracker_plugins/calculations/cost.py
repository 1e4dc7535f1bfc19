"""Cost calculations: baseline MACs (fvcore), bit-widths, cost axes and active MACs.

The only module of the project that imports fvcore. Per-layer values are float64 vectors
indexed like the layer table ``structure.modules`` (``ModuleInfo.index``), so a tracker
picks its layers with one index tensor. The cost model itself (axes, terms, the rule that
a position is active while every unit covering it is) is described in ``cost_model.py``:

    ActiveMACs_m = BaselineMACs_m * prod_a active_a / size_a

Registered calculations (name: lifetime, value):

* ``layer_macs_by_operator``: static, ``list[dict[str, int]]`` fvcore MACs per layer and
  operator.
* ``cost_model``: static, :class:`CostModel` (axis and term index tensors).
* ``layer_baseline_macs``: static, float64 ``[num_layers]``.
* ``layer_weight_bits`` / ``layer_activation_bits``: per evaluation, float64
  ``[num_layers]``; the bit-width functions are called for every weighted layer on every
  evaluation (32 without a function, and for layers of other categories).
* ``cost_axis_active``: per evaluation, float64 ``[num_axes]`` active positions per axis.
* ``layer_active_macs``: per evaluation, float64 ``[num_layers]``.
* ``layer_active_fraction``: per evaluation, active / baseline MACs per layer.

Static work (once per structure): one fvcore pass and the index tensors. Per-evaluation
work: a gather, two ``index_add``, one ``scatter_reduce`` over the axis positions and one
over the terms, plus the user's bit-width functions (a Python call per weighted layer).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from weighttracker_core.plugin import (
    Bitwidths,
    CalculationSpec,
    ConfigError,
    Evaluation,
    LayerCategory,
    LayerInfo,
    Lifetime,
    StructureQueries,
    hookimpl,
)

from ._memo import reuse
from .cost_model import CostModel

DEFAULT_BITS = 32

# ---------------------------------------------------------------------------- baseline MACs


def _flatten(value: Any, leaves: list[torch.Tensor]) -> Any:
    """Replace every tensor in a (nested) tuple / list / dict by its index in ``leaves``."""
    if isinstance(value, torch.Tensor):
        leaves.append(value)
        return _Leaf(len(leaves) - 1)
    if isinstance(value, (tuple, list)):
        return type(value)(_flatten(v, leaves) for v in value)
    if isinstance(value, dict):
        return {k: _flatten(v, leaves) for k, v in value.items()}
    return value


def _unflatten(template: Any, leaves: Sequence[torch.Tensor]) -> Any:
    if isinstance(template, _Leaf):
        return leaves[template.index]
    if isinstance(template, (tuple, list)):
        return type(template)(_unflatten(v, leaves) for v in template)
    if isinstance(template, dict):
        return {k: _unflatten(v, leaves) for k, v in template.items()}
    return template


class _Leaf:
    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def _tensors_of(value: Any) -> tuple[torch.Tensor, ...]:
    leaves: list[torch.Tensor] = []
    _flatten(value, leaves)
    return tuple(leaves)


class _Traced(nn.Module):
    """Calls the model the way the tracker does, with only tensors in and out (for tracing)."""

    def __init__(self, model: nn.Module, template: Any, forward_fn: Any) -> None:
        super().__init__()
        self.model = model
        self._template = template
        self._forward_fn = forward_fn

    def forward(self, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = _unflatten(self._template, leaves)
        if self._forward_fn is not None:
            out = self._forward_fn(self.model, inputs)
        elif isinstance(inputs, dict):
            out = self.model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            out = self.model(*inputs)
        else:
            out = self.model(inputs)
        return _tensors_of(out)


@contextlib.contextmanager
def _inference_mode_for_counting(model: nn.Module) -> Iterator[None]:
    """Eval mode, no grad, no ``nn.MultiheadAttention`` fast path; everything restored.

    The fast path runs attention as one fused op that fvcore cannot count (0 MACs); the
    regular path shows it the projections.
    """
    modes = {m: m.training for m in model.modules()}
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    try:
        model.eval()
        if mha is not None:
            mha.set_fastpath_enabled(False)
        with torch.no_grad():
            yield
    finally:
        if mha is not None and fastpath is not None:
            mha.set_fastpath_enabled(fastpath)
        for module, mode in modes.items():
            module.training = mode


#: The hook dicts of ``nn.Module`` that fvcore (or a tracer) may add entries to.
_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
    "_backward_hooks", "_backward_pre_hooks",
)


@contextlib.contextmanager
def _hooks_restored(model: nn.Module) -> Iterator[None]:
    """Remove every hook added to ``model``'s modules inside the block, however it exits.

    fvcore registers scope hooks on every module and removes them only when tracing
    succeeds; a failed trace (or a KeyboardInterrupt) would leave them behind, and their
    local classes make the model unpicklable.
    """
    before = [(m, {n: set(getattr(m, n)) for n in _HOOK_DICTS if isinstance(getattr(m, n, None), dict)})
              for m in model.modules()]
    try:
        yield
    finally:
        for module, saved in before:
            for name, keys in saved.items():
                hooks = getattr(module, name)
                for key in [k for k in hooks if k not in keys]:
                    del hooks[key]


def _dtype_hint(model: nn.Module, leaves: Sequence[torch.Tensor]) -> str:
    """A sentence naming a float dtype mismatch between parameters and inputs, if any."""
    params = {p.dtype for p in model.parameters() if p.is_floating_point()}
    inputs = {t.dtype for t in leaves if t.is_floating_point()}
    if len(params) == 1 and inputs and inputs != params:
        (param,) = params
        given = ", ".join(sorted(str(d) for d in inputs))
        return (f" The model's parameters are {param} but the example inputs are {given}: "
                f"create the WeightTracker again with inputs of {param} (e.g. `x.to({param})`).")
    return ""


def _sdpa_macs(inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
    """fvcore handle for ``scaled_dot_product_attention``: the two products it computes.

    ``q k^T`` costs ``prod(q.shape[:-1]) * T_k * d`` MACs and ``softmax(.) v`` costs
    ``prod(q.shape[:-1]) * T_k * d_v``, exactly what fvcore counts for the two matmuls of
    the explicit path.
    """
    from fvcore.nn.jit_handles import get_shape

    query, key, value = (get_shape(v) for v in inputs[:3])
    if not query or not key or not value:
        return 0
    rows = 1
    for size in query[:-1]:
        rows *= int(size)
    return rows * int(key[-2]) * (int(query[-1]) + int(value[-1]))


def fvcore_macs_by_operator(
    model: nn.Module, example_inputs: Any, forward_fn: Any = None
) -> dict[str, dict[str, int]]:
    """fvcore's MACs under every module, split by operator (``by_module_and_operator()``).

    The model runs once in eval mode under ``no_grad`` (training flags restored; the
    fused ``nn.MultiheadAttention`` fast path is switched off for the count, since fvcore
    sees 0 MACs in it); tensor inputs are moved to the model's device. Counts include the
    batch of ``example_inputs`` and every module of a subtree (``""`` is the whole model).
    fvcore counts one multiply-add as one "flop", so these are MACs.

    Raises:
        ConfigError: fvcore could not trace the model.
    """
    with warnings.catch_warnings():  # fvcore's import warns about torch.jit.script
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis  # the project's only fvcore import

    leaves: list[torch.Tensor] = []
    template = _flatten(example_inputs, leaves)
    device = next((p.device for p in model.parameters()), None)
    if device is not None:
        leaves = [t.to(device) if t.device != device else t for t in leaves]
    wrapper = _Traced(model, template, forward_fn)
    logger = logging.getLogger("fvcore")
    level = logger.level
    try:
        with _hooks_restored(model), _inference_mode_for_counting(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logger.setLevel(logging.ERROR)
            analysis = FlopCountAnalysis(wrapper, tuple(leaves))
            analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            counts = analysis.by_module_and_operator()
    except Exception as err:  # fvcore and the JIT tracer raise many kinds
        raise ConfigError(
            f"fvcore could not count the baseline MACs of {type(model).__name__}: tracing it "
            f"with the tracker's example inputs failed ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})."
            f"{_dtype_hint(model, leaves)} BOPs need a model that torch.jit.trace can follow; "
            "pass forward_fn= to WeightTracker if the model needs a special call. The model "
            "is unchanged (fvcore's hooks are removed)."
        ) from err
    finally:
        logger.setLevel(level)
    out: dict[str, dict[str, int]] = {}
    for name, ops in counts.items():
        if name == "model":
            out[""] = {op: int(v) for op, v in ops.items()}
        elif name.startswith("model."):
            out[name[len("model."):]] = {op: int(v) for op, v in ops.items()}
    return out


def layer_macs_by_operator(evaluation: Evaluation) -> list[dict[str, int]]:
    """fvcore's baseline MACs of each layer of the table, by operator (static)."""
    structure = evaluation.structure
    counts = fvcore_macs_by_operator(structure.model, structure.example_inputs, structure.options.forward_fn)
    return [_own(counts, m.name, structure) if m.category is LayerCategory.ATTENTION
            else dict(counts.get(m.name, {})) for m in structure.modules]


def _own(counts: dict[str, dict[str, int]], name: str, structure: Any) -> dict[str, int]:
    """MACs of the operations a module runs itself, not those of its submodules."""
    own = dict(counts.get(name, {}))
    prefix = f"{name}." if name else ""
    for child, _ in structure.module(name).named_children():
        for op, value in counts.get(prefix + child, {}).items():
            own[op] = own.get(op, 0) - value
    return {op: value for op, value in own.items() if value}


def layer_baseline_macs(evaluation: Evaluation) -> torch.Tensor:
    """Dense MACs of every layer of the table (float64 ``[num_layers]``), from fvcore."""
    return evaluation["cost_model"].baseline.to(_device(evaluation.structure))


# ------------------------------------------------------------------------------ bit-widths


def read_bitwidths(bitwidths: Bitwidths, structure: StructureQueries, infos: Sequence[LayerInfo],
                   kind: str) -> list[int]:
    """``kind``-bit-widths (``"weight"`` / ``"activation"``) of ``infos``, checked.

    Calls the tracker's function once per layer; a missing function means 32.

    Raises:
        ValueError: A value is not a whole number >= 1 (names the layer and value).
    """
    if not bitwidths.given(kind):
        return [DEFAULT_BITS] * len(infos)
    return [bitwidths.bits(kind, info.name, structure.module(info.name)) for info in infos]


def _device(structure: Any) -> torch.device:
    return next((p.device for p in structure.model.parameters()), torch.device("cpu"))


#: Per structure: the bit-width vector of each kind and device when no function is given
#: (all 32), and the attention-product layers of the table.
_DEFAULT_BITS: weakref.WeakKeyDictionary[Any, dict[Any, Any]] = weakref.WeakKeyDictionary()


def _bits(evaluation: Evaluation, kind: str) -> torch.Tensor:
    """Bit-widths of every layer of the table; the function is called for weighted layers.

    Without a function every layer has 32 bits: that vector is built once per structure
    (consumers only read it).
    """
    structure = evaluation.structure
    cache = _DEFAULT_BITS.get(structure)
    if cache is None:
        cache = _DEFAULT_BITS.setdefault(structure, {})
    listed = cache.get("products")
    if listed is None or listed[0] is not structure.modules:  # the layer table is static
        # attention products multiply two activations: their "weight" width is an activation's
        listed = (structure.modules, [i for i in structure.modules if i.category is LayerCategory.ATTENTION])
        cache["products"] = listed  # type: ignore[assignment]
    products = listed[1]
    uses = (kind,) if kind == "activation" or not products else ("weight", "activation")
    if not any(evaluation.bitwidths.given(k) for k in uses):
        device = _device(structure)
        if (kind, device) not in cache:
            cache[(kind, device)] = torch.full((len(structure.modules),), float(DEFAULT_BITS),
                                               dtype=torch.float64, device=device)
        return cache[(kind, device)]
    infos = structure.modules
    weighted = [i for i in infos if i.category is LayerCategory.WEIGHTED]
    values = [float(DEFAULT_BITS)] * len(infos)
    for info, bits in zip(weighted, read_bitwidths(evaluation.bitwidths, structure, weighted, kind)):
        values[info.index] = float(bits)
    for info, bits in zip(products, read_bitwidths(evaluation.bitwidths, structure, products, "activation")):
        values[info.index] = float(bits)
    return torch.tensor(values, dtype=torch.float64, device=_device(structure))


def layer_weight_bits(evaluation: Evaluation) -> torch.Tensor:
    """Weight bit-width of every layer (float64 ``[num_layers]``); 32 for non-weighted ones."""
    return _bits(evaluation, "weight")


def layer_activation_bits(evaluation: Evaluation) -> torch.Tensor:
    """Activation bit-width of every layer (float64 ``[num_layers]``); 32 for non-weighted ones."""
    return _bits(evaluation, "activation")


# ------------------------------------------------------------------------------ cost model


def cost_model(evaluation: Evaluation) -> CostModel:
    """Index tensors of every layer's cost axes and terms (see ``cost_model.py``)."""
    structure = evaluation.structure
    return CostModel(structure, [evaluation["layer_macs_by_operator"][m.index] for m in structure.modules])


def cost_axis_active(evaluation: Evaluation) -> torch.Tensor:
    """Active positions per cost axis (float64 ``[num_axes]``, axes as in ``cost_model.axis_names``)."""
    model, active = evaluation["cost_model"], evaluation["unit_active"]
    return reuse(evaluation.structure, "cost_axis_active", (model, active), lambda: model.axis_active(active))


def layer_active_macs(evaluation: Evaluation) -> torch.Tensor:
    """Structured active MACs per layer (float64 ``[num_layers]``).

    Each cost term's baseline MACs times the active fractions of its axes; layers whose
    rule has a ``cost_fn`` get ``cost_fn(module, baseline_macs, {axis: active fraction})``.
    """
    model: CostModel = evaluation["cost_model"]
    active = evaluation["cost_axis_active"]
    if not model.custom:  # a pure function of the active positions
        return reuse(evaluation.structure, "layer_active_macs", (model, active), lambda: model.layer_macs(active))
    macs = model.layer_macs(active)
    if model.custom:
        ratios = model.axis_ratio(active).tolist()
        baseline = model.baseline.tolist()
        macs = macs.clone()
        for index, fn, by_label in model.custom:
            module = evaluation.structure.module(evaluation.structure.modules[index].name)
            fractions = {label: ratios[j] for label, j in by_label.items()}
            macs[index] = float(fn(module, baseline[index], fractions))
    return macs


def layer_active_fraction(evaluation: Evaluation) -> torch.Tensor:
    """Active over baseline MACs per layer (float64 ``[num_layers]``; 1 where baseline is 0)."""
    macs = evaluation["layer_active_macs"]
    baseline = evaluation["layer_baseline_macs"].to(macs.device)
    return torch.where(baseline > 0, macs / baseline.clamp(min=1e-300), torch.ones_like(macs))


CALCULATIONS = (
    CalculationSpec(name="layer_macs_by_operator", compute=layer_macs_by_operator, lifetime=Lifetime.STATIC,
                    summary="fvcore's dense MACs per layer by operator (list of dicts)."),
    CalculationSpec(name="cost_model", compute=cost_model, requires=("layer_macs_by_operator",),
                    lifetime=Lifetime.STATIC,
                    summary="Index tensors of every layer's structural cost axes and terms."),
    CalculationSpec(name="layer_baseline_macs", compute=layer_baseline_macs, requires=("cost_model",),
                    lifetime=Lifetime.STATIC, summary="Dense MACs per layer from fvcore (float64 [num_layers])."),
    CalculationSpec(name="layer_weight_bits", compute=layer_weight_bits,
                    summary="Weight bit-width per layer from weight_bitwidth_fn (default 32)."),
    CalculationSpec(name="layer_activation_bits", compute=layer_activation_bits,
                    summary="Activation bit-width per layer from activation_bitwidth_fn (default 32)."),
    CalculationSpec(name="cost_axis_active", compute=cost_axis_active, requires=("cost_model", "unit_active"),
                    summary="Active positions of every cost axis (float64 [num_axes])."),
    CalculationSpec(name="layer_active_macs", compute=layer_active_macs,
                    requires=("cost_model", "cost_axis_active"),
                    summary="Structured active MACs per layer (float64 [num_layers])."),
    CalculationSpec(name="layer_active_fraction", compute=layer_active_fraction,
                    requires=("layer_active_macs", "layer_baseline_macs"),
                    summary="Active over baseline MACs per layer (float64 [num_layers])."),
)


@hookimpl
def wt_register_calculations() -> tuple[CalculationSpec, ...]:
    return CALCULATIONS
