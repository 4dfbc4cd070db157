"""``/predict``: the one-step-ahead predictive of the published state, and Thompson samples.

Reads the published (version, state) pair once, without a lock. Sample k uses one parameter draw
theta_k for all rows (``docs/algorithms.md`` section 4), which is what makes Thompson sampling
across candidate rows correct.
"""

from __future__ import annotations

import secrets

import torch

from service.errors import InvalidInput
from service.filters import Belief
from service.hosting import answers
from service.hosting.compute import Compute
from service.hosting.hosted import HostedModel, Published
from service.hosting.limits import Limits
from service.schemas import PredictRequest, PredictResponse

__all__ = ["Predictions", "predict", "predict_encoded"]


class Predictions:
    def __init__(self, limits: Limits, compute: Compute) -> None:
        self.limits, self.compute = limits, compute

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

    def _admit(self, h: HostedModel, req: PredictRequest) -> int:
        """Check the request against the limits; its work in state bytes x rows."""
        self.limits.rows(req.x, h.filter.network.input_dim, "predict")
        self.limits.samples(req.num_samples)
        self.limits.answer(len(req.x), req.num_samples, h.filter.network.output_dim)
        return h.filter.state_bytes(h.current.state) * len(req.x) * (1 + req.num_samples)


def _moments(h: HostedModel, current: Published[Belief], req: PredictRequest) -> answers.Moments:
    """The answer's numbers: the mean, the variances unless the request asked for the mean
    alone, the draws if it asked for any; refused unless all of them are finite."""
    f = h.filter
    x = h.tensor(req.x)
    ahead = f.predict(current.state)  # the one-step-ahead belief p(theta_{t+1} | D_{1:t})
    pred = f.predictive(ahead, x) if req.variance else None
    mean = pred.mean if pred is not None else f.predictive_mean(ahead, x)
    draws = None
    if req.num_samples:
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        gen = torch.Generator(device=h.device).manual_seed(seed)
        draws = f.sample_outputs(ahead, x, req.num_samples, gen)
    moments = answers.Moments.of(mean, pred, draws)  # one copy to the host, one host sync
    if not moments.finite():
        raise InvalidInput(
            "the prediction for these inputs is not finite (values too large for the "
            f"model's {h.spec.dtype} arithmetic)"
        )
    return moments


def predict(h: HostedModel, current: Published[Belief], req: PredictRequest) -> PredictResponse:
    """The answer to ``req`` under ``current`` (pure but for the random seed it may draw)."""
    point = hasattr(h.filter.algorithm, "learn")
    return answers.prediction(current.version, _moments(h, current, req), point)


def predict_encoded(h: HostedModel, current: Published[Belief], req: PredictRequest) -> bytes:
    """:func:`predict`'s answer as JSON bytes."""
    point = hasattr(h.filter.algorithm, "learn")
    return answers.prediction_json(current.version, _moments(h, current, req), point)
