"""The calculation DAG.

Calculations are named, declare what they require and how long their value lives:

* ``static`` values are cached on the graph until the structure changes;
* ``per_evaluation`` values are computed at most once per :class:`Evaluation` (one
  ``track()``) and shared by every tracker of that evaluation;
* ``differentiable`` values are computed with autograd, once per evaluation, and never
  kept across evaluations.

Unknown names and cycles raise errors naming the whole chain of calculations.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .context import Bitwidths
from .errors import CalculationCycleError, ConfigError, UnknownNameError
from .registry import Registry
from .specs import CalculationSpec, Lifetime

_ORDER = {Lifetime.STATIC: 0, Lifetime.PER_EVALUATION: 1, Lifetime.DIFFERENTIABLE: 2}


class CalculationGraph:
    """Resolves and caches calculations for one structure.

    Args:
        registry: The calculation registry.
        structure: Passed to every calculation as ``evaluation.structure``.
        bitwidths: Passed to every calculation as ``evaluation.bitwidths`` (default: no
            bit-width functions, every layer 32 bits).
    """

    def __init__(
        self, registry: Registry[CalculationSpec], structure: Any, bitwidths: Bitwidths | None = None
    ) -> None:
        self.registry = registry
        self.structure = structure
        self.bitwidths = Bitwidths() if bitwidths is None else bitwidths
        self._static: dict[str, Any] = {}
        self.compute_counts: Counter[str] = Counter()
        # name -> (spec, static?): registries do not change after they are built
        self._resolved: dict[str, tuple[CalculationSpec, bool]] = {}

    def spec(self, name: str, chain: tuple[str, ...] = ()) -> CalculationSpec:
        if name not in self.registry:
            via = " -> ".join((*chain, name))
            installed = ", ".join(self.registry.names()) or "none"
            where = f" (needed through {via})" if chain else ""
            raise UnknownNameError(
                f"No calculation named {name!r}{where}. Installed calculations: {installed}."
            )
        return self.registry.get(name)

    def validate(self, names: Iterable[str], consumer: str = "") -> list[str]:
        """Check that ``names`` and everything they require exist and form no cycle.

        Returns the calculations in dependency order (requirements first).
        """
        order: list[str] = []
        done: set[str] = set()
        root = (consumer,) if consumer else ()

        def visit(name: str, chain: tuple[str, ...]) -> None:
            if name in done:
                return
            if name in chain:
                cycle = " -> ".join((*chain[chain.index(name) :], name))
                raise CalculationCycleError(f"Calculations depend on each other in a cycle: {cycle}.")
            spec = self.spec(name, root + chain)
            for dep in spec.requires:
                visit(dep, (*chain, name))
                dep_spec = self.registry.get(dep)
                if _ORDER[Lifetime(dep_spec.lifetime)] > _ORDER[Lifetime(spec.lifetime)]:
                    raise ConfigError(
                        f"Calculation {name!r} is {spec.lifetime} but requires {dep!r}, which "
                        f"is {dep_spec.lifetime}; a value cannot outlive what it is made of."
                    )
            done.add(name)
            order.append(name)

        for name in names:
            visit(str(name), ())
        return order

    def evaluation(self, *, differentiable: bool = False) -> Evaluation:
        """A fresh evaluation: per-evaluation values computed in it are shared within it."""
        return Evaluation(self, differentiable=differentiable)

    def invalidate(self) -> None:
        """Forget static values (the structure changed)."""
        self._static.clear()


class Evaluation(Mapping[str, Any]):
    """One evaluation of the DAG; ``evaluation[name]`` computes on first use.

    Calculations receive the evaluation itself: ``evaluation[name]`` reads a requirement,
    ``evaluation.structure`` is the model's structure, ``evaluation.bitwidths`` the user's
    bit-widths, ``evaluation.differentiable`` says whether autograd graphs should be kept.
    ``name in evaluation`` says whether a calculation ``name`` is registered, without
    computing it; iterating lists the values computed so far.
    """

    def __init__(self, graph: CalculationGraph, *, differentiable: bool = False) -> None:
        self.graph = graph
        self.structure = graph.structure
        self.bitwidths = graph.bitwidths
        self.differentiable = differentiable
        self._values: dict[str, Any] = {}
        self._stack: list[str] = []

    def __getitem__(self, name: str) -> Any:
        # computed values first: names are unique across lifetimes
        if name in self._values:
            return self._values[name]
        graph = self.graph
        static = graph._static
        if name in static:
            return static[name]
        resolved = graph._resolved.get(name)
        if resolved is None:
            spec = graph.spec(name, tuple(self._stack))
            resolved = (spec, Lifetime(spec.lifetime) is Lifetime.STATIC)
            graph._resolved[name] = resolved
        spec = resolved[0]
        cache = static if resolved[1] else self._values
        if name in self._stack:
            cycle = " -> ".join((*self._stack[self._stack.index(name) :], name))
            raise CalculationCycleError(f"Calculations depend on each other in a cycle: {cycle}.")
        self._stack.append(name)
        try:
            value = spec.compute(self)
        finally:
            self._stack.pop()
        graph.compute_counts[name] += 1
        cache[name] = value
        return value

    def __contains__(self, name: object) -> bool:
        # Mapping's default would compute the value (and raise for a bad one) to answer
        return isinstance(name, str) and name in self.graph.registry

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)
