"""The extension points: one registry each for networks, likelihoods and filter algorithms.

``NETWORKS``, ``LIKELIHOODS`` and ``ALGORITHMS`` map a spec's ``type`` to its kind
(:mod:`service.components.registry`). :mod:`service.components.build` turns a whole model spec
into an :class:`~service.filters.OnlineFilter` and a state into snapshot bytes and back.
"""

from service.components.algorithms import ALGORITHMS
from service.components.likelihoods import LIKELIHOODS
from service.components.networks import NETWORKS
from service.components.projected import LastLayerSpec, PulseSpec, SubspaceSpec
from service.components.registry import (
    AlgorithmKind,
    Label,
    LikelihoodKind,
    NetworkKind,
    Registry,
    TypedSpec,
)

__all__ = [
    "ALGORITHMS",
    "LIKELIHOODS",
    "NETWORKS",
    "AlgorithmKind",
    "Label",
    "LastLayerSpec",
    "LikelihoodKind",
    "NetworkKind",
    "PulseSpec",
    "Registry",
    "SubspaceSpec",
    "TypedSpec",
]
