"""From a validated :class:`~service.schemas.ModelSpec` to an :class:`OnlineFilter`, and states
to and from snapshot bytes (safetensors tensors + JSON metadata; never pickle)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from service.calibration import Observation
from service.errors import InvalidSpec
from service.filters import (
    EKF,
    MLP,
    Bernoulli,
    Categorical,
    Diagonal,
    DiagState,
    Dynamics,
    Gaussian,
    GaussState,
    Kalman,
    Linear,
    LoFi,
    LoFiState,
    OnlineFilter,
    Poisson,
    Prior,
    StepInfo,
)
from service.filters.likelihoods import Likelihood
from service.filters.networks import Network
from service.schemas import ModelSpec

__all__ = [
    "build_filter",
    "decode_state",
    "encode_state",
    "observations",
    "resolve_device",
    "state_bytes_estimate",
]

_STATES: dict[str, type] = {
    "lofi": LoFiState,
    "ekf": GaussState,
    "kalman": GaussState,
    "diagonal": DiagState,
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _network(spec: ModelSpec) -> Network:
    n = spec.network
    if n.type == "linear":
        return Linear(n.input_dim, n.output_dim, n.bias)
    return MLP(n.input_dim, tuple(n.hidden), n.output_dim, n.activation)


def _likelihood(spec: ModelSpec) -> Likelihood:
    lk = spec.likelihood
    if lk.type == "gaussian":
        nv = lk.noise_variance
        return Gaussian(tuple(nv) if isinstance(nv, list) else nv)
    family: type[Bernoulli | Categorical | Poisson] = {
        "bernoulli": Bernoulli,
        "categorical": Categorical,
        "poisson": Poisson,
    }[lk.type]
    return family()


def build_filter(spec: ModelSpec) -> OnlineFilter:
    """The filter a spec describes; raises InvalidSpec naming what does not fit."""
    f = spec.filter
    algorithm: EKF | Diagonal | LoFi
    if f.type == "lofi":
        algorithm = LoFi(rank=f.rank)
    else:
        algorithm = {"ekf": EKF, "diagonal": Diagonal, "kalman": Kalman}[f.type]()
    mean = spec.prior.mean
    try:
        return OnlineFilter(
            network=_network(spec),
            likelihood=_likelihood(spec),
            algorithm=algorithm,
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
    D, width = num_params, 4 if spec.dtype == "float32" else 8
    per = {
        "lofi": (spec.filter.rank + 2) * D if spec.filter.type == "lofi" else 0,
        "ekf": D * D + D,
        "kalman": D * D + D,
        "diagonal": 2 * D,
    }[spec.filter.type]
    return per * width


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


def observations(f: OnlineFilter, infos: list[StepInfo], y: list[Any]) -> list[Observation]:
    """What calibration scores: each row's pre-update prediction against its raw label ``y``."""
    if not infos:
        return []
    lik = f.likelihood
    nll = [-float(i.log_likelihood) for i in infos]
    if isinstance(lik, (Bernoulli, Categorical)):
        return [
            Observation(nll=n, probs=i.predictive.mean[0].tolist(), label=int(label))
            for n, i, label in zip(nll, infos, y, strict=True)
        ]
    if isinstance(lik, Gaussian):  # in plain floats: a handful of torch ops costs more
        out = []
        for n, i, label in zip(nll, infos, y, strict=True):
            mean = i.predictive.mean[0].tolist()
            var = [
                a + b
                for a, b in zip(
                    i.predictive.epistemic[0].tolist(),
                    i.predictive.aleatoric[0].tolist(),
                    strict=True,
                )
            ]
            ys = label if isinstance(label, list) else [label]
            z = [(v - m) / math.sqrt(s2) for v, m, s2 in zip(ys, mean, var, strict=True)]
            pit = [(u, u) for u in (0.5 * math.erfc(-zi / math.sqrt(2.0)) for zi in z)]
            out.append(Observation(nll=n, pit=pit, z=z))
        return out
    eta = torch.cat([i.eta for i in infos if i.eta is not None])
    var_eta = torch.cat([i.var_eta for i in infos if i.var_eta is not None])
    Y = f.encode(torch.tensor(y, dtype=eta.dtype)).to(device=eta.device)
    bounds = lik.pit(Y, eta, var_eta)
    assert bounds is not None
    lo, hi = bounds[0].tolist(), bounds[1].tolist()
    return [
        Observation(nll=n, pit=list(zip(a, b, strict=True)))
        for n, a, b in zip(nll, lo, hi, strict=True)
    ]


def encode_state(
    state: Any, version: int, algorithm: str, extra: dict[str, Any] | None = None
) -> tuple[bytes, bytes]:
    """(safetensors bytes, JSON metadata bytes) of a state at ``version``; ``extra`` goes into
    the metadata (the calibration window, so that it outlives a restart)."""
    tensors = {
        f.name: getattr(state, f.name).detach().to("cpu").contiguous()
        for f in dataclasses.fields(state)
    }
    meta = {"version": version, "algorithm": algorithm, "format": 1, **(extra or {})}
    return st_save(tensors), json.dumps(meta).encode()


def decode_state(tensors: bytes, algorithm: str, dtype: torch.dtype, device: torch.device) -> Any:
    cls = _STATES[algorithm]
    loaded = st_load(tensors)
    return cls(**{k: v.to(dtype=dtype, device=device) for k, v in loaded.items()})
