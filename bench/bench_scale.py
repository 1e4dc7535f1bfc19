"""Scale: the structure, trackers and group lasso of Llama-shaped models up to 7B, and 70B on meta.

Every model is the plain-PyTorch ``LlamaLike`` of the tests (RMSNorm, separate q/k/v/o
projections, rotary embeddings, SDPA, SwiGLU), in bfloat16, built on the meta device and
materialised with ``to_empty`` (no random init); its weights are then filled in place with
a deterministic pattern (a prime-length random block repeated), so that every page is
really allocated and the values vary. Each model is measured in a process of its own (so
its peak memory is its own), one torch thread, one after the other:

* ``WeightTracker(model, ids, prune_num_heads=True)``, split into the trace (Torch-Pruning's
  dependency graph), the groups (enumeration and checks) and the rest (canonical groups,
  head layouts, layer table), then the reduction plan compiled for every member;
* ``create_tracker`` of the five metric trackers, then their first ``track()``;
* ``group_lasso``: forward, then backward (which writes a gradient for every parameter);
* peak RSS of each phase (the kernel's high-water mark, reset between phases) over the
  weights' bytes; the lasso's peak is also given over weights plus gradients.

Rows on the meta device build the structure only (no weights to measure), next to
Torch-Pruning alone (``build_dependency`` + ``get_all_groups``) on the same model in the
same run. The load average and each process's CPU time over wall time tell how busy the
machine was. A parent process watches every child's memory and stops it above
``--max-rss-gb``; real models are skipped when the machine has too little memory free.

Run: ``python bench/bench_scale.py`` (everything; 7B rows need ~19 GB free) or e.g.
``python bench/bench_scale.py --models small medium 70b-meta --no-write``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

GB = 1024**3
TRACKERS = [
    "structured_bops",
    "unstructured_sparsity",
    "unstructured_bops",
    "nvidia_2_4_sparsity",
    "group_pruning_summary",
]
#: name -> (hidden, layers, heads, kv heads, MLP, vocab, device)
MODELS = {
    "small": (1024, 4, 16, 16, 2816, 32000, "cpu"),
    "medium": (2048, 8, 16, 4, 5632, 32000, "cpu"),
    "wide": (4096, 8, 32, 32, 11008, 32000, "cpu"),
    "7b-16l": (4096, 16, 32, 32, 11008, 32000, "cpu"),
    "7b": (4096, 32, 32, 32, 11008, 32000, "cpu"),
    "7b-gqa": (4096, 32, 32, 8, 11008, 32000, "cpu"),
    "7b-meta": (4096, 32, 32, 32, 11008, 32000, "meta"),
    "70b-meta": (8192, 80, 64, 8, 28672, 32000, "meta"),
}
SEQUENCE = 8


# ------------------------------------------------------------------------------ child


def _rss_now() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0.0


def _peak() -> float:
    """Peak RSS since the last :func:`_reset_peak` (``VmHWM``), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # the peak then stays the process's peak (an upper bound)


def _fill(model) -> None:
    """Deterministic, varied values in place: one random block of prime length, repeated."""
    import torch

    gen = torch.Generator().manual_seed(0)
    block = (torch.randn(1_000_003, generator=gen) * 0.02).to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
                continue
            flat = param.view(-1)
            for start in range(0, flat.numel(), block.numel()):
                chunk = flat[start : start + block.numel()]
                chunk.copy_(block[: chunk.numel()])


def _timed_structure(model, ids):
    """``WeightTracker(...)`` with the time of its trace and of its group enumeration."""
    from weighttracker_core import WeightTracker
    from weighttracker_core.graph import handle as handle_module

    times = {"trace": 0.0, "groups": 0.0}
    trace, groups = handle_module.trace, handle_module.DependencyGraphHandle.groups

    def timed_trace(*args, **kwargs):
        start = time.perf_counter()
        try:
            return trace(*args, **kwargs)
        finally:
            times["trace"] += time.perf_counter() - start

    def timed_groups(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return groups(self, *args, **kwargs)
        finally:
            times["groups"] += time.perf_counter() - start

    handle_module.trace = timed_trace
    handle_module.DependencyGraphHandle.groups = timed_groups
    try:
        start = time.perf_counter()
        tracker = WeightTracker(model, ids, prune_num_heads=True)
        total = time.perf_counter() - start
    finally:
        handle_module.trace = trace
        handle_module.DependencyGraphHandle.groups = groups
    times["rest"] = total - times["trace"] - times["groups"]
    times["tracker"] = total
    return tracker, times


def _tp_alone(model, ids) -> dict:
    """Torch-Pruning by itself: ``build_dependency`` and every group, on the same model."""
    import torch
    import torch_pruning as tp
    from torch import nn

    start = time.perf_counter()
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=ids, verbose=False)
    built = time.perf_counter() - start
    count = sum(1 for _ in graph.get_all_groups(root_module_types=(nn.Linear,)))
    total = time.perf_counter() - start
    return {"tp_graph_s": built, "tp_groups_s": total - built, "tp_total_s": total,
            "tp_groups": count, "tp_peak": _peak()}


def measure(name: str, baseline: bool) -> dict:
    import torch
    import torch_pruning  # noqa: F401 - counted in the libraries' share of the RSS
    import weighttracker_core  # noqa: F401

    from transformer_models import LlamaLike

    torch.set_num_threads(1)
    hidden, layers, heads, kv, inner, vocab, device = MODELS[name]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    out: dict = {"name": name, "device": device, "load_before": os.getloadavg()[0],
                 "import_rss": _rss_now()}
    with torch.device("meta"):
        model = LlamaLike(vocab=vocab, hidden=hidden, heads=heads, kv_heads=kv, inner=inner,
                          layers=layers).to(torch.bfloat16)
    out["params"] = sum(p.numel() for p in model.parameters())
    out["weights"] = sum(p.numel() * p.element_size() for p in model.parameters())
    if device != "meta":
        start = time.perf_counter()
        model = model.to_empty(device=device)
        _fill(model)
        out["fill_s"] = time.perf_counter() - start
    model.eval()
    ids = torch.zeros(1, SEQUENCE, dtype=torch.long, device=device)
    _reset_peak()
    tracker, times = _timed_structure(model, ids)
    out.update({f"{k}_s": v for k, v in times.items()})
    out["groups"] = len(tracker.groups)
    out["units"] = tracker.num_units
    out["kinds"] = sorted({str(g.kind) for g in tracker.groups})
    out["structure_peak"] = out["tracker_peak"] = _peak()
    if device != "meta":
        start = time.perf_counter()
        tracker.structure.plan()
        out["plans_s"] = time.perf_counter() - start
        out["structure_peak"] = _peak()

        _reset_peak()
        start = time.perf_counter()
        metrics = tracker.create_tracker(TRACKERS)
        out["create_s"] = time.perf_counter() - start
        start = time.perf_counter()
        metrics.track()
        out["track_s"] = time.perf_counter() - start
        out["track_peak"] = _peak()

        _reset_peak()
        lasso = tracker.create_regularizer("group_lasso")
        start = time.perf_counter()
        value = lasso()
        out["lasso_fwd_s"] = time.perf_counter() - start
        out["lasso_fwd_peak"] = _peak()
        # the backward writes a gradient as large as every parameter it reaches
        grads = sum(p.numel() * p.element_size() for p in model.parameters())
        out["grads_need"] = grads
        if _available() > grads + GB:
            start = time.perf_counter()
            value.backward()
            out["lasso_bwd_s"] = time.perf_counter() - start
            out["lasso_peak"] = _peak()
            out["grads"] = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                               if p.grad is not None)
        else:
            out["lasso_bwd_skipped"] = (f"gradients need {grads / GB:.1f} GB, "
                                        f"{_available() / GB:.1f} GB free")
        del value
        model.zero_grad(set_to_none=True)
        _reset_peak()
        start = time.perf_counter()
        lasso.proximal_step_(lr=1e-3, strength=1e-4)
        out["prox_s"] = time.perf_counter() - start
        out["prox_peak"] = _peak()
        del metrics, lasso
    del tracker
    if baseline:
        _reset_peak()
        out.update(_tp_alone(model, ids))
    out["cpu_over_wall"] = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    out["load_after"] = os.getloadavg()[0]
    return out


# ----------------------------------------------------------------------------- parent


def _available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _child_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(name: str, baseline: bool, max_rss: float) -> dict:
    """One model in a fresh process, stopped if its memory goes above ``max_rss`` bytes."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name]
    if baseline:
        cmd.append("--baseline")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    killed: list[int] = []

    def watch() -> None:
        while proc.poll() is None:
            rss = _child_rss(proc.pid)
            if rss > max_rss:
                killed.append(rss)
                proc.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, _ = proc.communicate()
    watcher.join()
    if killed:
        return {"name": name, "error": f"stopped at {killed[0] / GB:.1f} GB RSS (limit {max_rss / GB:.1f} GB)"}
    if proc.returncode != 0:
        return {"name": name, "error": f"exit code {proc.returncode}"}
    return json.loads(stdout.strip().splitlines()[-1])


def _s(value) -> str:
    return "—" if value is None else f"{value:.1f} s"


def _ratio(peak, base) -> str:
    return "—" if peak is None or not base else f"**{peak / base:.2f}x**"


def report(rows: list[dict], argv: list[str]) -> str:
    import torch

    from _common import machine

    torch.set_num_threads(1)
    lines = [
        "## Scale: Llama-shaped models up to 7B, and 70B on the meta device (issue: scale)",
        "",
        f"Machine: {machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GB:.0f} GB RAM. "
        f"bfloat16 `LlamaLike` (tests/transformer_models.py), example input 1x{SEQUENCE} tokens, "
        "`WeightTracker(model, ids, prune_num_heads=True)`; each model in a fresh process, one "
        "after the other. Peak = the process's RSS high-water mark during the phase (Python, "
        "torch and the libraries take about "
        f"{min((r['import_rss'] for r in rows if 'import_rss' in r), default=0) / GB:.2f} GB of it).",
        f"Reproduce: `python bench/bench_scale.py {' '.join(argv)}`.".replace(" `.", "`."),
        "",
        "| model | params | weights | trace | groups | rest | plans | **structure** | peak / weights "
        "| groups (units) | create 5 trackers | first `track()` | peak / weights "
        "| lasso fwd | lasso bwd | peak / weights (/ weights+grads) | proximal step | peak / weights "
        "| CPU/wall, load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        hidden, layers, heads, kv, inner, _, device = MODELS[r["name"]]
        shape = f"{r['name']} ({layers}x{hidden}, {heads}/{kv} heads, MLP {inner})"
        if "error" in r:
            lines.append(f"| {shape} | " + " | ".join(["—"] * 17) + f" | {r['error']} |")
            continue
        weights = r["weights"]
        structure = r["tracker_s"] + r.get("plans_s", 0.0)
        if device == "meta":
            peak = f"{r['structure_peak'] / GB:.2f} GB RSS (weights not allocated)"
        else:
            peak = _ratio(r["structure_peak"], weights)
        lasso_peak, lasso_bwd = "—", _s(r.get("lasso_bwd_s"))
        if "lasso_peak" in r:
            lasso_peak = (f"{_ratio(r['lasso_peak'], weights)} "
                          f"({r['lasso_peak'] / (weights + r['grads']):.2f}x)")
        elif "lasso_fwd_peak" in r:
            lasso_peak = f"fwd: {_ratio(r['lasso_fwd_peak'], weights)}"
            lasso_bwd = f"not run ({r['lasso_bwd_skipped']})"
        lines.append(
            f"| {shape} | {r['params'] / 1e9:.2f} B | {weights / GB:.1f} GB{' (meta)' if device == 'meta' else ''} "
            f"| {_s(r['trace_s'])} | {_s(r['groups_s'])} | {_s(r['rest_s'])} | {_s(r.get('plans_s'))} "
            f"| **{structure:.1f} s** | {peak} | {r['groups']} ({r['units']:,}) "
            f"| {_s(r.get('create_s'))} | {_s(r.get('track_s'))} | {_ratio(r.get('track_peak'), weights)} "
            f"| {_s(r.get('lasso_fwd_s'))} | {lasso_bwd} | {lasso_peak} "
            f"| {_s(r.get('prox_s'))} | {_ratio(r.get('prox_peak'), weights)} "
            f"| {r['cpu_over_wall']:.2f}, {r['load_before']:.1f}→{r['load_after']:.1f} |"
        )
    tp_rows = [r for r in rows if "tp_total_s" in r]
    if tp_rows:
        lines += ["", "Torch-Pruning alone on the same models, same processes "
                  "(`build_dependency` + `get_all_groups`):", ""]
        for r in tp_rows:
            ours = r["tracker_s"] + r.get("plans_s", 0.0)
            lines.append(
                f"- {r['name']}: graph {r['tp_graph_s']:.1f} s + groups {r['tp_groups_s']:.1f} s = "
                f"**{r['tp_total_s']:.1f} s**, peak {r['tp_peak'] / GB:.2f} GB RSS "
                f"(weighttracker's structure: {ours:.1f} s, {r['structure_peak'] / GB:.2f} GB)."
            )
    lines += [
        "",
        "Targets (issue: scale): a 7B-shaped structure (with or without GQA) in at most 30 s at "
        "a peak of at most 1.3x the weights; the five trackers' first `track()` and one "
        "group-lasso forward+backward under a minute each at under 1.3x; the 70B-shaped "
        "structure on the meta device in at most 30 s and 2.5 GB. The lasso's backward writes a "
        "gradient for every parameter (1x the weights by itself), so its peak is also given "
        "over weights plus gradients. CPU/wall below 1 means the process waited for a core "
        "(other work on the machine); load is the 1-minute load average before and after.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip Torch-Pruning alone on the meta rows")
    parser.add_argument("--max-rss-gb", type=float, default=21.0,
                        help="stop a model whose process goes above this RSS")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.baseline)))
        return
    rows = []
    for name in args.models:
        hidden, layers, heads, kv, inner, vocab, device = MODELS[name]
        if device != "meta":
            weights = 2 * (2 * vocab * hidden + layers * (hidden * hidden * (2 + 2 * kv / heads)
                                                          + 3 * hidden * inner))
            # 1.3x the weights + ~1 GB of Python and torch (the lasso backward runs when
            # its gradients fit too)
            need = 1.3 * weights + GB
            free = _available()
            if free < need:
                rows.append({"name": name, "error": f"skipped: {free / GB:.1f} GB free, needs {need / GB:.1f} GB"})
                print(f"{name}: skipped ({free / GB:.1f} GB free, needs {need / GB:.1f} GB)", flush=True)
                continue
        row = run_child(name, device == "meta" and not args.no_baseline, args.max_rss_gb * GB)
        print(json.dumps(row), flush=True)
        rows.append(row)
    argv = [a for a in sys.argv[1:] if a != "--no-write"]
    text = report(rows, argv)
    print(text)
    if not args.no_write:
        from _common import write_section

        write_section("scale", text)


if __name__ == "__main__":
    main()
