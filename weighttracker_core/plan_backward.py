"""The hand-written backward of the reduction plans (the regularizer hot path).

Autograd through ``square -> staged sums -> gather -> segment sum`` would keep a chain of
full-size temporaries per parameter. :class:`PositionReduction` instead saves only the
parameters and, in backward, spreads each key's position gradients over the parameter's
finest view, adds the small pieces first, and multiplies by the element-wise derivative
once (``2w`` for squares, ``sign(w)`` for |w|): about one write per parameter. Parameters
the plan batches (same shape and keys) get their gradients from one ``[n, *shape]``
computation; each gradient is a view of that batch's buffer.

The plan object is duck-typed (``_positions``, ``_main``, ``_uniform``, ``_recipe``,
``resolver``) so this module sits below :mod:`.plans` in the import layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .plan_layout import flat_copy, merge_ranges

ANALYTIC_GRADS = ("sum_sq", "l1", "sum")


class PositionReduction(torch.autograd.Function):
    """Per-position sums with a hand-written backward (the regularizer hot path).

    Forward reuses the no-grad reductions. Backward needs, per parameter, the sum of every
    key's position gradients broadcast over the dims that key reduced, times the
    element-wise derivative (``2w`` for squares, ``sign(w)`` for |w|). The broadcast sums
    are added in the parameter's finest view while they are still small (a conv's rows and
    columns meet in ``[out, in, 1, 1]``), so each parameter is written about once.
    """

    @staticmethod
    def forward(ctx: Any, plan: Any, op: str, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.plan, ctx.op = plan, op
        ctx.save_for_backward(*tensors)
        return plan._positions(op, tensors)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan, op = ctx.plan, ctx.op
        tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        if op == "sum_sq":
            grad = grad * 2  # d(w^2)/dw = 2w: scale the short vector, not the parameters
        grad = grad.contiguous()
        grads: list[torch.Tensor | None] = [None] * len(tensors)
        main = plan._main
        uniform = plan._uniform(main, tensors)
        for pack in main.packs:
            members = [m for b in pack.batches for m in b.members]
            if not any(needs[m] for m in members):
                continue
            if pack.flat and uniform and tensors[members[0]].dtype.is_floating_point:
                try:
                    _flat_grads(plan, pack, members, tensors, grad, op, needs, grads)
                    continue
                except RuntimeError:  # parameters on several devices: one at a time below
                    if len({tensors[m].device for m in members}) == 1:
                        raise
            for batch in pack.batches:
                for i, m in enumerate(batch.members):
                    if needs[m]:
                        weights = tensors[m].reshape(1, *batch.shape)
                        out = batch_grad(plan._recipe(batch), batch, grad, weights, op, i, 1)
                        grads[m] = out[0].to(tensors[m].dtype)
        return (None, None, *grads)


def _prepare(recipe: Any, batch: Any, first: int, n: int) -> Any:
    """The recipe with every slice bound and every shape fixed for ``n`` members (cached)."""
    key = (n, first)
    prepared = batch.prepared.get(key)
    if prepared is None:
        if recipe is None:
            pieces = []
            for k, base in batch.keys:
                kept = sorted(k.dims)
                permute = None
                if list(k.dims) != kept:
                    permute = ((n, *[k.shape[d] for d in k.dims]), (0, *[1 + k.dims.index(d) for d in kept]))
                spread = (n, *[k.shape[d] if d in kept else 1 for d in range(len(k.shape))])
                start = base + first * k.length
                pieces.append((start, start + n * k.length, permute, spread, (n, *k.shape)))
            prepared = (None, pieces)
        else:
            fine, groups = recipe
            terms = []
            for group, shape in groups:
                parts = []
                for base, length, sizes, order, target in group:
                    start = base + first * length
                    permute = None if order is None else ((n, *sizes), (0, *[1 + o for o in order]))
                    parts.append((start, start + n * length, permute, (n, *target)))
                terms.append((parts, (n, *shape)))
            prepared = ((n, *fine), terms)
        batch.prepared[key] = prepared
    return prepared


def _flat_grads(plan: Any, pack: Any, members: list[int], tensors: Sequence[torch.Tensor], grad: torch.Tensor,
                op: str, needs: Sequence[bool], grads: list[torch.Tensor | None]) -> None:
    """Gradients of a flat pack: one copy of its weights, one ``[n, *shape]`` result per batch."""
    flat = None
    if op != "sum":
        first = tensors[members[0]]
        flat = flat_copy(pack, tensors, plan.resolver)
    dtype = tensors[members[0]].dtype
    for batch in pack.batches:
        weights = None
        if flat is not None:
            weights = flat[batch.start : batch.start + batch.n * batch.numel].view(batch.n, *batch.shape)
        out = batch_grad(plan._recipe(batch), batch, grad, weights, op, 0, batch.n)
        if out.dtype != dtype:
            out = out.to(dtype)
        for m, g in zip(batch.members, out.unbind(0)):
            if needs[m]:
                grads[m] = g


def batch_grad(recipe: Any, batch: Any, grad: torch.Tensor, weights: torch.Tensor | None, op: str,
               first: int, n: int) -> torch.Tensor:
    """Gradients of members ``first .. first + n - 1`` of ``batch``: ``[n, *shape]``.

    ``weights`` (``[n, *shape]``) are the parameters' values (unused for ``sum``).
    """
    full, terms_spec = _prepare(recipe, batch, first, n)
    out_shape = (n, *batch.shape)
    if full is not None:
        terms = []
        for parts, shape in terms_spec:
            term = None
            for start, stop, permute, target in parts:
                part = grad[start:stop]
                if permute is not None:
                    part = part.view(permute[0]).permute(permute[1])
                part = part.reshape(target)
                term = part if term is None else term + part
            if term.shape != shape:  # type: ignore[union-attr]
                term = term.expand(shape).contiguous()  # type: ignore[union-attr]
            terms.append(term)
        if op == "sum":
            total = terms[0].expand(full).contiguous()
            for term in terms[1:]:
                total.add_(term)
            return total.view(out_shape)
        assert weights is not None
        factor = (weights if op == "sum_sq" else weights.sign()).view(full)
        if len(terms) == 1:
            out = torch.mul(factor, terms[0])
        else:  # the broadcast sum written once into the result, then scaled in place
            out = torch.add(terms[0].expand(full), terms[1])
            for term in terms[2:]:
                out.add_(term)
            out.mul_(factor)
        return out.view(out_shape)
    # views that do not refine one another: accumulate in one full buffer
    total = None
    for (key, _), (start, stop, permute, spread, expanded) in zip(batch.keys, terms_spec):
        part = grad[start:stop]
        if permute is not None:
            part = part.view(permute[0]).permute(permute[1])
        part = part.reshape(spread).expand(expanded)
        if total is None:
            total = part.contiguous().view(out_shape)
        else:
            total.view(expanded).add_(part)
    assert total is not None
    if op == "sum_sq":
        total.mul_(weights)
    elif op == "l1":
        total.mul_(weights.sign())  # type: ignore[union-attr]
    return total


#: A broadcast whose innermost run of repeated values is shorter than this is slow (the
#: multiply cannot vectorise over, say, a 3x3 kernel); such terms are widened first.
SHORT_RUN = 128


def _widened(target: Sequence[int], fine: Sequence[int]) -> tuple[int, ...]:
    """``target`` with its trailing 1s filled in when they repeat a value only a few times."""
    run, j = 1, len(fine)
    while j > 0 and target[j - 1] == 1:
        j -= 1
        run *= fine[j]
    if j == len(fine) or run >= SHORT_RUN:
        return tuple(target)
    return tuple(target[:j]) + tuple(fine[j:])


def backward_recipe(keys: Sequence[tuple[Any, int]], widen: bool = True) -> Any:
    """How to spread one batch's position gradients over its finest view.

    ``keys`` are ``(key, base)`` pairs (member ``i``'s positions start at ``base + i *
    key.length``). Returns ``(fine shape, term groups)`` — each group ``(pieces, shape)``:
    ``(base, length, sizes, order, target)`` reshapes of the position-gradient vector whose
    broadcast sum is one term, expanded to ``shape`` — or ``None`` when the keys' views do
    not refine one another. Terms whose sum stays small (at most a quarter of the
    parameter: a head and a head dimension meet in ``[1, heads, dim, 1]``) are grouped, so
    the caller adds them before touching the full tensor; the remaining terms are added
    straight into the gradient buffer. A term that would be repeated only a few times along
    the innermost dims (a conv's input channel over its 3x3 kernel) is first expanded over
    them, so that every full-size operation broadcasts along outer dims only (``widen``:
    worth its extra kernel for large tensors only).
    """
    fine = max((tuple(key.shape) for key, _ in keys), key=len)
    shaped = (lambda t, f: _widened(t, f)) if widen else (lambda t, f: tuple(t))
    numel = math.prod(fine)
    groups: list[tuple[list[int], list[Any]]] = []  # (union shape, pieces)
    for key, base in keys:
        ranges = merge_ranges(fine, key.shape)
        if ranges is None:
            return None
        kept = sorted(key.dims)
        order = None
        if list(key.dims) != kept:
            order = tuple(key.dims.index(d) for d in kept)
        target = [1] * len(fine)
        for d in kept:
            for j in ranges[d]:
                target[j] = fine[j]
        piece = (base, key.length, tuple(key.shape[d] for d in key.dims), order, tuple(target))
        for union, pieces in groups:
            merged = [max(a, b) for a, b in zip(union, target)]
            if 4 * math.prod(shaped(merged, fine)) <= numel:
                union[:] = merged
                pieces.append(piece)
                break
        else:
            groups.append((list(target), [piece]))
    return fine, [(pieces, shaped(union, fine)) for union, pieces in groups]
