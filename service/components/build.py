"""From a validated :class:`~service.schemas.ModelSpec` to an :class:`OnlineFilter` through the
registries, and states to and from snapshot bytes (safetensors tensors + JSON metadata; never
pickle, so nothing read back from a store can run code)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from service.components import ALGORITHMS, LIKELIHOODS, NETWORKS
from service.components.likelihoods import GaussianSpec
from service.errors import InvalidSpec
from service.filters import Belief, Dynamics, LoFi, Network, OnlineFilter, Prior
from service.filters.algorithm import state_tensors
from service.schemas import ModelSpec

__all__ = [
    "DTYPES",
    "build_filter",
    "check_spec",
    "decode_state",
    "encode_state",
    "resolve_device",
    "state_bytes_estimate",
    "usable_devices",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_spec(spec: ModelSpec) -> None:
    """What the schema cannot see in a spec; raises InvalidSpec naming the field.

    A name every client can reach (``.`` and ``..`` are normalised away in URLs), and variances the
    model's dtype can carry through its step: each variance v and its precision 1/v must be normal
    numbers of the dtype, v in [tiny, 1 / tiny] (float32: about 1.2e-38 to 8.5e37).
    """
    if spec.name in (".", ".."):
        raise InvalidSpec(
            f"name {spec.name!r} cannot be reached: HTTP clients normalise it out of the URL; "
            "choose another name"
        )
    info = torch.finfo(DTYPES[spec.dtype])
    lo, hi = info.tiny, 1 / info.tiny
    values: list[tuple[str, float]] = [("prior.variance", spec.prior.variance)]
    if spec.prior.bias_variance is not None:
        values.append(("prior.bias_variance", spec.prior.bias_variance))
    if spec.dynamics.process_noise > 0:
        values.append(("dynamics.process_noise", spec.dynamics.process_noise))
    if isinstance(spec.likelihood, GaussianSpec):
        nv = spec.likelihood.noise_variance
        values += [("likelihood.noise_variance", v) for v in (nv if isinstance(nv, list) else [nv])]
    for what, v in values:
        if not lo <= v <= hi:
            raise InvalidSpec(
                f"{what} {v:g} is outside what {spec.dtype} carries through a step (a variance "
                f"and its inverse must lie between {lo:.2g} and {hi:.2g}); use a value in that "
                'range or "dtype": "float64"'
            )


def build_filter(spec: ModelSpec) -> OnlineFilter[Belief]:
    """The filter a spec describes; raises InvalidSpec naming what does not fit."""
    check_spec(spec)
    mean = None if spec.prior.mean is None else torch.tensor(spec.prior.mean, dtype=torch.float64)
    try:
        network = NETWORKS[spec.network.type].build(spec.network)
        likelihood = LIKELIHOODS[spec.likelihood.type].build(spec.likelihood)
        kind = ALGORITHMS[spec.filter.type]
        if kind.reshape is not None:  # a projected filter: the prior mean is its offset
            theta0 = _offset(network, mean, spec.seed)
            network, mean = kind.reshape(spec.filter, network, likelihood, theta0, spec.seed), None
        f = OnlineFilter(
            network=network,
            likelihood=likelihood,
            algorithm=kind.build(spec.filter, network),
            dynamics=Dynamics(
                spec.dynamics.decay, spec.dynamics.process_noise, spec.dynamics.steady_state
            ),
            prior=Prior(
                variance=spec.prior.variance,
                mean=mean,
                seed=spec.seed,
                bias_variance=spec.prior.bias_variance,
            ),
        )
        if isinstance(f.algorithm, LoFi) and f.process_noise == 0.0:  # rows stay orthogonal
            return replace(f, algorithm=replace(f.algorithm, orthogonal=True))
        return f
    except InvalidSpec:
        raise
    except (ValueError, TypeError) as exc:
        raise InvalidSpec(str(exc)) from exc


def _offset(network: Network, mean: torch.Tensor | None, seed: int) -> torch.Tensor:
    """theta_0 of a projected filter: the prior mean, or the network's default from the seed
    (the draw ``OnlineFilter.init`` would make)."""
    if mean is None:
        return network.init_mean(torch.Generator().manual_seed(seed))
    if mean.shape != (network.num_params,):
        raise InvalidSpec(
            f"prior mean must have shape ({network.num_params},) (the flat parameter vector), "
            f"got {tuple(mean.shape)}"
        )
    if not bool(torch.isfinite(mean).all()):
        raise InvalidSpec("prior mean holds NaN or infinite values")
    return mean


def state_bytes_estimate(spec: ModelSpec, network: Network) -> int:
    """Bytes of the state a spec would allocate, computed before allocating it."""
    width = 4 if spec.dtype == "float32" else 8
    return ALGORITHMS[spec.filter.type].numbers(spec.filter, network) * width


def usable_devices() -> list[str]:
    """The device types a model can live on in this process: cpu, and cuda or mps when present."""
    usable = ["cpu"]
    if torch.cuda.is_available():
        usable.append("cuda")
    if torch.backends.mps.is_available():
        usable.append("mps")
    return usable


def resolve_device(requested: str, default: str) -> torch.device:
    """The spec's ``device`` (``auto``: the setting, then cuda when present, else cpu), refused
    with InvalidSpec naming the field unless this process can hold and step a state there."""
    name = default if requested == "auto" else requested
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    usable = usable_devices()
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidSpec(
            f"device {name!r} is not a device; use auto or one of {', '.join(usable)}"
        ) from exc
    if device.type not in usable:
        raise InvalidSpec(
            f"device {name!r} cannot hold a model in this process; use auto or one of "
            f"{', '.join(usable)}"
        )
    index, count = device.index, torch.cuda.device_count()
    if device.type == "cuda" and index is not None and index >= count:
        raise InvalidSpec(f"device {name!r}: this process sees {count} CUDA devices")
    return device


def encode_state(
    state: Belief, version: int, algorithm: str, extra: dict[str, Any] | None = None
) -> tuple[bytes, bytes]:
    """(safetensors bytes, JSON metadata bytes) of a state at ``version``; ``extra`` goes into
    the metadata (the calibration window, so that it outlives a restart)."""
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in state_tensors(state).items()}
    meta = {"version": version, "algorithm": algorithm, "format": 1, **(extra or {})}
    return st_save(tensors), json.dumps(meta).encode()


def decode_state(
    tensors: bytes, algorithm: str, dtype: torch.dtype, device: torch.device
) -> Belief:
    """The state ``encode_state`` wrote, as the registered state class of ``algorithm``."""
    cls: type[Belief] = ALGORITHMS[algorithm].state
    loaded = st_load(tensors)
    return cls(**{k: v.to(dtype=dtype, device=device) for k, v in loaded.items()})
