"""Pruning records: what the physical prunes removed, and what the dense model looked like.

A :class:`PruningHistory` is created with every ``WeightTracker``. It takes a *fingerprint*
of the structure the tracker first saw (the model's class, every parameter's name and
shape, every group's name, kind, unit count and members) and then collects the units of
every successful physical prune, in order. ``tracker.pruning_record()`` returns both as
plain JSON-able data; ``weighttracker_core.apply_pruning_record`` replays it on a freshly
built dense model (see ``persistence.py``).

Group names (``"<root module>:<pruning fn>"``) stay the same across prunes while group ids
may not, so a record names groups; unit ids are local to their group, numbered as they
were when that prune ran.

No model is changed here.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .errors import ConfigError
from .heads import HEAD_FN
from .names import owner_of
from .structure import Structure
from .surgery import PruneReport

#: ``record["format"]`` of every pruning record.
RECORD_FORMAT = "weighttracker.pruning_record"
#: Version of the record layout this library writes and reads.
RECORD_VERSION = 1


def _tensor_shape(model: nn.Module, name: str) -> list[int] | None:
    """Shape of the tensor ``model.<name>`` (a parameter, or a masked effective weight)."""
    try:
        owner, attr = owner_of(model, name)
    except AttributeError:
        return None
    value = getattr(owner, attr, None)
    shape = getattr(value, "shape", None)
    return None if shape is None else [int(s) for s in shape]


def structure_fingerprint(structure: Structure) -> dict[str, Any]:
    """Plain data describing the model and its groups, for telling two models apart.

    Two models built by the same code with the same tracker options give equal
    fingerprints; anything that would make a record replay differently (another class,
    another width, another set of groups) changes it.
    """
    model = structure.model
    cls = type(model)
    groups = []
    for group in structure.groups:
        members = []
        for member in group.members:
            members.append({
                "module": member.module_name,
                "type": member.type_name,
                "axis": str(member.axis),
                "params": {name: _tensor_shape(model, name) for name in member.param_names()},
            })
        groups.append({"name": group.name, "kind": str(group.kind), "n_units": group.n_units,
                       "members": members})
    return {
        "model": f"{cls.__module__}.{cls.__qualname__}",
        "parameters": [[name, [int(s) for s in p.shape]] for name, p in model.named_parameters()],
        "groups": groups,
    }


def fingerprint_digest(fingerprint: Mapping[str, Any]) -> str:
    """SHA-256 of the fingerprint's canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _options(structure: Structure) -> dict[str, Any]:
    """The structure options that can be written as plain data (for defaults and hints)."""
    opts = structure.options
    names = {id(m): n for n, m in structure.model.named_modules()}
    return {
        "prune_num_heads": bool(opts.prune_num_heads),
        "prune_head_dims": bool(opts.prune_head_dims),
        "ignored_layers": [names[id(m)] for m in opts.ignored_layers if id(m) in names],
        "num_heads": {names[id(m)]: int(h) for m, h in opts.num_heads.items() if id(m) in names},
    }


def _version() -> str | None:
    try:
        return importlib.metadata.version("weighttracker")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return None


class PruningHistory:
    """The dense structure's fingerprint and every physical prune since (in order)."""

    def __init__(self, structure: Structure) -> None:
        self.fingerprint = structure_fingerprint(structure)
        self.options = _options(structure)
        self.prunes: list[dict[str, Any]] = []

    def add(self, report: PruneReport) -> None:
        """Remember a finished prune (dry runs and empty prunes are not prunes)."""
        if report.dry_run or not report.num_units:
            return
        self.prunes.append({
            "units": {name: [int(u) for u in units] for name, units in report.units.items()},
            "params_before": int(report.params_before),
            "params_after": int(report.params_after),
        })

    def record(self) -> dict[str, Any]:
        """A JSON-able copy: ``json.dumps(record)`` works and ``json.loads`` gives it back."""
        return json.loads(json.dumps({
            "format": RECORD_FORMAT,
            "version": RECORD_VERSION,
            "weighttracker_version": _version(),
            "options": self.options,
            "fingerprint": self.fingerprint,
            "fingerprint_sha256": fingerprint_digest(self.fingerprint),
            "prunes": self.prunes,
        }))


# ------------------------------------------------------------------------------- checks


def check_record(record: Any) -> None:
    """Refuse anything that is not a pruning record this library can read.

    Raises:
        ConfigError: Naming the first key or value that is wrong.
    """
    if not isinstance(record, Mapping):
        raise ConfigError(
            f"A pruning record is a dict (from tracker.pruning_record(), or json.load of a "
            f"saved one); got {type(record).__name__}."
        )
    if record.get("format") != RECORD_FORMAT:
        raise ConfigError(
            f"This is not a pruning record: record['format'] is {record.get('format')!r}, "
            f"expected {RECORD_FORMAT!r}. Save tracker.pruning_record() itself."
        )
    if record.get("version") != RECORD_VERSION:
        raise ConfigError(
            f"Pruning record version {record.get('version')!r} cannot be read by this "
            f"weighttracker (it reads version {RECORD_VERSION}); the record was written by "
            f"weighttracker {record.get('weighttracker_version')!r}. Install that version."
        )
    for key, kind in (("fingerprint", Mapping), ("prunes", list), ("options", Mapping)):
        if not isinstance(record.get(key), kind):
            raise ConfigError(
                f"record[{key!r}] must be a {kind.__name__}, got "
                f"{type(record.get(key)).__name__}; the record is damaged."
            )
    for step, prune in enumerate(record["prunes"], 1):
        units = prune.get("units") if isinstance(prune, Mapping) else None
        if not isinstance(units, Mapping) or not all(
            isinstance(name, str) and isinstance(ids, list)
            and all(isinstance(u, int) and not isinstance(u, bool) for u in ids)
            for name, ids in units.items()
        ):
            raise ConfigError(
                f"Prune {step} of the record is damaged: it must be {{'units': {{group name: "
                f"[unit ids]}}}}, got {prune!r:.200}."
            )


def _shape_text(shape: Any) -> str:
    return "missing" if shape is None else "x".join(map(str, shape)) or "scalar"


def fingerprint_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """The first difference between two fingerprints, in words; ``None`` when equal."""
    if saved.get("model") != current.get("model"):
        return f"the record is for a {saved.get('model')}, this model is a {current.get('model')}"
    mine = dict((n, s) for n, s in current.get("parameters", []))
    theirs = dict((n, s) for n, s in saved.get("parameters", []))
    for name, shape in saved.get("parameters", []):
        if name not in mine:
            return f"parameter {name!r} (shape {_shape_text(shape)}) is not in this model"
        if list(mine[name]) != list(shape):
            return (f"parameter {name!r} has shape {_shape_text(mine[name])} here, "
                    f"{_shape_text(shape)} in the record")
    for name, shape in current.get("parameters", []):
        if name not in theirs:
            return f"this model has parameter {name!r} (shape {_shape_text(shape)}), the record does not"
    return _group_difference(saved.get("groups", []), current.get("groups", []))


def _group_difference(saved: Sequence[Mapping[str, Any]], current: Sequence[Mapping[str, Any]]) -> str | None:
    for index, (old, new) in enumerate(zip(saved, current)):
        where = f"group {index}"
        if old.get("name") != new.get("name"):
            return f"{where} is {new.get('name')!r} here, {old.get('name')!r} in the record"
        where = f"group {index} ({new['name']})"
        for key in ("kind", "n_units"):
            if old.get(key) != new.get(key):
                return f"{where} has {key} {new.get(key)!r} here, {old.get(key)!r} in the record"
        old_members, new_members = old.get("members", []), new.get("members", [])
        for a, b in zip(old_members, new_members):
            for key in ("module", "type", "axis"):
                if a.get(key) != b.get(key):
                    return (f"{where}: a member has {key} {b.get(key)!r} here, "
                            f"{a.get(key)!r} in the record")
            if a.get("params") != b.get("params"):
                return (f"{where}: member {b.get('module')!r} owns {b.get('params')} here, "
                        f"{a.get('params')} in the record")
        if len(old_members) != len(new_members):
            return (f"{where} has {len(new_members)} members here, {len(old_members)} in "
                    "the record")
    if len(saved) != len(current):
        extra = current[len(saved)]["name"] if len(current) > len(saved) else saved[len(current)]["name"]
        return (f"this model has {len(current)} groups, the record {len(saved)} (first one "
                f"not in both: {extra!r})")
    return None


def simulate(record: Mapping[str, Any]) -> list[dict[str, int]]:
    """Unit counts of every group after each prune of ``record``, checking every id.

    Returns one ``{group name: units}`` dict per prune. Nothing is pruned. Removing kv
    heads also removes the query heads that read them, which the record alone cannot count
    (it depends on how the attention shares kv heads): from then on the query-head group of
    that attention is left out of the dicts (its count kept as an upper bound for the id
    checks), and the parameter counts of the record check the replay instead.

    Raises:
        ConfigError: A prune names a group the dense model does not have, a unit id out
            of range or twice, or every unit of a group.
    """
    counts = {g["name"]: int(g["n_units"]) for g in record["fingerprint"].get("groups", [])}
    uncertain: set[str] = set()
    after = []
    for step, prune in enumerate(record["prunes"], 1):
        for name, units in prune["units"].items():
            if name not in counts:
                raise ConfigError(
                    f"Prune {step} of the record removes units of group {name!r}, which the "
                    "model does not have; the record is damaged."
                )
            bad = [u for u in units if not 0 <= u < counts[name]]
            if bad or len(set(units)) != len(units) or len(units) >= counts[name]:
                raise ConfigError(
                    f"Prune {step} of the record removes units {units[:8]} of group {name!r}, "
                    f"which has {counts[name]} units then (ids 0..{counts[name] - 1}, at least "
                    "one must stay, none twice); the record is damaged."
                )
        for name, units in prune["units"].items():
            counts[name] -= len(units)
            root, _, fn = name.rpartition(":")
            if fn == HEAD_FN["kv_head"] and units:
                uncertain.add(f"{root}:{HEAD_FN['head']}")
        after.append({n: c for n, c in counts.items() if n not in uncertain})
    return after
