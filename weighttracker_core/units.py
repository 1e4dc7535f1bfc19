"""The canonical-unit data model.

A *canonical unit* is one prunable structure: a channel coupled across several layers, an
attention head spread over a fused projection, one dimension of every head. Units of one
dependency group share an index range; every weight a unit owns is described by a
:class:`MemberSlice`: a parameter, the axes of (a view of) it that the unit cuts, and which
unit owns each position on those axes.

Everything here is frozen and hashable, built from plain Python values only, so groups can
be compared, cached and serialised without touching the model.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator
from typing import Any

import attrs

from .names import join_name


class NameEnum(str, enum.Enum):
    """A string enum whose ``str()`` is its value: ``str(UnitKind.HEAD) == "head"``.

    Members compare equal to their strings, so plain strings work wherever one is expected.
    """

    def __str__(self) -> str:
        return str(self.value)


class PruneAxis(NameEnum):
    """Which side of a module a group cuts.

    ``FEATURE`` is used for layers whose input and output channel are the same axis
    (normalisation layers, depthwise convolutions, ``nn.MultiheadAttention``'s embedding).
    """

    OUT_CHANNEL = "out_channel"
    IN_CHANNEL = "in_channel"
    FEATURE = "feature"


class UnitKind(NameEnum):
    """What one unit of a group is."""

    CHANNEL = "channel"
    FEATURE = "feature"
    HEAD = "head"
    HEAD_DIM = "head_dim"


class ParamRole(NameEnum):
    """How a parameter slice is accounted: weights, biases (and norm betas), or neither."""

    WEIGHT = "weight"
    BIAS = "bias"


def _dims(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return (value,) if isinstance(value, int) else tuple(value)


@attrs.frozen(kw_only=True)
class ParamSlice:
    """Which parameter a unit rule cuts, and along which dimension(s).

    ``view`` optionally reshapes the parameter first (``-1`` allowed once); a position is
    then the row-major index over ``dim`` of the viewed tensor. Examples:

    * ``ParamSlice(param="weight", dim=0)``: output rows of a ``Linear``.
    * A grouped conv ``weight`` of shape ``[O, I/G, k, k]`` cut on input channels uses
      ``view=(G, O // G, I // G, -1)`` and ``dim=(0, 2)``: input channel ``c`` is the
      position ``g * (I // G) + j``.

    Args:
        param: Dotted parameter path relative to the module (``"weight"``,
            ``"out_proj.bias"``).
        dim: The dimension, or dimensions, of the (viewed) parameter that positions index.
        view: Optional shape the parameter is viewed as before slicing.
        role: ``"weight"`` or ``"bias"``; decides how pruned elements are reported.
    """

    param: str
    dim: tuple[int, ...] = attrs.field(default=(0,), converter=_dims)
    view: tuple[int, ...] | None = attrs.field(
        default=None, converter=lambda v: None if v is None else tuple(int(s) for s in v)
    )
    role: ParamRole = attrs.field(default=ParamRole.WEIGHT, converter=ParamRole)


@attrs.frozen(kw_only=True)
class MemberSlice:
    """One parameter slice a group member owns, with the unit of every position.

    ``positions[i]`` (a position on ``dims`` of the parameter viewed as ``view``) belongs to
    unit ``units[i]`` of the group (``0 <= units[i] < group.n_units``).
    """

    param: str
    dims: tuple[int, ...]
    view: tuple[int, ...] | None
    role: ParamRole
    positions: tuple[int, ...]
    units: tuple[int, ...]

    def viewed_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the parameter has after ``view`` (or ``shape`` unchanged).

        >>> MemberSlice(param="w", dims=(1,), view=(3, 2, -1), role=ParamRole.WEIGHT,
        ...             positions=(), units=()).viewed_shape((6, 4))
        (3, 2, 4)
        """
        if self.view is None:
            return tuple(shape)
        numel = math.prod(shape)
        known = math.prod(s for s in self.view if s != -1)
        return tuple(numel // known if s == -1 else s for s in self.view)

    def axis_length(self, shape: tuple[int, ...]) -> int:
        """Number of positions on the sliced axes for a parameter of ``shape``."""
        viewed = self.viewed_shape(shape)
        return math.prod(viewed[d] for d in self.dims)

    def elements_per_position(self, shape: tuple[int, ...]) -> int:
        """Elements of the parameter that one position covers."""
        return math.prod(shape) // max(self.axis_length(shape), 1)


@attrs.frozen(kw_only=True)
class CanonicalMember:
    """One module of a group, the axis it is coupled on and the slices it owns.

    ``tp_indices`` are the Torch-Pruning indices on this module that removing the units
    ``tp_units`` (same length) deletes; the unit of ``tp_indices[i]`` is ``tp_units[i]``.
    """

    module_name: str
    module_type: type
    axis: PruneAxis
    pruning_fn: str
    slices: tuple[MemberSlice, ...]
    tp_indices: tuple[int, ...]
    tp_units: tuple[int, ...]

    @property
    def type_name(self) -> str:
        return f"{self.module_type.__module__}.{self.module_type.__qualname__}"

    def param_names(self) -> tuple[str, ...]:
        """Full (model-level) names of the parameters this member owns slices of."""
        return tuple(dict.fromkeys(join_name(self.module_name, s.param) for s in self.slices))

    def indices_of(self, units: set[int] | frozenset[int]) -> list[int]:
        """Torch-Pruning indices on this module that removing ``units`` deletes."""
        return sorted({i for i, u in zip(self.tp_indices, self.tp_units) if u in units})


@attrs.frozen(kw_only=True)
class CanonicalUnitGroup:
    """A dependency group turned into canonical units.

    Args:
        id: Position in ``tracker.groups`` (0..G-1), deterministic for a model and options.
        name: ``"<root module>:<pruning fn>"``, e.g. ``"layer3.0.conv1:prune_out_channels"``.
        kind: What one unit is (``channel``, ``feature``, ``head``, ``head_dim``, ...).
        n_units: Number of units.
        offset: First global unit id; the group owns ``[offset, offset + n_units)``.
        root_module: Module whose ``pruning_fn`` removes the units physically.
        pruning_fn: Torch-Pruning function applied to ``root_module``.
        members: Every coupled module with its axis and parameter slices.
    """

    id: int
    name: str
    kind: str
    n_units: int
    offset: int
    root_module: str
    pruning_fn: str
    members: tuple[CanonicalMember, ...]

    @property
    def unit_ids(self) -> range:
        """Global unit ids of this group."""
        return range(self.offset, self.offset + self.n_units)

    @property
    def root_member(self) -> CanonicalMember:
        """The member that physical pruning starts from."""
        for member in self.members:
            if member.module_name == self.root_module and member.pruning_fn == self.pruning_fn:
                return member
        return self.members[0]

    def module_names(self) -> tuple[str, ...]:
        """Names of the coupled modules, in member order, without repeats."""
        return tuple(dict.fromkeys(m.module_name for m in self.members))

    def iter_slices(self) -> Iterator[tuple[CanonicalMember, MemberSlice]]:
        for member in self.members:
            for piece in member.slices:
                yield member, piece

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly description (positions are summarised, not listed)."""
        return {
            "id": self.id,
            "name": self.name,
            "kind": str(self.kind),
            "n_units": self.n_units,
            "unit_offset": self.offset,
            "root_module": self.root_module,
            "pruning_fn": self.pruning_fn,
            "members": [
                {
                    "module": m.module_name,
                    "type": m.module_type.__name__,
                    "axis": str(m.axis),
                    "pruning_fn": m.pruning_fn,
                    "slices": [
                        {
                            "param": s.param,
                            "dims": list(s.dims),
                            "view": None if s.view is None else list(s.view),
                            "role": str(s.role),
                            "positions": len(s.positions),
                        }
                        for s in m.slices
                    ],
                }
                for m in self.members
            ],
        }
