"""Tracing a model with Torch-Pruning: honest errors, and nothing left on the model.

Torch-Pruning traces by running the model once with forward hooks on every layer. Here
that run is guarded: every hook it registers is removed on every exit path (an error,
Ctrl-C), training flags and ``requires_grad`` are restored, and a failure is reported for
what it is:

* the model itself fails on ``example_inputs`` -> "example_inputs do not fit";
* ``output_transform`` fails on the model's output -> said so;
* the model runs but Torch-Pruning cannot trace it -> said so, with its error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..errors import ConfigError, UnsupportedModuleError
from ..hooks import no_new_hooks


def call_model(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> Any:
    """Run ``model`` on ``example_inputs`` the way the tracker does everywhere."""
    if forward_fn is not None:
        return forward_fn(model, example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def describe_inputs(example_inputs: Any) -> str:
    """Shapes of ``example_inputs`` for error messages."""
    if isinstance(example_inputs, torch.Tensor):
        return f"tensor of shape {tuple(example_inputs.shape)}"
    if isinstance(example_inputs, dict):
        return "{" + ", ".join(f"{k!r}: {describe_inputs(v)}" for k, v in example_inputs.items()) + "}"
    if isinstance(example_inputs, (tuple, list)):
        return "(" + ", ".join(describe_inputs(v) for v in example_inputs) + ")"
    return type(example_inputs).__name__


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore ``training`` flags and ``requires_grad`` after tracing."""
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in grads.items():
            p.requires_grad_(flag)


def _normal_tensors(value: Any) -> Any:
    """``value`` with inference-mode tensors cloned into normal ones (autograd needs them)."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.is_inference() else value
    if isinstance(value, dict):
        return {k: _normal_tensors(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_normal_tensors(v) for v in value)
    return value


def _check_parameters(model: nn.Module) -> None:
    names = [n for n, p in model.named_parameters() if p.is_inference()]
    if names:
        raise ConfigError(
            f"The parameters {', '.join(names[:5])}{', ...' if len(names) > 5 else ''} are "
            "inference tensors (the model was built or loaded under torch.inference_mode()), "
            "and tracing needs autograd. Build the model outside inference_mode, or copy it "
            "first: `model = copy.deepcopy(model)` (outside inference_mode) gives it normal "
            "tensors."
        )


@contextlib.contextmanager
def guarded_index_mapping(unmappable: set[Any], *, once: bool = False) -> Iterator[None]:
    """Torch-Pruning's index-mapping update, made safe (and, with ``once``, not repeated).

    Its reshape mapping divides by a channel count it infers, which is 0 when a reshape is
    fed straight from the model input or a shuffle it cannot follow (ShuffleNet): the
    update then raises ``ZeroDivisionError`` and nothing can be built. Such reshapes are
    collected in ``unmappable`` instead; groups through them are refused later. So are
    concatenations with an input whose channel count it cannot infer (its recursive
    inference gives up on deep graphs and the update then adds ``None``).
    ``get_pruning_group`` re-runs the whole update for every group, although the mapping
    only depends on the graph: with ``once`` the first run is kept.
    """
    mapping = tp.dependency.index_mapping
    update, update_reshape = mapping.update_index_mapping, mapping.update_reshape_index_mapping
    update_concat = mapping.update_concat_index_mapping
    done = [False]

    def reshape(graph: Any, node: Any) -> None:
        try:
            update_reshape(graph, node)
        except ZeroDivisionError:
            unmappable.add(node)

    def concat(graph: Any, node: Any) -> None:
        # an input whose channel count it cannot infer (its recursion limit) is None here
        try:
            update_concat(graph, node)
        except TypeError:
            unmappable.add(node)

    def update_all(graph: Any) -> None:
        if once and done[0]:
            return
        update(graph)
        done[0] = True

    mapping.update_reshape_index_mapping = reshape
    mapping.update_concat_index_mapping = concat
    mapping.update_index_mapping = update_all
    try:
        yield
    finally:
        mapping.update_reshape_index_mapping = update_reshape
        mapping.update_concat_index_mapping = update_concat
        mapping.update_index_mapping = update


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None,
    output_transform: Callable[[Any], Any] | None,
    **build_options: Any,
) -> Any:
    """Torch-Pruning's ``DependencyGraph`` of ``model``, built without leaving anything behind.

    ``build_options`` go to ``DependencyGraph.build_dependency``.

    Raises:
        ConfigError: The model fails on ``example_inputs``, or ``output_transform`` fails.
        UnsupportedModuleError: The model runs but Torch-Pruning cannot trace it.
    """
    _check_parameters(model)
    unmappable: set[Any] = set()

    def trace_fn(m: nn.Module, x: Any) -> Any:
        return call_model(m, x, forward_fn)

    with no_new_hooks(model), preserved_modes(model), torch.inference_mode(False), torch.enable_grad():
        inputs = _normal_tensors(example_inputs)  # a clone made under inference_mode is one too
        for p in model.parameters():
            p.requires_grad_(True)
        try:
            with guarded_index_mapping(unmappable):
                dg = tp.DependencyGraph().build_dependency(
                    model,
                    example_inputs=inputs,
                    forward_fn=trace_fn,
                    output_transform=output_transform,
                    verbose=False,
                    **build_options,
                )
            dg._wt_unmappable = unmappable
        except Exception as err:  # noqa: BLE001 - classified below, always re-raised
            raise _explain(model, inputs, forward_fn, output_transform, err) from err
    layers = {id(m) for m in model.modules()}
    traced = any(id(m) in layers and n.grad_fn is not None for m, n in dg.module2node.items())
    if not traced and any(True for _ in model.parameters()):
        raise ConfigError(
            f"Torch-Pruning traced no layer of {type(model).__name__}: the output it traces back "
            "from carries no autograd graph to the layers (it is detached, computed under "
            "torch.no_grad() inside the forward, or not computed from them). Return the "
            "tensors the layers compute, with autograd on the way (no .detach(), no no_grad)."
        )
    return dg


def _explain(
    model: nn.Module,
    inputs: Any,
    forward_fn: Callable[[nn.Module, Any], Any] | None,
    output_transform: Callable[[Any], Any] | None,
    err: Exception,
) -> Exception:
    """The error to raise for a failed trace: whose fault it is, found by trying again."""
    cause = f"{type(err).__name__}: {_short(err)}"
    with no_new_hooks(model), preserved_modes(model), torch.no_grad():
        model.eval()  # Torch-Pruning traces in eval mode
        try:
            out = call_model(model, inputs, forward_fn)
        except Exception as own:  # noqa: BLE001 - the model's own failure is the message
            return ConfigError(
                f"example_inputs ({describe_inputs(inputs)}) do not fit {type(model).__name__}: "
                f"running the model on them fails with {type(own).__name__}: {_short(own)}. Pass "
                "inputs of the shape and dtype the model expects (a tensor, a tuple of positional "
                "inputs, or a dict of keyword inputs; forward_fn= for anything else)."
            )
        if output_transform is not None:
            try:
                out = output_transform(out)
            except Exception as own:  # noqa: BLE001
                return ConfigError(
                    f"output_transform failed on the output of {type(model).__name__} "
                    f"({type(out).__name__}) with {type(own).__name__}: {_short(own)}. It must "
                    "map the model's output to a tensor or a tuple/list/dict of tensors."
                )
    other = _non_tensor(out, "output_transform(out)" if output_transform is not None else "out")
    if other is not None:
        path, value = other
        return ConfigError(
            f"The output of {type(model).__name__} holds {type(value).__name__} at {path} where "
            "Torch-Pruning needs tensors (it traces back from every tensor of the output). "
            "Pass output_transform= returning the tensors only (a tensor, or a tuple/list/dict "
            "of tensors), e.g. output_transform=lambda out: out[0]."
        )
    if isinstance(err, RecursionError) or "recursi" in str(err).lower():
        return UnsupportedModuleError(
            f"Torch-Pruning could not trace {type(model).__name__} although the model runs on "
            f"these inputs: its graph walk exceeded Python's recursion limit ({cause}). The "
            "graph is too deep or has a structure Torch-Pruning cannot follow."
        )
    return UnsupportedModuleError(
        f"Torch-Pruning could not trace {type(model).__name__} although the model runs on these "
        f"inputs: {cause}. This is a limitation of its tracer for some operation in the forward; "
        "forward_fn= / output_transform= can route around parts of the forward."
    )


def _non_tensor(value: Any, path: str) -> tuple[str, Any] | None:
    """The first place in ``value`` (nested tuples, lists, dicts) that is not a tensor."""
    if isinstance(value, torch.Tensor):
        return None
    if isinstance(value, dict):
        items: Any = ((f"{path}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, (tuple, list)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return path, value
    for where, item in items:
        found = _non_tensor(item, where)
        if found is not None:
            return found
    return None


def _short(err: BaseException, limit: int = 400) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
    return text if len(text) <= limit else text[: limit - 3] + "..."
