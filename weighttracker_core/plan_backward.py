"""The hand-written backward of the reduction plans (the regularizer hot path).

Autograd through ``square -> staged sums -> gather -> segment sum`` would keep a chain of
full-size temporaries per parameter. :class:`PositionReduction` instead saves only the
parameters and, in backward, spreads each key's position gradients over the parameter's
finest view, adds the small pieces first, and multiplies by the element-wise derivative
once (``2w`` for squares, ``sign(w)`` for |w|): about one write per parameter. Parameters
the plan batches (same shape and keys) get their gradients from one ``[n, *shape]``
computation; each gradient is a view of that batch's buffer.

The plan is used through its public members (``position_values``, ``layout``,
``is_uniform``, ``recipe``, ``unit_indices``, ``resolver``) and typed ``Any``, so this module
sits below :mod:`.plans` in the import layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch._utils import _unflatten_dense_tensors  # what DDP uses to view one flat buffer

from .plan_layout import merge_ranges

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
        return plan.position_values(op, tensors)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads = position_grads(ctx.plan, ctx.op, ctx.saved_tensors, grad, ctx.needs_input_grad[2:])
        return (None, None, *grads)


def position_grads(plan: Any, op: str, tensors: Sequence[torch.Tensor], grad: torch.Tensor,
                   needs: Sequence[bool]) -> list[torch.Tensor | None]:
    """Gradients of every parameter from the gradients of the per-position reductions."""
    if op == "sum_sq":
        grad = grad * 2  # d(w^2)/dw = 2w: scale the short vector, not the parameters
    grad = grad.contiguous()
    grads: list[torch.Tensor | None] = [None] * len(tensors)
    main = plan.layout
    uniform = plan.is_uniform(main, tensors)
    for pack in main.packs:
        members = pack.members
        if not any(needs[m] for m in members):
            continue
        first = tensors[members[0]]
        if pack.flat and uniform and first.dtype.is_floating_point and grad.dtype == first.dtype:
            _flat_grads(plan, pack, tensors, grad, op, needs, grads)
            continue
        for batch in pack.batches:
            for i, m in enumerate(batch.members):
                if needs[m]:
                    weights = tensors[m].reshape(1, *batch.shape)
                    out = batch_grad(plan.recipe(batch), batch, grad, weights, op, i, 1)
                    grads[m] = out[0].to(tensors[m].dtype)
    return grads


class WeightedNorms(torch.autograd.Function):
    """``sum_u c_u * ||w_u||_2`` as one autograd node (the group lasso's hot path).

    The same values as ``(plan.unit_reduce("l2", grad=True) * c).sum()`` and, bit for bit,
    the gradient autograd would give that expression (the same kernels in the same order:
    ``c`` times the incoming gradient, the zero-safe square root's derivative, the segment
    sum spread back to its positions, ``index_add`` into the positions), without the seven
    autograd nodes of that chain.
    """

    @staticmethod
    def forward(ctx: Any, plan: Any, coefficients: Any, *tensors: torch.Tensor) -> torch.Tensor:
        positions = plan.position_values("sum_sq", tensors)
        gather, lengths = plan.unit_indices(positions.device)
        values = positions.index_select(0, gather)
        if plan.num_units:
            sums = torch.segment_reduce(values, "sum", lengths=lengths, unsafe=True, initial=0.0)
        else:
            sums = values.new_zeros(0)
        plan.check_finite(sums, tensors)
        positive = sums > 0
        root = torch.sqrt(torch.where(positive, sums, torch.ones_like(sums)))
        norms = torch.where(positive, root, 0.0)
        coef = coefficients(norms)
        ctx.plan = plan
        ctx.num_positions = positions.numel()
        ctx.save_for_backward(positive, root, coef, *tensors)
        return (norms * coef).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        positive, root, coef, *tensors = ctx.saved_tensors
        plan = ctx.plan
        # what autograd does for sum -> mul -> where -> sqrt -> where -> segment_reduce -> index_select
        grad_norms = grad.expand(coef.shape) * coef
        grad_root = torch.where(positive, grad_norms, 0.0)
        grad_sums = torch.where(positive, grad_root / (2 * root), 0.0)
        gather, lengths = plan.unit_indices(grad_sums.device)
        grad_values = torch.repeat_interleave(grad_sums, lengths.to(torch.long), output_size=gather.numel())
        grad_positions = grad_values.new_zeros(ctx.num_positions).index_add_(0, gather, grad_values)
        grads = position_grads(plan, "sum_sq", tensors, grad_positions, ctx.needs_input_grad[2:])
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


def _terms(prepared: Any, grad: torch.Tensor) -> list[torch.Tensor]:
    """The position gradients of one batch as broadcastable terms (refining views).

    Each group of small pieces is added while still small, then expanded to its (possibly
    widened) shape, so that every full-size operation broadcasts along outer dims only.
    """
    terms = []
    for parts, shape in prepared[1]:
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
    return terms  # type: ignore[return-value]


def _spread(prepared: Any, grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the broadcast sum of a batch's position gradients into ``out`` (its elements,
    ``[n, *shape]`` in order); returns ``out`` viewed ``[n, *shape]``."""
    full, spec = prepared
    if full is not None:
        terms = _terms(prepared, grad)
        target = out.view(full)
        if len(terms) == 1:
            target.copy_(terms[0])
        else:  # the broadcast sum written once
            torch.add(terms[0].expand(full), terms[1], out=target)
            for term in terms[2:]:
                target.add_(term)
        return target
    # views that do not refine one another: accumulate in the full buffer
    total = None
    for start, stop, permute, spread, expanded in spec:
        part = grad[start:stop]
        if permute is not None:
            part = part.view(permute[0]).permute(permute[1])
        part = part.reshape(spread).expand(expanded)
        if total is None:
            total = out.view(expanded)
            total.copy_(part)
        else:
            total.add_(part)
    assert total is not None
    return total


def _flat_grads(plan: Any, pack: Any, tensors: Sequence[torch.Tensor], grad: torch.Tensor, op: str,
                needs: Sequence[bool], grads: list[torch.Tensor | None]) -> None:
    """Gradients of a flat pack: one buffer for all of them, each a view of it.

    Every batch writes the broadcast sum of its position gradients into its region of the
    buffer; then one ``torch._foreach_mul_`` scales every member's view by its weights
    (``2w`` for squares: the 2 is already in ``grad``) or their signs: no copy of the
    weights, one kernel launch for the whole pack.
    """
    members = pack.members
    sources = [tensors[m] for m in members]
    buffer = torch.empty(pack.numel, dtype=grad.dtype, device=sources[0].device)
    batches = pack.batches
    for batch in batches[: pack.plain]:
        region = buffer[batch.start : batch.start + batch.n * batch.numel]
        _spread(_prepare(plan.recipe(batch), batch, 0, batch.n), grad, region)
    if pack.plain < len(batches):  # positions that are elements: one copy for all of them
        start = batches[pack.plain].start
        first = batches[pack.plain].keys[0][1]
        buffer[start:].copy_(grad[first : first + pack.numel - start])
    views = _unflatten_dense_tensors(buffer, sources)  # one C++ call: the views of every member
    if op == "sum_sq":
        torch._foreach_mul_(views, sources)
    elif op == "l1":
        torch._foreach_mul_(views, torch._foreach_sign(sources))
    for m, view in zip(members, views):
        if needs[m]:
            grads[m] = view


def batch_grad(recipe: Any, batch: Any, grad: torch.Tensor, weights: torch.Tensor | None, op: str,
               first: int, n: int) -> torch.Tensor:
    """Gradients of members ``first .. first + n - 1`` of ``batch``: ``[n, *shape]``.

    ``weights`` (``[n, *shape]``) are the parameters' values (unused for ``sum``).
    """
    prepared = _prepare(recipe, batch, first, n)
    out_shape = (n, *batch.shape)
    full = prepared[0]
    if full is not None and op != "sum":
        terms = _terms(prepared, grad)
        assert weights is not None
        factor = (weights if op == "sum_sq" else weights.sign()).view(full)
        if len(terms) == 1:
            return torch.mul(factor, terms[0]).view(out_shape)
        out = torch.add(terms[0].expand(full), terms[1])  # the broadcast sum written once, then scaled
        for term in terms[2:]:
            out.add_(term)
        return out.mul_(factor).view(out_shape)
    dtype = grad.dtype if weights is None else torch.promote_types(grad.dtype, weights.dtype)
    total = _spread(prepared, grad, torch.empty(n * batch.numel, dtype=dtype, device=grad.device))
    total = total.reshape(out_shape)
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
