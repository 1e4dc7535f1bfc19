"""Shared helpers for the benchmarks: models, timing, and writing docs/performance.md."""

from __future__ import annotations

import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PERFORMANCE = ROOT / "docs" / "performance.md"


def models(which: list[str]):
    """``(name, model, example_inputs, tracker kwargs)`` for resnet50 and ViT-B/16."""
    out = []
    if "resnet50" in which:
        import torchvision

        out.append(("resnet50", torchvision.models.resnet50(), torch.randn(1, 3, 224, 224), {}))
    if "vit_b16" in which:
        import timm

        vit = timm.create_model("vit_base_patch16_224", pretrained=False)
        heads = {b.attn.qkv: b.attn.num_heads for b in vit.blocks}
        out.append(("vit_b16", vit, torch.randn(1, 3, 224, 224),
                    {"num_heads": heads, "prune_num_heads": True, "prune_head_dims": True}))
    return out


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {platform.system()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch thread(s)")


def write_section(name: str, body: str) -> None:
    """Replace the ``<!-- bench:name -->`` ... ``<!-- /bench:name -->`` block of performance.md."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = PERFORMANCE.read_text() if PERFORMANCE.exists() else "# Performance\n"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _m: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    PERFORMANCE.write_text(text)
