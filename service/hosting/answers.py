"""From domain results to the response models of the HTTP contract (:mod:`service.schemas`).

The operations compute with filters, states and calibration trackers; this module alone knows
how those become answers.
"""

from __future__ import annotations

import orjson
from torch import Tensor

from service.calibration import LEVELS, Stats
from service.components import LIKELIHOODS
from service.filters import Predictive, StepInfo
from service.hosting.hosted import HostedModel
from service.policy import Decision
from service.schemas import (
    CalibrationPoint,
    CalibrationResponse,
    CalibrationSummary,
    DecideBatchResponse,
    DecideResponse,
    ModelInfo,
    PredictResponse,
    ReliabilityBin,
    RewardBatchResponse,
    RewardResponse,
    RowPrediction,
    UpdateResponse,
)

__all__ = [
    "calibration",
    "decision",
    "decisions",
    "model_info",
    "prediction",
    "prediction_json",
    "reward",
    "rewards",
    "summary",
    "update",
]


def summary(stats: Stats) -> CalibrationSummary:
    return CalibrationSummary(**stats.summary())


def update(version: int, infos: list[StepInfo]) -> UpdateResponse:
    """``/update``: the version after the rows, each row's pre-update predictive and NLPD."""
    return UpdateResponse(
        version=version,
        applied=len(infos),
        predictions=[
            RowPrediction(
                mean=i.predictive.mean[0].tolist(), variance=i.predictive.variance[0].tolist()
            )
            for i in infos
        ],
        log_likelihood=[float(i.log_likelihood) for i in infos],
    )


def prediction(
    version: int, mean: Tensor, pred: Predictive | None, draws: Tensor | None
) -> PredictResponse:
    """``/predict``: the mean, the variances of ``pred`` (empty lists without it: the request
    asked for the mean alone) and the draws (empty without them)."""
    samples: list[list[list[float]]] = [] if draws is None else draws.tolist()
    return PredictResponse(
        version=version,
        mean=mean.tolist(),
        variance=[] if pred is None else pred.variance.tolist(),
        epistemic_variance=[] if pred is None else pred.epistemic.tolist(),
        aleatoric_variance=[] if pred is None else pred.aleatoric.tolist(),
        samples=samples,
    )


#: Numbers per orjson call when encoding a large answer: each call holds the GIL, so the event
#: loop waits at most about one chunk's encoding (~5 ms) for another request's turn.
_CHUNK_NUMBERS = 1 << 18


def _array(t: Tensor) -> bytes:
    """``t`` as a JSON array of float64 numbers (exact for float32 values), encoded in chunks
    along its first axis."""
    rows = max(1, _CHUNK_NUMBERS // max(1, t[0].numel() if t.shape[0] else 1))
    parts = [
        orjson.dumps(t[i : i + rows].double().cpu().numpy(), option=orjson.OPT_SERIALIZE_NUMPY)[
            1:-1
        ]
        for i in range(0, t.shape[0], rows)
    ]
    return b"[" + b",".join(p for p in parts if p) + b"]"


def prediction_json(
    version: int, mean: Tensor, pred: Predictive | None, draws: Tensor | None
) -> bytes:
    """:func:`prediction` encoded as JSON bytes straight from the tensors (no Python lists, no
    pydantic model): the same fields and numbers, for answers too large to build as objects."""
    empty = b"[]"
    fields = [
        (b"mean", _array(mean)),
        (b"variance", empty if pred is None else _array(pred.variance)),
        (b"epistemic_variance", empty if pred is None else _array(pred.epistemic)),
        (b"aleatoric_variance", empty if pred is None else _array(pred.aleatoric)),
        (b"samples", empty if draws is None else _array(draws)),
    ]
    body = b",".join(b'"' + k + b'":' + v for k, v in fields)
    return b'{"version":' + str(version).encode() + b"," + body + b"}"


def decision(event_id: str, choice: Decision, version: int) -> DecideResponse:
    return DecideResponse(
        event_id=event_id,
        action=choice.action,
        scores=choice.scores,
        propensity=choice.propensities[choice.action],
        propensities=choice.propensities,
        propensity_samples=choice.samples,
        version=version,
    )


def decisions(items: list[DecideResponse]) -> DecideBatchResponse:
    return DecideBatchResponse(items=items)


def reward(event_id: str, done: UpdateResponse) -> RewardResponse:
    """``/reward``: the update of the event's row (or its first answer, when a duplicate)."""
    return RewardResponse(
        event_id=event_id,
        applied=not done.duplicate,
        duplicate=done.duplicate,
        version=done.version,
    )


def rewards(event_ids: list[str], done: list[UpdateResponse]) -> RewardBatchResponse:
    """``/reward/batch``: item i's answer as ``reward``'s (version: the model's after its row)."""
    return RewardBatchResponse(items=[reward(e, d) for e, d in zip(event_ids, done, strict=True)])


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
