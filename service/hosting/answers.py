"""From domain results to the response models of the HTTP contract (:mod:`service.schemas`).

The operations compute with filters, states and calibration trackers; this module alone knows
how those become answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import orjson
import torch
from torch import Tensor

from service.calibration import LEVELS, Observation, Stats
from service.components import LIKELIHOODS
from service.filters import Predictive, RowReport
from service.hosting.hosted import HostedModel
from service.hosting.influential import Ranked, reweighs
from service.influence import Influence
from service.policy import Decision
from service.schemas import (
    CalibrationPoint,
    CalibrationResponse,
    CalibrationSummary,
    InfluenceResponse,
    InfluentialRow,
    ModelInfo,
    PredictResponse,
    ReliabilityBin,
    RewardResponse,
    RowInfluence,
    UpdateResponse,
)

__all__ = [
    "Keyed",
    "Moments",
    "calibration",
    "decision_json",
    "decisions_json",
    "model_info",
    "prediction",
    "prediction_json",
    "reward",
    "rewards_json",
    "summary",
    "update_json",
]


def summary(stats: Stats) -> CalibrationSummary:
    return CalibrationSummary(**stats.summary())


def _influence(o: Observation) -> RowInfluence:
    if o.mark is None:
        raise TypeError("a stepped row has no influence mark")
    return _figures(o.mark.at_update)


def _figures(i: Influence) -> RowInfluence:
    return RowInfluence(size=i.size, loo_shift=i.loo_shift)


@dataclass(frozen=True)
class Moments:
    """A ``/predict`` answer's numbers as float64 host arrays (exact for float32 values):
    ``mean`` (N, C); the variances, empty (0,) for the mean alone; ``samples`` (S, N, C), or
    empty. All views of one array, copied from the device in one go."""

    mean: np.ndarray
    variance: np.ndarray
    epistemic: np.ndarray
    aleatoric: np.ndarray
    samples: np.ndarray
    flat: np.ndarray
    # a state-space model's latent state at each row's time: mean (N, n), covariance (N, n, n)
    state_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    state_cov: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @staticmethod
    def of(mean: Tensor, pred: Predictive | None, draws: Tensor | None) -> Moments:
        parts = [mean] if pred is None else [mean, pred.variance, pred.epistemic, pred.aleatoric]
        parts += [] if draws is None else [draws]
        # the (N, C) fields as they are, the draws (S, N, C) as (S N, C): one concatenation
        rows = torch.cat([t.reshape(-1, t.shape[-1]) if t.ndim != 2 else t for t in parts])
        flat = rows.reshape(-1).double().cpu().numpy()
        views, at = [], 0
        for t in parts:
            views.append(flat[at : at + t.numel()].reshape(t.shape))
            at += t.numel()
        empty = flat[:0]
        m, v, e, a = views[:4] if pred is not None else (views[0], empty, empty, empty)
        return Moments(m, v, e, a, views[-1] if draws is not None else empty, flat)

    @staticmethod
    def packed(flat: Tensor) -> Moments:
        """The moments of one row from a :class:`~service.filters.compiled.PredictKernel`'s
        answer: mean, variance, epistemic and aleatoric (4 C,), float64, in that order."""
        a = flat.cpu().numpy()
        m, v, e, al = (part.reshape(1, -1) for part in np.split(a, 4))
        return Moments(m, v, e, al, a[:0], a)

    def finite(self) -> bool:
        parts = (self.flat, self.state_mean, self.state_cov)
        return all(bool(np.isfinite(p).all()) for p in parts)


def prediction(version: int, m: Moments, point: bool = False) -> PredictResponse:
    """``/predict``: the mean, the variances (empty lists when the request asked for the mean
    alone), the draws (empty without them), and whether the model is a point estimate."""
    return PredictResponse(
        point_estimate=point,
        version=version,
        mean=m.mean.tolist(),
        variance=m.variance.tolist(),
        epistemic_variance=m.epistemic.tolist(),
        aleatoric_variance=m.aleatoric.tolist(),
        samples=m.samples.tolist(),
        state_mean=m.state_mean.tolist(),
        state_covariance=m.state_cov.tolist(),
    )


#: Numbers per orjson call when encoding a large answer: each call holds the GIL, so the event
#: loop waits at most about one chunk's encoding (~5 ms) for another request's turn.
_CHUNK_NUMBERS = 1 << 18


def _array(a: np.ndarray) -> bytes:
    """``a`` as a JSON array, encoded in chunks along its first axis."""
    if a.shape[0] * (a[0].size if a.shape[0] else 1) <= _CHUNK_NUMBERS:
        return orjson.dumps(a, option=orjson.OPT_SERIALIZE_NUMPY)
    rows = max(1, _CHUNK_NUMBERS // max(1, a[0].size))
    parts = [
        orjson.dumps(a[i : i + rows], option=orjson.OPT_SERIALIZE_NUMPY)[1:-1]
        for i in range(0, a.shape[0], rows)
    ]
    return b"[" + b",".join(p for p in parts if p) + b"]"


def prediction_json(version: int, m: Moments, point: bool = False) -> bytes:
    """:func:`prediction` encoded as JSON bytes straight from the arrays (no Python lists, no
    pydantic model): the same fields and numbers, for answers too large to build as objects."""
    fields = [
        (b"mean", m.mean),
        (b"variance", m.variance),
        (b"epistemic_variance", m.epistemic),
        (b"aleatoric_variance", m.aleatoric),
        (b"samples", m.samples),
        (b"state_mean", m.state_mean),
        (b"state_covariance", m.state_cov),
    ]
    body = b",".join(b'"' + k + b'":' + _array(v) for k, v in fields)
    tail = b',"point_estimate":' + (b"true" if point else b"false")
    return b'{"version":' + str(version).encode() + b"," + body + tail + b"}"


def decision_json(event_id: str, choice: Decision, version: int) -> bytes:
    """``/decide``'s answer (a ``DecideResponse``) as JSON, encoded once by orjson: it is
    also the event's record of the answer, sent again to a retried decision as it is."""
    return orjson.dumps(
        {
            "event_id": event_id,
            "action": choice.action,
            "scores": choice.scores,
            "propensity": choice.propensities[choice.action],
            "propensities": choice.propensities,
            "propensity_samples": choice.samples,
            "version": version,
        }
    )


def decisions_json(items: list[bytes]) -> bytes:
    """``/decide/batch``'s answer (a ``DecideBatchResponse``) from its items' JSON."""
    return b'{"items":[' + b",".join(items) + b"]}"


@dataclass(frozen=True)
class Keyed:
    """What a keyed row (``Updates.apply_keyed``) answers: the model's version after it, and
    whether its key had been applied before (its first answer's version, then)."""

    version: int
    duplicate: bool

    @classmethod
    def first(cls, raw: bytes) -> Keyed:
        """The duplicate of the row whose request record (an ``update_json``) is ``raw``."""
        version: int = orjson.loads(raw)["version"]
        return cls(version, True)


def update_json(version: int, rows: list[RowReport], obs: list[Observation]) -> bytes:
    """``/update``'s answer (an ``UpdateResponse``) as JSON, encoded by orjson from the rows'
    floats: the version after the rows, each row's pre-update predictive and NLPD, and how much
    it moved the model (``service.influence``); ``duplicate`` false. The route's answer and a
    request record (a keyed row's, each its own)."""
    predictions = []
    for r, o in zip(rows, obs, strict=True):
        i = _influence(o)
        influence = {"size": i.size, "loo_shift": i.loo_shift}
        predictions.append({"mean": r.mean, "variance": r.variance, "influence": influence})
    return orjson.dumps(
        {
            "version": version,
            "applied": len(rows),
            "duplicate": False,
            "predictions": predictions,
            "log_likelihood": [r.log_likelihood for r in rows],
        }
    )


def reward(event_id: str, done: UpdateResponse) -> RewardResponse:
    """``/reward``: the update of the event's row (or its first answer, when a duplicate)."""
    return RewardResponse(
        event_id=event_id,
        applied=not done.duplicate,
        duplicate=done.duplicate,
        version=done.version,
    )


def rewards_json(event_ids: list[str], done: list[Keyed]) -> bytes:
    """``/reward/batch``'s answer (a ``RewardBatchResponse``) as JSON: item i's answer as
    ``reward``'s (version: the model's after its row), encoded by orjson."""
    items = [
        {"event_id": e, "applied": not d.duplicate, "duplicate": d.duplicate, "version": d.version}
        for e, d in zip(event_ids, done, strict=True)
    ]
    return orjson.dumps({"items": items})


def model_info(h: HostedModel) -> ModelInfo:
    current = h.current
    return ModelInfo(
        name=h.name,
        spec=h.spec,
        version=current.version,
        num_params=h.filter.num_params,
        state_bytes=h.filter.state_bytes(current.state),
        snapshot_version=h.snapshot_version,
        device=str(h.device),
        step="eager" if h.kernel is None else "compiled",
        output_step="eager" if h.output_kernels is None else "compiled",
        decide_step="eager" if h.draw_kernel is None else "compiled",
        predict_step="eager" if h.predict_kernel is None else "compiled",
        step_error=h.kernel_error,
        calibration=summary(h.calibration.stats()),
    )


def calibration(h: HostedModel) -> CalibrationResponse:
    """The model's calibration window: figures, histograms and its recent history."""
    stats = h.calibration.stats()
    classes = LIKELIHOODS[h.spec.likelihood.type].classes
    return CalibrationResponse(
        name=h.name,
        likelihood=h.spec.likelihood.type,
        version=h.version,
        window=h.calibration.window,
        levels=list(LEVELS),
        summary=summary(stats),
        pit_histogram=stats.pit_histogram,
        reliability=[ReliabilityBin(**b) for b in stats.reliability()] if classes else None,
        history=[CalibrationPoint(version=v, summary=summary(s)) for v, s in h.calibration.history],
    )


def influence(h: HostedModel, version: int, rows: Ranked) -> InfluenceResponse:
    """``/influence``: ``rows`` (ranked at ``version``), largest first."""
    return InfluenceResponse(
        name=h.name,
        version=version,
        window=h.influence.window,
        weighed_by="current" if reweighs(h.filter) else "at_update",
        items=[
            InfluentialRow(
                version=r.version,
                request_id=r.request_id,
                row=r.row,
                influence=_figures(now),
                at_update=_figures(r.mark.at_update),
            )
            for r, now in rows
        ],
    )
