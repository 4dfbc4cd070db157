"""One registry per extension point, keyed by the spec's ``type``.

A *kind* is everything the service needs to know about one network, likelihood or algorithm: its
spec class (a pydantic model whose ``type`` field is a one-value ``Literal``), the function that
builds the math object from a validated spec, and the few facts the hosting layer asks of it
(the state class of an algorithm, its size, a likelihood's calibration extractor). The request
contract (:mod:`service.schemas`) takes its discriminated unions from the registries, so adding a
kind means: its math module, its spec class, one ``register`` call.

>>> from service.components import NETWORKS
>>> NETWORKS.names()
('linear', 'mlp', 'cnn', 'state_space')
>>> NETWORKS["conv"]
Traceback (most recent call last):
...
service.errors.InvalidSpec: unknown network type 'conv'; registered: linear, mlp, cnn, state_space
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, Protocol, TypeVar, Union

from pydantic import Field
from torch import Tensor

from service.calibration import Observation
from service.errors import InvalidSpec
from service.filters import Algorithm, Likelihood, Network, RowReport, StepInfo
from service.filters.algorithm import S
from service.validation import Strict

__all__ = [
    "AlgorithmKind",
    "Label",
    "LikelihoodKind",
    "NetworkKind",
    "Registry",
    "Reshape",
    "Scorer",
    "TypedSpec",
]


class TypedSpec(Strict):
    """The base of every kind's spec: ``type`` names the kind (a ``Literal`` in each subclass)."""

    type: str


SpecT = TypeVar("SpecT", bound=TypedSpec)

#: One raw label of ``/update``'s ``y``: a number, or a list of numbers for several outputs.
Label = float | list[float]
#: Each row's pre-update prediction against its raw label, for the calibration window: from the
#: rows' reports on the device (``StepInfo``) and on the host (``RowReport``, the same numbers).
Scorer = Callable[[Likelihood, list[StepInfo], list[RowReport], Sequence[Label]], list[Observation]]


@dataclass(frozen=True)
class NetworkKind(Generic[SpecT]):
    """A network: its spec, how to build it, and ``example``, the fields of a small valid spec
    besides ``type`` and ``output_dim`` (what the conformance suite builds it with)."""

    spec: type[SpecT]
    build: Callable[[SpecT], Network]
    example: Mapping[str, object]


@dataclass(frozen=True)
class LikelihoodKind(Generic[SpecT]):
    """An observation model: its spec, how to build it, how its rows are scored for calibration
    (``score``), and whether its labels are classes (reliability diagrams apply)."""

    spec: type[SpecT]
    build: Callable[[SpecT], Likelihood]
    score: Scorer
    classes: bool = False


#: A change of parameters (``service.filters.subspace``): from the spec, the network, the
#: likelihood, the offset theta_0 (D,) float64 and the model's seed, the network the filter runs on.
Reshape = Callable[[Any, Network, Likelihood, Tensor, int], Network]


@dataclass(frozen=True)
class AlgorithmKind(Generic[SpecT, S]):
    """An approximation: its spec, how to build it for a network (``build(spec, network)``), the
    class of its state (what snapshots decode into) and ``numbers(spec, network)``, the count of
    numbers its state holds for that network (checked against the size limit before anything
    is allocated).

    ``reshape``, where given, replaces the model's network by the one the algorithm runs on (the
    projected filters: ``build`` and ``numbers`` then see that network); ``example`` holds the fields
    of a small valid spec besides ``type`` (what the conformance suite builds it with)."""

    spec: type[SpecT]
    build: Callable[[SpecT, Network], Algorithm[S]]
    state: type[S]
    numbers: Callable[[SpecT, Network], int]
    reshape: Reshape | None = None
    example: Mapping[str, object] = field(default_factory=dict)


class _Kind(Protocol):
    @property
    def spec(self) -> type[TypedSpec]: ...


K = TypeVar("K", bound=_Kind)


class Registry(Generic[K]):
    """The kinds of one extension point (``point``: "network", "likelihood", "filter")."""

    def __init__(self, point: str) -> None:
        self.point = point
        self._kinds: dict[str, K] = {}

    def register(self, kind: K) -> K:
        """Add ``kind`` under the one value of its spec's ``type`` Literal."""
        annotation = kind.spec.model_fields["type"].annotation
        values = typing.get_args(annotation)
        if typing.get_origin(annotation) is not typing.Literal or len(values) != 1:
            raise TypeError(f"{kind.spec.__name__}.type must be a Literal of one value")
        name = str(values[0])
        if name in self._kinds:
            raise ValueError(f"{self.point} type {name!r} is registered already")
        self._kinds[name] = kind
        return kind

    def __getitem__(self, name: str) -> K:
        kind = self._kinds.get(name)
        if kind is None:
            raise InvalidSpec(
                f"unknown {self.point} type {name!r}; registered: {', '.join(self._kinds)}"
            )
        return kind

    def __iter__(self) -> Iterator[tuple[str, K]]:
        return iter(self._kinds.items())

    def names(self) -> tuple[str, ...]:
        return tuple(self._kinds)

    def spec_union(self) -> Any:
        """The pydantic type of this point's field in a model spec: the registered spec classes
        as a union discriminated by ``type`` (in registration order)."""
        specs = tuple(kind.spec for kind in self._kinds.values())
        if len(specs) == 1:
            return specs[0]
        return Annotated[Union[specs], Field(discriminator="type")]  # noqa: UP007
