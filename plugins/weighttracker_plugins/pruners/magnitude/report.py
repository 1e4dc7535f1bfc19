"""Per-module statistics for ``MagnitudePruner.report()``, read from effective weights."""

from __future__ import annotations

from typing import Any

import torch

from .config import ModuleMagnitudePrunerConfig

__all__ = ["module_report", "n_m_block_fraction"]


def n_m_block_fraction(weight: torch.Tensor, n: int, m: int, dim: int = 1) -> float | None:
    """Share of complete blocks of ``m`` (laid out as in ``n_m_mask``) with at least ``n`` zeros.

    Incomplete tail blocks are not counted; ``None`` when there is no complete block.
    Example: ``[[0, 1, 0, 2, 5]]`` with ``n=2, m=4`` has one complete block ``[0, 1, 0, 2]``
    with two zeros, so the fraction is 1.0.
    """
    zero = weight == 0
    if dim == 0:
        zero = zero.transpose(0, 1)
    zero = zero.movedim(1, -1)
    channels = zero.shape[-1]
    complete = channels - channels % m
    if complete == 0 or zero.numel() == 0:
        return None
    blocks = zero[..., :complete].reshape(-1, m)
    return (blocks.sum(dim=1) >= n).float().mean().item()


def _block_sparsity(weight: torch.Tensor, block_size: int) -> float | None:
    rows = weight.shape[0] - weight.shape[0] % block_size
    if rows == 0:
        return None
    folded = (weight[:rows] == 0).reshape(rows // block_size, block_size, -1)
    return folded.all(dim=1).float().mean().item()


def module_report(weight: torch.Tensor, config: ModuleMagnitudePrunerConfig, mode: str) -> dict[str, Any]:
    """Statistics of one pruned weight (see ``MagnitudePruner.report``)."""
    numel = weight.numel()
    zeros = int((weight == 0).sum().item())
    stats: dict[str, Any] = {
        "mode": mode,
        "param_name": config.param_name,
        "num_params": numel,
        "num_zeros": zeros,
        "unstructured_sparsity": zeros / numel if numel else 0.0,
        "structured_sparsity": (weight.reshape(weight.shape[0], -1) == 0).all(dim=1).float().mean().item(),
    }
    if config.block_size > 1:
        stats["block_sparsity"] = _block_sparsity(weight, config.block_size)
    if config.n_m_ratio is not None and weight.dim() >= 2:
        n, m = config.n_m_ratio
        stats["n_m_block_fraction"] = n_m_block_fraction(weight, n, m, config.dim)
    return stats
