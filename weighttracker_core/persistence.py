"""Load a pruned checkpoint: rebuild the pruned architecture from a fresh dense model.

A pruned model's ``state_dict`` has smaller tensors than the model its code builds, so
``load_state_dict`` refuses it. Save ``tracker.pruning_record()`` next to the checkpoint;
:func:`apply_pruning_record` then builds a tracker on a freshly built dense model, checks
that the model is the one the record was made for, and repeats every physical prune of the
record. The model then has the pruned shapes and the checkpoint loads::

    torch.save(model.state_dict(), "pruned.pt")
    json.dump(tracker.pruning_record(), open("pruned.json", "w"))
    # later, anywhere
    model = build_model()
    tracker = apply_pruning_record(model, example_inputs, json.load(open("pruned.json")))
    model.load_state_dict(torch.load("pruned.pt"))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .errors import ConfigError, PruningError
from .records import check_record, fingerprint_difference, simulate
from .surgery import ModelSnapshot
from .tracker import WeightTracker

#: Options of the record used when the caller does not pass them.
_DEFAULTED = ("prune_num_heads", "prune_head_dims")


def _defaults(model: nn.Module, record: Mapping[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    saved = record.get("options", {})
    out = dict(options)
    for key in _DEFAULTED:
        if key not in out and isinstance(saved.get(key), bool):
            out[key] = saved[key]
    names = saved.get("ignored_layers")
    if "ignored_layers" not in out and names:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ConfigError(
                f"The record was made with ignored_layers={names}, but this model has no "
                f"module {missing[0]!r}. Pass ignored_layers=[...] with this model's modules."
            )
        out["ignored_layers"] = [modules[n] for n in names]
    heads = saved.get("num_heads")
    if "num_heads" not in out and isinstance(heads, Mapping) and heads:
        modules = dict(model.named_modules())
        if all(n in modules for n in heads):
            out["num_heads"] = {modules[n]: h for n, h in heads.items()}
    return out


def _mismatch(record: Mapping[str, Any], difference: str, current: Mapping[str, Any]) -> ConfigError:
    """The refusal, with advice: the options that differ from the record's, if any."""
    saved = record.get("options", {})
    changed = [f"{key}={saved[key]!r}" for key in ("prune_num_heads", "prune_head_dims",
                                                   "ignored_layers", "num_heads")
               if key in saved and key in current and saved[key] != current[key]]
    if changed:
        advice = (f"The record was made with {', '.join(changed)} (modules by name); pass the "
                  "same to apply_pruning_record(model, example_inputs, record, ...).")
    else:
        advice = ("Build the dense model exactly as for the pruned checkpoint (same class, "
                  "sizes and number of classes) and with the same tracker options.")
    return ConfigError(
        f"This pruning record does not match the model: {difference}. {advice} Nothing was "
        "pruned."
    )


def apply_pruning_record(
    model: nn.Module, example_inputs: Any, record: Mapping[str, Any], **tracker_options: Any
) -> WeightTracker:
    """Prune a freshly built dense ``model`` exactly as ``record`` says; return its tracker.

    Args:
        model: The dense model, built by the same code as the model the record came from.
            Its weights do not matter (they are replaced by ``load_state_dict`` next).
        example_inputs: Inputs to trace the model with, as for ``WeightTracker``.
        record: ``tracker.pruning_record()`` of the pruned model (or its JSON, loaded).
        **tracker_options: ``WeightTracker`` options. ``prune_num_heads``,
            ``prune_head_dims``, ``ignored_layers`` and ``num_heads`` default to those of
            the record (modules by name). Hooks are code and cannot be saved: pass the
            ``post_prune_hooks`` the pruned model needed.

    Returns:
        A ``WeightTracker`` on the pruned ``model``; its ``pruning_record()`` equals
        ``record`` (plus any prune made later).

    Raises:
        ConfigError: The record is damaged, or it does not match the model; the message
            names the first difference. The model is unchanged.
        PruningError: A prune of the record failed; the model is restored unchanged.
    """
    check_record(record)
    counts = simulate(record)
    options = _defaults(model, record, tracker_options)
    tracker = WeightTracker(model, example_inputs, **options)
    fresh = tracker.pruning_record()
    difference = fingerprint_difference(record["fingerprint"], fresh["fingerprint"])
    if difference is not None:
        raise _mismatch(record, difference, fresh["options"])
    if not record["prunes"]:
        return tracker
    snapshot = ModelSnapshot(model)
    try:
        _replay(tracker, record, counts)
    except BaseException:
        snapshot.restore()
        raise
    return tracker


def _replay(tracker: WeightTracker, record: Mapping[str, Any], counts: list[dict[str, int]]) -> None:
    for step, (prune, expected) in enumerate(zip(record["prunes"], counts), 1):
        ids = {group.name: group.id for group in tracker.groups}
        request = {ids[name]: list(units) for name, units in prune["units"].items()}
        report = tracker.prune_units(request)
        now = {group.name: group.n_units for group in tracker.groups}
        wrong = [name for name, n in expected.items() if now.get(name) != n]
        wanted = prune.get("params_after")
        if wrong or (isinstance(wanted, int) and report.params_after != wanted):
            what = (f"group {wrong[0]!r} has {now.get(wrong[0])} units, the record expects "
                    f"{expected[wrong[0]]}" if wrong else
                    f"the model has {report.params_after} parameters, the record expects {wanted}")
            raise PruningError(
                f"Replaying prune {step} of the record did not give the recorded model: {what}. "
                "The model was restored unchanged. Was the record made with another version of "
                "weighttracker or torch-pruning?"
            )
