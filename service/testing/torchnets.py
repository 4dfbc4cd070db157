"""``torch.nn`` twins of Postserve's networks, for tests that check the math against PyTorch's
own layers (imported on its own: :mod:`service.testing` does not import torch up front)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["relu_sequential"]


def relu_sequential(theta: Tensor, sizes: Sequence[int]) -> nn.Sequential:
    """A relu ``nn.Sequential`` of ``nn.Linear`` layers ``sizes[0] -> ... -> sizes[-1]`` in
    theta's dtype, loaded with the flat theta (``nn.Linear`` layout, layer by layer: the layout of
    :class:`~service.filters.MLP`)."""
    layers: list[nn.Module] = []
    for k, (i, o) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(i, o, dtype=theta.dtype))
        if k < len(sizes) - 2:
            layers.append(nn.ReLU())
    seq = nn.Sequential(*layers)
    torch.nn.utils.vector_to_parameters(theta.detach().clone(), seq.parameters())
    return seq
