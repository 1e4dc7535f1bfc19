"""Keeping a pruned Hugging Face model and its config in agreement.

Physical pruning changes layer shapes; a Hugging Face model also keeps those sizes in its
attention modules (``num_key_value_groups``, ``attention_head_size``, ...) and in its config
(``num_attention_heads``, ``num_key_value_heads``, ``hidden_size``, ``intermediate_size``,
``head_dim``), from which ``from_pretrained`` rebuilds the layers before loading weights.

* :func:`check_prune` (run before a prune changes anything) works out the shapes the
  request leaves, the config that would describe them, and refuses what the stock class
  cannot rebuild: different head counts or MLP widths across layers, a changed head width
  (the reloaded model would compute another attention scale), and any parameter whose
  shape ``type(model)(new_config)`` would not reproduce (checked on the meta device).
* :func:`sync_after_prune` (run after the shapes changed) writes the new sizes into the
  attention and MLP modules and gives the model a new config object; it checks the
  rebuild again against the real shapes.

Example: a Llama layer with 4 query heads in 2 kv groups (``head_dim`` 8) losing one query
head per group gets ``num_key_value_groups = 1``, and the config says
``num_attention_heads = 2, num_key_value_heads = 2, head_dim = 8``.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
from torch import nn

from weighttracker_core import PruningError

from .families import Family, family_of, tested_families

#: The integration that allows any shape the modules can run (config only partly synced).
ANY_SHAPE = "transformers_any_shape"

ShapeOf = Callable[[str], "tuple[int, ...] | None"]


@attrs.frozen(kw_only=True)
class AttentionShape:
    """One attention layer's heads after the prune."""

    name: str
    heads: int
    kv_heads: int
    head_dim: int
    old_head_dim: int


@attrs.frozen(kw_only=True)
class Geometry:
    """Sizes the config describes, per layer, after a prune."""

    attention: tuple[AttentionShape, ...]
    hidden: int | None
    intermediate: dict[str, int]
    vocab: int | None

    def uniform(self, values: list[int]) -> int | None:
        return values[0] if values and len(set(values)) == 1 else None


# ------------------------------------------------------------------------------- shapes


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every name of every parameter, by each of its names (tied weights have several)."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return {name: names for names in by_id.values() for name in names}


def predicted_shapes(tracker: Any) -> dict[str, tuple[int, ...]]:
    """Parameter shapes after the prune ``tracker.pruned_units`` describes, before it runs.

    Every group member slice names the positions each unit owns on one axis; a parameter
    loses, on that axis, the union of the positions of the removed units. Example: removing
    head 1 of 4 (``head_dim`` 8) takes rows 8..15 of ``q_proj.weight`` ``[32, 32]``, which
    becomes ``[24, 32]``.

    Raises:
        PruningError: A slice is cut through a reshaped view, which cannot be predicted.
    """
    model = tracker.model
    params = dict(model.named_parameters(remove_duplicate=False))
    groups = {g.name: g for g in tracker.structure.groups}
    removed: dict[tuple[str, int], set[int]] = {}
    for group_name, ids in (tracker.pruned_units or {}).items():
        chosen = set(ids)
        for member, piece in groups[group_name].iter_slices():
            full = f"{member.module_name}.{piece.param}" if member.module_name else piece.param
            if full not in params:
                continue
            if piece.view is not None or len(piece.dims) != 1:
                raise PruningError(
                    f"{full} is cut through a reshaped view ({group_name}); the shapes after "
                    "this prune cannot be worked out in advance. Build the tracker with "
                    f"integrations=[{ANY_SHAPE!r}] to prune without the config check."
                )
            dim = piece.dims[0] % params[full].dim()
            gone = {p for p, u in zip(piece.positions, piece.units, strict=True) if u in chosen}
            if gone:
                removed.setdefault((full, dim), set()).update(gone)
    aliases = _aliases(model)
    shapes: dict[str, list[int]] = {}
    for (full, dim), gone in removed.items():
        for name in aliases.get(full, [full]):
            shape = shapes.setdefault(name, list(params[name].shape))
            shape[dim] = min(shape[dim], int(params[name].shape[dim]) - len(gone))
    return {name: tuple(shape) for name, shape in shapes.items()}


def current_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of every ``state_dict`` entry of ``model``."""
    return {name: tuple(value.shape) for name, value in model.state_dict(keep_vars=True).items()}


def _module_name(model: nn.Module, module: nn.Module) -> str | None:
    for name, sub in model.named_modules():
        if sub is module:
            return name
    return None


def geometry(tracker: Any, shapes: Mapping[str, tuple[int, ...]], family: Family) -> Geometry:
    """The sizes a config needs, read from ``shapes`` and ``tracker.pruned_attention``."""
    model = tracker.model
    changes = tracker.pruned_attention or {}
    layouts = list(tracker.structure.layouts.values())  # in model order
    attention = []
    for layout in layouts:
        change = changes.get(layout.name)
        if change is None:
            heads, kv, dim = layout.num_heads, layout.num_kv_heads, layout.head_dim
        else:
            heads, kv, dim = change.num_heads, change.num_kv_heads, change.head_dim
        attention.append(AttentionShape(name=layout.name, heads=heads, kv_heads=kv, head_dim=dim,
                                        old_head_dim=layout.head_dim))
    hidden = None
    if layouts:
        q_weight = shapes.get(f"{layouts[0].q}.weight")
        hidden = int(q_weight[1]) if q_weight is not None and len(q_weight) == 2 else None
    intermediate = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == s or name.endswith("." + s) for s in family.intermediate):
            intermediate[name] = int(shapes[f"{name}.weight"][0])
    vocab = None
    try:
        embedding = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        embedding = None
    if isinstance(embedding, nn.Embedding):
        name = _module_name(model, embedding)
        if name is not None and f"{name}.weight" in shapes:
            vocab = int(shapes[f"{name}.weight"][0])
    return Geometry(attention=tuple(attention), hidden=hidden, intermediate=intermediate, vocab=vocab)


# ------------------------------------------------------------------------------- config


def _listing(values: Mapping[str, int], limit: int = 6) -> str:
    """``"a: 4, b: 6"``; past ``limit`` entries grouped by value: ``"6 in 31 layers (...)"``."""
    if len(values) <= limit:
        return ", ".join(f"{k}: {v}" for k, v in values.items())
    by_value: dict[int, list[str]] = {}
    for name, value in values.items():
        by_value.setdefault(value, []).append(name)
    return ", ".join(
        f"{value} in {len(names)} layer{'s' if len(names) > 1 else ''} "
        f"({', '.join(names[:2])}{', ...' if len(names) > 2 else ''})"
        for value, names in sorted(by_value.items(), key=lambda item: len(item[1]))
    )


def problems(model: nn.Module, family: Family, geo: Geometry) -> list[str]:
    """Why the config of ``model``'s class could not describe ``geo`` (empty: it can)."""
    out = []
    heads = {a.name: a.heads for a in geo.attention}
    kv = {a.name: a.kv_heads for a in geo.attention}
    if len(set(heads.values())) > 1:
        out.append(f"the attention layers would keep different numbers of query heads ({_listing(heads)})")
    if len(set(kv.values())) > 1:
        out.append(f"the attention layers would keep different numbers of key/value heads ({_listing(kv)})")
    if len(set(geo.intermediate.values())) > 1:
        out.append(f"the MLPs would have different widths ({_listing(geo.intermediate)})")
    changed = [a for a in geo.attention if a.head_dim != a.old_head_dim]
    if changed:
        a = changed[0]
        out.append(
            f"{a.name} would have head_dim {a.head_dim} instead of {a.old_head_dim}: the stock "
            f"class computes its attention scale as head_dim ** -0.5 from the config, so the "
            f"reloaded model would scale the scores by {a.head_dim ** -0.5:.4g} instead of "
            f"{a.old_head_dim ** -0.5:.4g}"
        )
    if not family.config_head_dim and geo.attention and geo.hidden is not None and not out:
        a = geo.attention[0]
        if a.heads * a.head_dim != geo.hidden:
            out.append(
                f"{family.label} derives the head width as hidden_size // num_attention_heads and "
                f"its attention output layer is hidden_size x hidden_size, so {a.heads} heads of "
                f"{a.head_dim} need a hidden size of {a.heads * a.head_dim}, but it would be "
                f"{geo.hidden} (remove {geo.hidden - a.heads * a.head_dim} hidden channels "
                "with the heads, or keep every head)"
            )
    return out


def updated_config(config: Any, family: Family, geo: Geometry) -> Any:
    """A copy of ``config`` with every size ``geo`` gives uniformly."""
    new = copy.deepcopy(config)
    if geo.attention:
        heads = geo.uniform([a.heads for a in geo.attention])
        kv = geo.uniform([a.kv_heads for a in geo.attention])
        dim = geo.uniform([a.head_dim for a in geo.attention])
        if heads is not None:
            new.num_attention_heads = heads
        if kv is not None and hasattr(new, "num_key_value_heads"):
            new.num_key_value_heads = kv
        if dim is not None and family.config_head_dim:
            new.head_dim = dim
    if geo.hidden is not None:
        new.hidden_size = geo.hidden
    width = geo.uniform(list(geo.intermediate.values()))
    if width is not None and hasattr(new, "intermediate_size"):
        new.intermediate_size = width
    if geo.vocab is not None and hasattr(new, "vocab_size"):
        new.vocab_size = geo.vocab
    return new


def rebuild_differences(model: nn.Module, config: Any, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Where ``type(model)(config)`` (built on the meta device) differs from ``shapes``."""
    cls = type(model)
    logger = logging.getLogger("transformers")
    level = logger.level
    try:
        logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # what from_pretrained does: read the saved dict back (the config class
            # validates it), then build the layers from it
            reread = type(config).from_dict(config.to_dict())
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            fresh = cls(reread)
    except Exception as err:  # the config itself is refused
        return [f"{type(config).__name__} refuses the new sizes ({_first_line(err)})"]
    finally:
        logger.setLevel(level)
    built = current_shapes(fresh)
    out = []
    for key in sorted(built.keys() | shapes.keys()):
        mine, theirs = shapes.get(key), built.get(key)
        if mine != theirs:
            have = "missing" if mine is None else list(mine)
            want = "missing" if theirs is None else list(theirs)
            out.append(f"{key}: the pruned model would have {have}, {cls.__name__}(config) builds {want}")
    return out


def _first_line(err: BaseException) -> str:
    text = str(getattr(err, "__cause__", None) or err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"


def _refusal(model: nn.Module, family: Family, reasons: list[str]) -> PruningError:
    config_name = type(model.config).__name__
    note = "" if family.tested else (
        f" ({family.label} is not one of the tested families: {tested_families()}; the check "
        "rebuilt the model from the new config.)"
    )
    return PruningError(
        f"Refusing this prune: {config_name} could not describe the pruned "
        f"{type(model).__name__}, so save_pretrained() / from_pretrained() could not rebuild it: "
        + "; ".join(reasons[:4]) + ("; ..." if len(reasons) > 4 else "")
        + ". Nothing was changed. Remove the same units from every layer (as many query heads "
        "from each kv group of every layer, the same number of MLP channels in every layer, "
        "whole heads only), or, to prune anyway and keep the model in this process (save it "
        "with torch.save or the pruning record, not save_pretrained), build the tracker with "
        f"integrations=[{ANY_SHAPE!r}]." + note
    )


def check_prune(tracker: Any) -> None:
    """Refuse, before anything changes, a prune the model's config could not describe.

    Raises:
        PruningError: Naming what differs between layers or from a rebuild, and how to
            prune instead. The model is untouched.
    """
    model = tracker.model
    family = family_of(model.config)
    shapes = current_shapes(model)
    shapes.update(predicted_shapes(tracker))
    geo = geometry(tracker, shapes, family)
    reasons = problems(model, family, geo)
    if not reasons:
        reasons = rebuild_differences(model, updated_config(model.config, family, geo), shapes)
    if reasons:
        raise _refusal(model, family, reasons)


# --------------------------------------------------------------------------------- sync

#: Attention attributes (as the classes name them) and which size each one holds.
ATTENTION_ATTRS = {
    "num_heads": "heads",
    "num_attention_heads": "heads",
    "num_key_value_heads": "kv_heads",
    "num_kv_heads": "kv_heads",
    "num_key_value_groups": "groups",
    "head_dim": "head_dim",
    "attention_head_size": "head_dim",
    "all_head_size": "width",
}


def _set_int(module: nn.Module, attr: str, value: int) -> None:
    current = getattr(module, attr, None)
    if isinstance(current, int) and not isinstance(current, bool):
        setattr(module, attr, int(value))


def sync_modules(model: nn.Module, geo: Geometry, old_hidden: int | None) -> None:
    """Write the new sizes into the attention, MLP and block modules of ``model``."""
    for shape in geo.attention:
        attn = model.get_submodule(shape.name)
        values = {"heads": shape.heads, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim,
                  "groups": shape.heads // shape.kv_heads, "width": shape.heads * shape.head_dim}
        for attr, kind in ATTENTION_ATTRS.items():
            _set_int(attn, attr, values[kind])
    for name, width in geo.intermediate.items():
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        _set_int(parent, "intermediate_size", width)
    if geo.hidden is not None and old_hidden is not None and geo.hidden != old_hidden:
        for module in model.modules():
            if getattr(module, "hidden_size", None) == old_hidden:
                _set_int(module, "hidden_size", geo.hidden)


def swap_config(model: nn.Module, new: Any) -> None:
    """Point every module that held ``model.config`` at ``new``.

    The config object is replaced, never edited, so that the tracker's snapshot (which
    restores every module's attributes) brings the old one back if the prune fails later.
    """
    old = model.config
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new


def sync_after_prune(tracker: Any, *, strict: bool = True) -> None:
    """Bring module attributes and the config in line with the pruned shapes.

    Args:
        tracker: The ``WeightTracker``, inside its post-prune hooks.
        strict: Check that ``type(model)(config)`` rebuilds exactly these shapes (raising
            ``PruningError``, which makes the tracker restore the model); without it, sizes
            that differ across layers are left as they were in the config.
    """
    model = tracker.model
    family = family_of(model.config)
    shapes = current_shapes(model)
    geo = geometry(tracker, shapes, family)
    if strict:
        reasons = problems(model, family, geo)
        new = updated_config(model.config, family, geo)
        reasons = reasons or rebuild_differences(model, new, shapes)
        if reasons:
            raise _refusal(model, family, reasons)
    else:
        new = updated_config(model.config, family, geo)
    sync_modules(model, geo, getattr(model.config, "hidden_size", None))
    swap_config(model, new)
