"""Models, random damage and brute-force counts for the sparsity tracker tests.

The oracles here never use weighttracker's layer table or reduction plans: they walk the
model's modules by type and count with plain tensor indexing / Python loops.
"""

from __future__ import annotations

import random

import torch
import torchvision
from torch import nn

from models import CatNet, MHANet, TinyConvNet, conv_input, sequence_input


# the classifiers' outputs are units too, so that their groups are counted as well
OUTPUTS = {"prune_model_outputs": True}


def _resnet18():
    return torchvision.models.resnet18(num_classes=10), conv_input(1, 32), dict(OUTPUTS)


def _mobilenet_v2():
    return torchvision.models.mobilenet_v2(num_classes=10), conv_input(1, 32), dict(OUTPUTS)


def _catnet():
    return CatNet(), conv_input(1), dict(OUTPUTS)


def _tiny():
    return TinyConvNet(), conv_input(1), dict(OUTPUTS)


def _mhanet():
    model = MHANet()
    return model, sequence_input(1), {"num_heads": {model.attn: 4}, "prune_num_heads": True, **OUTPUTS}


CASES = {
    "resnet18": _resnet18,
    "mobilenet_v2": _mobilenet_v2,
    "catnet": _catnet,
    "tiny": _tiny,
    "mhanet": _mhanet,
}


def prunable(group) -> bool:
    """Whether physical pruning supports the group (MHA embedding channels are refused)."""
    return not any(
        issubclass(m.module_type, nn.MultiheadAttention) and str(m.axis) == "feature" for m in group.members
    )


def pick_units(tracker, seed: int, max_fraction: float = 0.5, only_prunable: bool = False) -> dict:
    """Random units of every group, never all of a group (so physical pruning may run)."""
    rng = random.Random(seed)
    chosen = {}
    for group in tracker.groups:
        if only_prunable and not prunable(group):
            continue
        k = rng.randint(0, max(0, int(group.n_units * max_fraction)))
        k = min(k, group.n_units - 1)
        if k:
            chosen[group.id] = sorted(rng.sample(range(group.n_units), k))
    return chosen


def zero_random_weights(model: nn.Module, seed: int, per_tensor: int = 7) -> None:
    """Zero a few random single elements of every parameter with 2+ dims."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.dim() < 2:
                continue
            flat = param.view(-1)
            idx = torch.randint(0, flat.numel(), (per_tensor,), generator=gen)
            flat[idx] = 0.0


def damage(tracker, model: nn.Module, seed: int, only_prunable: bool = False) -> dict[int, list[int]]:
    """Fake-prune random units, then zero random single weights; returns the units."""
    units = pick_units(tracker, seed, only_prunable=only_prunable)
    tracker.fake_prune_units(units)
    zero_random_weights(model, seed)
    return units


def gemm_weights(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Weights of conv / linear / attention layers by module name (effective values).

    ``nn.MultiheadAttention`` owns ``in_proj_weight`` and ``out_proj.weight``; its
    ``out_proj`` is not listed again.
    """
    out: dict[str, list[torch.Tensor]] = {}
    skip: set[str] = set()
    for name, module in model.named_modules():
        if name in skip:
            continue
        if isinstance(module, nn.MultiheadAttention):
            out[name] = [module.in_proj_weight.detach(), module.out_proj.weight.detach()]
            skip.add(f"{name}.out_proj" if name else "out_proj")
        elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            out[name] = [module.weight.detach()]
    return out


def count_zeros(tensors: list[torch.Tensor], loop: bool = False) -> tuple[int, int]:
    """(zeros, elements) of ``tensors``: ``(t == 0).sum()``, or a Python loop with ``loop``."""
    if loop:
        zeros = sum(int(v == 0) for t in tensors for v in t.reshape(-1).tolist())
    else:
        zeros = sum(int((t == 0).sum()) for t in tensors)
    return zeros, sum(t.numel() for t in tensors)


def _rows(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``[positions, C]``: the input axis last, one row per (output, spatial) position."""
    w = weight.detach()
    if transposed:
        w = w.transpose(0, 1)
    return w.movedim(1, -1).reshape(-1, w.shape[1])


def block_zero_counts_loop(weight: torch.Tensor, transposed: bool = False) -> tuple[list[int], int]:
    """Zeros of every complete 4-block along the input axis, and the tail size (Python loops)."""
    rows = _rows(weight, transposed).tolist()
    channels = weight.shape[0 if transposed else 1]
    counts = []
    for row in rows:
        for start in range(0, channels - channels % 4, 4):
            counts.append(sum(1 for v in row[start : start + 4] if v == 0))
    return counts, len(rows) * (channels % 4)


def block_histogram_by_start(weight: torch.Tensor, transposed: bool = False) -> tuple[list[int], int]:
    """Blocks with 0..4 zeros and the tail size: a loop over block starts, rows vectorised."""
    rows = _rows(weight, transposed)
    channels = rows.shape[1]
    hist = [0] * 5
    for start in range(0, channels - channels % 4, 4):
        zeros = (rows[:, start : start + 4] == 0).sum(dim=1)
        for k in range(5):
            hist[k] += int((zeros == k).sum())
    return hist, rows.shape[0] * (channels % 4)


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(weight elements, bias elements) of a model; biases: names whose last part has "bias"."""
    weights = biases = 0
    for name, param in model.named_parameters():
        if "bias" in name.rsplit(".", 1)[-1]:
            biases += param.numel()
        else:
            weights += param.numel()
    return weights, biases
