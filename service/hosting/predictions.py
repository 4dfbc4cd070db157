"""``/predict``: the one-step-ahead predictive of the published state, and Thompson samples.

Reads the published (version, state) pair once, without a lock. Sample k uses one parameter draw
theta_k for all rows (``docs/algorithms.md`` section 4), which is what makes Thompson sampling
across candidate rows correct.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import cast

import torch
from torch import Tensor

from service.errors import InvalidInput
from service.filters import Belief, OnlineFilter, Predictive
from service.filters.ekf import GaussState
from service.filters.gradient import point_estimate
from service.filters.statespace import StateSpace
from service.hosting import answers
from service.hosting.compute import Compute
from service.hosting.hosted import HostedModel, Published
from service.hosting.influential import ranked
from service.hosting.kernels import Kernels
from service.hosting.limits import Limits, input_rows
from service.schemas import InfluenceResponse, PredictRequest, PredictResponse

__all__ = ["Predictions", "predict", "predict_encoded"]


class Predictions:
    def __init__(self, limits: Limits, compute: Compute, kernels: Kernels) -> None:
        self.limits, self.compute, self.kernels = limits, compute, kernels

    async def predict(self, h: HostedModel, req: PredictRequest) -> PredictResponse:
        """The answer as a response model."""
        work = self._admit(h, req)
        current = h.current
        return await self.compute.run(work, predict, h, current, req)

    async def predict_json(self, h: HostedModel, req: PredictRequest) -> bytes:
        """The same answer as JSON bytes, encoded from the tensors in the worker (for the HTTP
        route: a large answer never holds the event loop while it is built)."""
        work = self._admit(h, req)
        current = h.current
        return await self.compute.run(work, predict_encoded, h, current, req)

    async def influence(self, h: HostedModel, top: int) -> InfluenceResponse:
        """``/influence``: the window's kept rows weighed by the published belief (one
        predictive of them), the ``top`` largest first."""
        current = h.current
        work = h.filter.state_bytes(current.state) * len(h.influence.candidates())
        rows = await self.compute.run(work, ranked, h, current, top)
        return answers.influence(h, current.version, rows)

    def _admit(self, h: HostedModel, req: PredictRequest) -> int:
        """Check the request against the limits; its work in state bytes x rows."""
        rows = _rows(h, req)
        self.limits.rows(rows, h.filter.network.input_dim, "predict")
        if len(rows) == 1 and h.predict_kernel is None:
            self.kernels.start_predictive(h)  # built in the background, once
        self.limits.samples(req.num_samples)
        self.limits.answer(len(rows), req.num_samples, h.filter.network.output_dim)
        return h.filter.state_bytes(h.current.state) * len(rows) * (1 + req.num_samples)


def _rows(h: HostedModel, req: PredictRequest) -> list[list[float]]:
    """The request's input rows (a state-space model's: [[dt_i]], ``input_rows``)."""
    dt = req.dt
    if req.steps_ahead is not None:
        if dt is not None:
            raise InvalidInput("give dt or steps_ahead, not both")
        dt = [float(req.steps_ahead)]
    if dt is None and req.x is None and isinstance(h.filter.network, StateSpace):
        dt = [1.0]
    return input_rows(h.filter.network, req.x, dt, len(dt or req.x or ()), now=True)


def _ahead(f: OnlineFilter[Belief], state: Belief, x: Tensor) -> list[tuple[Belief, Tensor]]:
    """The one-step-ahead belief p(theta_{t+1} | D_{1:t}) with the rows it predicts: all of x,
    or for a state-space model each row's own, its dt after the latest update (0: the filtered
    belief p(theta_t | D_{1:t}))."""
    if isinstance(f.network, StateSpace):  # dt 0: the filtered state itself
        dts = x[:, 0].tolist()
        return [
            (f.predict(state, x[i : i + 1]) if dt > 0 else state, x[i : i + 1])
            for i, dt in enumerate(dts)
        ]
    return [(f.predict(state), x)]


def _moments(h: HostedModel, current: Published[Belief], req: PredictRequest) -> answers.Moments:
    """The answer's numbers: the mean, the variances unless the request asked for the mean
    alone, the draws if it asked for any; refused unless all of them are finite."""
    f = h.filter
    rows = _rows(h, req)
    kernel = h.predict_kernel
    if kernel is not None and len(rows) == 1 and req.variance and not req.num_samples:
        moments = answers.Moments.packed(kernel(current.state, h.tensor(rows)))
        if moments.finite():  # else the eager predictive, which says what is wrong
            return moments
    parts = _ahead(f, current.state, h.tensor(rows))
    preds = [f.predictive(ahead, x) for ahead, x in parts] if req.variance else None
    pred = None if preds is None else preds[0] if len(preds) == 1 else _joined(preds)
    means = [f.predictive_mean(ahead, x) for ahead, x in parts] if pred is None else []
    mean = pred.mean if pred is not None else torch.cat(means)
    draws = None
    if req.num_samples:
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        gen = torch.Generator(device=h.device).manual_seed(seed)
        each = [f.sample_outputs(ahead, x, req.num_samples, gen) for ahead, x in parts]
        draws = torch.cat(each, dim=1)  # (S, N, C)
    moments = answers.Moments.of(mean, pred, draws)  # one copy to the host, one host sync
    if isinstance(f.network, StateSpace):  # the latent state at each row's time
        beliefs = [cast(GaussState, ahead) for ahead, _ in parts]
        moments = dataclasses.replace(
            moments,
            state_mean=torch.stack([b.mean for b in beliefs]).double().cpu().numpy(),
            state_cov=torch.stack([b.cov for b in beliefs]).double().cpu().numpy(),
        )
    if not moments.finite():
        raise InvalidInput(
            "the prediction for these inputs is not finite (values too large for the "
            f"model's {h.spec.dtype} arithmetic)"
        )
    return moments


def _joined(preds: list[Predictive]) -> Predictive:
    """The predictives of consecutive rows as one."""
    return Predictive(
        torch.cat([p.mean for p in preds]),
        torch.cat([p.epistemic for p in preds]),
        torch.cat([p.aleatoric for p in preds]),
    )


def predict(h: HostedModel, current: Published[Belief], req: PredictRequest) -> PredictResponse:
    """The answer to ``req`` under ``current`` (pure but for the random seed it may draw)."""
    point = point_estimate(h.filter.algorithm)
    return answers.prediction(current.version, _moments(h, current, req), point)


def predict_encoded(h: HostedModel, current: Published[Belief], req: PredictRequest) -> bytes:
    """:func:`predict`'s answer as JSON bytes."""
    point = point_estimate(h.filter.algorithm)
    return answers.prediction_json(current.version, _moments(h, current, req), point)
