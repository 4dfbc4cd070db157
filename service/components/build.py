"""From a validated :class:`~service.schemas.ModelSpec` to an :class:`OnlineFilter` through the
registries, and states to and from snapshot bytes (safetensors tensors + JSON metadata; never
pickle, so nothing read back from a store can run code)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from service.components import ALGORITHMS, LIKELIHOODS, NETWORKS
from service.errors import InvalidSpec
from service.filters import Belief, Dynamics, OnlineFilter, Prior
from service.schemas import ModelSpec

__all__ = [
    "DTYPES",
    "build_filter",
    "decode_state",
    "encode_state",
    "resolve_device",
    "state_bytes_estimate",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_filter(spec: ModelSpec) -> OnlineFilter[Belief]:
    """The filter a spec describes; raises InvalidSpec naming what does not fit."""
    mean = spec.prior.mean
    try:
        return OnlineFilter(
            network=NETWORKS[spec.network.type].build(spec.network),
            likelihood=LIKELIHOODS[spec.likelihood.type].build(spec.likelihood),
            algorithm=ALGORITHMS[spec.filter.type].build(spec.filter),
            dynamics=Dynamics(
                spec.dynamics.decay, spec.dynamics.process_noise, spec.dynamics.steady_state
            ),
            prior=Prior(
                variance=spec.prior.variance,
                mean=None if mean is None else torch.tensor(mean, dtype=torch.float64),
                seed=spec.seed,
            ),
        )
    except InvalidSpec:
        raise
    except (ValueError, TypeError) as exc:
        raise InvalidSpec(str(exc)) from exc


def state_bytes_estimate(spec: ModelSpec, num_params: int) -> int:
    """Bytes of the state a spec would allocate, computed before allocating it."""
    width = 4 if spec.dtype == "float32" else 8
    return ALGORITHMS[spec.filter.type].numbers(spec.filter, num_params) * width


def resolve_device(requested: str, default: str) -> torch.device:
    name = default if requested == "auto" else requested
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidSpec(f"unknown device {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidSpec(f"device {name!r} requested but no CUDA device is available")
    return device


def encode_state(
    state: Belief, version: int, algorithm: str, extra: dict[str, Any] | None = None
) -> tuple[bytes, bytes]:
    """(safetensors bytes, JSON metadata bytes) of a state at ``version``; ``extra`` goes into
    the metadata (the calibration window, so that it outlives a restart)."""
    tensors = {
        f.name: getattr(state, f.name).detach().to("cpu").contiguous()
        for f in dataclasses.fields(state)
    }
    meta = {"version": version, "algorithm": algorithm, "format": 1, **(extra or {})}
    return st_save(tensors), json.dumps(meta).encode()


def decode_state(
    tensors: bytes, algorithm: str, dtype: torch.dtype, device: torch.device
) -> Belief:
    """The state ``encode_state`` wrote, as the registered state class of ``algorithm``."""
    cls: type[Belief] = ALGORITHMS[algorithm].state
    loaded = st_load(tensors)
    return cls(**{k: v.to(dtype=dtype, device=device) for k, v in loaded.items()})
