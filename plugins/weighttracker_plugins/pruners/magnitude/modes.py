"""Mask computations of the ``magnitude`` pruner: unstructured, block, n:m, per-channel, per-kernel.

Every function takes a weight tensor and returns a mask of the same shape and dtype with
``1`` for weights to keep and ``0`` for weights to prune. Ties are broken by position
(the earlier weight is pruned first), so masks are deterministic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from weighttracker_core import ConfigError

from .config import ModuleMagnitudePrunerConfig

__all__ = ["count_for_fraction", "magnitude_mask", "mask_mode", "n_m_mask", "scheduled_mask"]


def count_for_fraction(total: int, fraction: float) -> int:
    """``floor(total * fraction)``, robust to binary rounding (``100 * 0.29`` gives 29, not 28)."""
    return max(0, min(total, math.floor(total * fraction + 1e-9 * max(1, total))))


def _unit_scores(weight: torch.Tensor, granularity: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Scores ``[rows, cols]`` of the pruning units and the shape a unit mask broadcasts from.

    ``per_scalar`` (and any weight of rank < 3): one unit per weight, ``|w|``, rows are dim 0
    and the other dims are folded into the columns. ``per_channel``: one unit per slice
    ``w[o]`` (its L2 norm). ``per_kernel``: one unit per kernel ``w[o, i]`` (its L2 norm).
    """
    rank = weight.dim()
    if granularity == "per_scalar" or rank < 3:
        return weight.abs().reshape(weight.shape[0], -1), tuple(weight.shape)
    if granularity == "per_channel":
        return weight.flatten(1).norm(dim=1).unsqueeze(1), (weight.shape[0],) + (1,) * (rank - 1)
    if granularity == "per_kernel":
        return weight.flatten(2).norm(dim=2), tuple(weight.shape[:2]) + (1,) * (rank - 2)
    raise ConfigError(f"granularity={granularity!r} is not one of per_scalar, per_channel, per_kernel.")


def magnitude_mask(
    weight: torch.Tensor, sparsity: float, *, granularity: str = "per_scalar", block_size: int = 1
) -> torch.Tensor:
    """Keep-mask zeroing the ``floor(units * sparsity)`` pruning units of lowest magnitude.

    Units are single weights (``per_scalar``), output channels (``per_channel``) or
    kernels (``per_kernel``, rank >= 3 only; lower ranks fall back to ``per_scalar``).
    With ``block_size > 1`` the units are grouped ``block_size`` at a time along dim 0
    (zero-padded when dim 0 does not divide), each group scores the L2 norm of its unit
    scores, and whole groups are zeroed, lowest first, while the zeroed units stay
    within the budget.

    Example: ``[0.3, -0.2, -0.01, 0.05]`` at sparsity 0.75 zeroes ``floor(4 * 0.75) = 3``
    weights and keeps ``[1, 0, 0, 0]``. The 4x2 weight ``[[1, 3], [-6, -7], [0, 3],
    [-9, 2]]`` with ``block_size=2`` has block norms ``[[6.08, 7.62], [9.00, 3.61]]``; at
    0.5 the two lowest (3.61, 6.08) go, giving ``[[0, 1], [0, 1], [1, 0], [1, 0]]``.
    """
    if weight.dim() == 0:
        raise ConfigError("Cannot prune a 0-d parameter (a single number).")
    w = weight.detach().float()
    scores, unit_shape = _unit_scores(w, granularity)
    rows, cols = scores.shape
    budget = count_for_fraction(rows * cols, sparsity)
    if budget == 0:
        return torch.ones_like(weight)
    if block_size > 1:
        pad = (-rows) % block_size
        padded = torch.cat([scores, scores.new_zeros(pad, cols)]) if pad else scores
        blocks = padded.reshape(-1, block_size, cols)
        block_scores = blocks.pow(2).sum(dim=1).sqrt()  # [num_blocks, cols]
        sizes = torch.full_like(block_scores, float(block_size))
        sizes[-1] = block_size - pad  # the padded last block holds fewer real units
    else:
        block_scores, sizes = scores, torch.ones_like(scores)
    order = torch.argsort(block_scores.flatten(), stable=True)
    within_budget = sizes.flatten()[order].cumsum(0) <= budget
    keep = torch.ones(block_scores.numel(), device=w.device)
    keep[order[within_budget]] = 0.0
    keep = keep.reshape(block_scores.shape)
    if block_size > 1:
        keep = keep.repeat_interleave(block_size, dim=0)[:rows]
    return keep.reshape(unit_shape).expand(weight.shape).to(weight.dtype).contiguous()


def n_m_mask(weight: torch.Tensor, n: int, m: int, dim: int = 1) -> torch.Tensor:
    """Keep-mask with the ``n`` smallest ``|w|`` of every block of ``m`` zeroed.

    Blocks are ``m`` consecutive channels along ``dim`` (1: input channels, 0: output
    channels) at every fixed position of the other axes; for a conv ``[K, C, kh, kw]`` with
    ``dim=1`` that is ``m`` input channels at one output channel and one kernel position,
    the layout NVIDIA's 2:4 sparse tensor cores need. When the channel count is not a
    multiple of ``m`` the last block is padded with zeros, which count among its smallest.

    Example: row ``[-2, -3, -4, 0]`` with ``n=1, m=2`` has blocks ``[-2, -3]`` and
    ``[-4, 0]``; their smallest entries go: ``[0, 1, 1, 0]``.
    """
    if weight.dim() < 2:
        raise ConfigError(f"n:m sparsity needs a weight of rank >= 2, got shape {tuple(weight.shape)}.")
    x = weight.detach().float().abs()
    if dim == 0:
        x = x.transpose(0, 1)
    x = x.movedim(1, -1)  # [other channel axis, *kernel, blocked channel axis]
    moved_shape = x.shape
    channels = moved_shape[-1]
    flat = x.reshape(-1, channels)
    pad = (-channels) % m
    blocks = F.pad(flat, (0, pad)).reshape(flat.shape[0], -1, m)
    smallest = torch.argsort(blocks, dim=-1, stable=True)[..., :n]
    keep = torch.ones_like(blocks).scatter_(-1, smallest, 0.0)
    keep = keep.reshape(flat.shape[0], -1)[:, :channels].reshape(moved_shape).movedim(-1, 1)
    if dim == 0:
        keep = keep.transpose(0, 1)
    return keep.to(weight.dtype).contiguous()


def mask_mode(config: ModuleMagnitudePrunerConfig, rank: int) -> str:
    """The mode a config selects for a weight of this rank: ``unstructured``, ``block``,
    ``n:m``, ``per_channel`` or ``per_kernel`` (the last two need rank >= 3)."""
    if config.n_m_ratio is not None:
        return "n:m"
    granularity = config.granularity if rank >= 3 else "per_scalar"
    if config.block_size > 1:
        return "block" if granularity == "per_scalar" else f"block_{granularity}"
    return "unstructured" if granularity == "per_scalar" else granularity


def scheduled_mask(weight: torch.Tensor, config: ModuleMagnitudePrunerConfig, sparsity: float) -> torch.Tensor:
    """The keep-mask of ``config`` at the scheduled ``sparsity``.

    In n:m mode the schedule runs from 0 to ``n / m``: at sparsity ``s`` the mask is
    ``floor(s * m):m`` along ``config.dim``, and unstructured at ``s`` while ``floor(s * m)``
    is still 0 (so a gradual schedule reaches 2:4 through 1:4).
    """
    if config.n_m_ratio is not None:
        _, m = config.n_m_ratio
        zeros = count_for_fraction(m, sparsity)
        if zeros == 0:
            return magnitude_mask(weight, sparsity)
        return n_m_mask(weight, zeros, m, config.dim)
    return magnitude_mask(weight, sparsity, granularity=config.granularity, block_size=config.block_size)
