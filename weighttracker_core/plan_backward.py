"""The hand-written backward of the reduction plans (the regularizer hot path).

Autograd through ``square -> staged sums -> gather -> segment sum`` would keep a chain of
full-size temporaries per parameter. :class:`PositionReduction` instead saves only the
parameters and, in backward, spreads each key's position gradients over the parameter's
finest view, adds the small pieces first, and multiplies by the element-wise derivative
once (``2w`` for squares, ``sign(w)`` for |w|): about one write per parameter.

The plan object is duck-typed (``_positions``, ``_keys_by_param``, ``keys``, ``_recipe``)
so this module sits below :mod:`.plans` in the import layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


ANALYTIC_GRADS = ("sum_sq", "l1", "sum")


class PositionReduction(torch.autograd.Function):
    """Per-position sums with a hand-written backward (the regularizer hot path).

    Forward reuses the fused no-grad reductions. Backward needs, per parameter, the sum of
    every key's position gradients broadcast over the dims that key reduced, times the
    element-wise derivative (``2w`` for squares, ``sign(w)`` for |w|). The broadcast sums
    are added in the parameter's finest view while they are still small (a conv's rows and
    columns meet in ``[out, in, 1, 1]``), so each parameter is written about once.
    """

    @staticmethod
    def forward(ctx: Any, plan: Any, op: str, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.plan, ctx.op = plan, op
        ctx.save_for_backward(*tensors)
        return plan._positions(op, tensors, fused=True)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan = ctx.plan
        tensors = ctx.saved_tensors
        if ctx.op == "sum_sq":
            grad = grad * 2  # d(w^2)/dw = 2w: scale the short vector, not the parameters
        grads: list[torch.Tensor | None] = [None] * len(tensors)
        for pi, key_ids in plan._keys_by_param.items():
            if not ctx.needs_input_grad[2 + pi]:
                continue
            tensor = tensors[pi]
            keys = [plan.keys[k] for k in key_ids]
            recipe = plan._recipe(pi)
            if recipe is not None:
                fine, groups = recipe
                terms = []
                for group in groups:
                    term = None
                    for start, stop, sizes, order, target in group:
                        part = grad[start:stop]
                        if order is not None:
                            part = part.reshape(sizes).permute(*order)
                        part = part.reshape(target)
                        term = part if term is None else term + part
                    terms.append(term)
                if ctx.op == "sum":
                    total = terms[0].expand(fine).contiguous()
                    for term in terms[1:]:
                        total.add_(term)
                    grads[pi] = total.view(tensor.shape)
                    continue
                factor = (tensor if ctx.op == "sum_sq" else tensor.sign()).reshape(fine)
                if len(terms) == 1:
                    out = torch.mul(factor, terms[0])
                else:  # the broadcast sum written once into the result, then scaled in place
                    out = torch.add(terms[0].expand(fine), terms[1])
                    for term in terms[2:]:
                        out.add_(term)
                    out.mul_(factor)
                grads[pi] = out.view(tensor.shape)
                continue
            # views that do not refine one another: accumulate in one full buffer
            parts = [grad[key.offset : key.offset + key.length] for key in keys]
            total = keys[0].broadcast(parts[0]).contiguous().view(tensor.shape)
            for key, part in zip(keys[1:], parts[1:]):
                total.view(key.shape).add_(key.broadcast(part))
            if ctx.op == "sum_sq":
                total.mul_(tensor)
            elif ctx.op == "l1":
                total.mul_(tensor.sign())
            grads[pi] = total
        return (None, None, *grads)


def _merge_ranges(fine: Sequence[int], coarse: Sequence[int]) -> list[range] | None:
    """For each dim of ``coarse``, the run of ``fine`` dims it merges (``None`` if it does not).

    ``fine = (3, 4, 8, 32)`` and ``coarse = (96, 32)`` give ``[range(0, 3), range(3, 4)]``.
    """
    out, i = [], 0
    for size in coarse:
        start, product = i, 1
        while i < len(fine) and product < size:
            product *= fine[i]
            i += 1
        if product != size:
            return None
        out.append(range(start, i))
    if i != len(fine):
        if any(fine[j] != 1 for j in range(i, len(fine))) or not out:
            return None
        out[-1] = range(out[-1].start, len(fine))
    return out


def backward_recipe(keys: Sequence[Any]) -> Any:
    """How to spread one parameter's position gradients over its finest view.

    Returns ``(fine shape, term groups)`` — each group a list of ``(start, stop, sizes,
    order, target)`` reshapes of a slice of the position-gradient vector whose broadcast
    sum is one term — or ``None`` when the keys' views do not refine one another. Terms
    whose sum stays small (at most a quarter of the parameter: a conv's rows and columns
    meet in ``[out, in, 1, 1]``, a head and a head dimension in ``[1, heads, dim, 1]``) are
    grouped, so the caller adds them before touching the full tensor; the remaining terms
    are added straight into the gradient buffer.
    """
    fine = max((tuple(key.shape) for key in keys), key=len)
    numel = math.prod(fine)
    groups: list[tuple[list[int], list[Any]]] = []  # (union shape, pieces)
    for key in keys:
        ranges = _merge_ranges(fine, key.shape)
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
        piece = (key.offset, key.offset + key.length, tuple(key.shape[d] for d in key.dims),
                 order, tuple(target))
        for union, pieces in groups:
            merged = [max(a, b) for a, b in zip(union, target)]
            if 4 * math.prod(merged) <= numel:
                union[:] = merged
                pieces.append(piece)
                break
        else:
            groups.append((list(target), [piece]))
    return fine, [pieces for _, pieces in groups]
