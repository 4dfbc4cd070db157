"""The v1 HTTP contract as pydantic models (``docs/architecture.md`` section 8).

Shared by the engine (which returns the response models), the routes and the Python client. Bodies
are validated here at the edge: shapes that do not depend on a model, finiteness of every number,
names. Checks that need the model (input_dim, labels in the likelihood's support) happen in the
engine, before anything is changed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, Field, StrictFloat, field_validator, model_validator

from service.components import ALGORITHMS, LIKELIHOODS, NETWORKS, TypedSpec
from service.components.algorithms import DiagonalSpec, EKFSpec, KalmanSpec, LoFiSpec
from service.components.likelihoods import BernoulliSpec, CategoricalSpec, GaussianSpec, PoissonSpec
from service.components.networks import LinearSpec, MLPSpec
from service.validation import Integer, Strict, all_finite, finite, finite_field

__all__ = [
    "BernoulliSpec",
    "CalibrationPoint",
    "CalibrationResponse",
    "CalibrationSummary",
    "CategoricalSpec",
    "DecideBatchRequest",
    "DecideBatchResponse",
    "DecideRequest",
    "DecideResponse",
    "DiagonalSpec",
    "DynamicsSpec",
    "EKFSpec",
    "ErrorDetail",
    "ErrorResponse",
    "EventsSpec",
    "FilterSpec",
    "GaussianSpec",
    "Health",
    "InfluenceResponse",
    "InfluentialRow",
    "KalmanSpec",
    "LikelihoodSpec",
    "LinearSpec",
    "LoFiSpec",
    "MLPSpec",
    "ModelInfo",
    "ModelList",
    "ModelSpec",
    "NetworkSpec",
    "PoissonSpec",
    "PredictRequest",
    "PredictResponse",
    "PriorSpec",
    "Readiness",
    "ReliabilityBin",
    "RewardBatchRequest",
    "RewardBatchResponse",
    "RewardRequest",
    "RewardResponse",
    "RowInfluence",
    "RowPrediction",
    "SnapshotResponse",
    "UpdateRequest",
    "UpdateResponse",
]

NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"
ModelName = Annotated[str, Field(pattern=NAME_PATTERN)]

# The discriminated unions of the extension points, from their registries (in registration
# order); to mypy each is the kinds' common base.
if TYPE_CHECKING:
    NetworkSpec = TypedSpec
    LikelihoodSpec = TypedSpec
    FilterSpec = TypedSpec
else:
    NetworkSpec = NETWORKS.spec_union()
    LikelihoodSpec = LIKELIHOODS.spec_union()
    FilterSpec = ALGORITHMS.spec_union()


class PriorSpec(Strict):
    """theta_0 ~ N(mean, diag(sigma_0^2)): ``variance`` for every parameter but the output
    layer's bias, which has ``bias_variance``; when that is absent, the likelihood's default:
    16 times ``variance`` for poisson (a log-rate's level spans orders of magnitude), else
    ``variance`` (``docs/algorithms.md`` 1.4)."""

    variance: float = Field(1.0, gt=0)
    mean: list[float] | None = None
    bias_variance: float | None = Field(None, gt=0)

    @field_validator("variance")
    @classmethod
    def _finite_variance(cls, v: float) -> float:
        return finite(v, "prior.variance")

    @field_validator("bias_variance")
    @classmethod
    def _finite_bias_variance(cls, v: float | None) -> float | None:
        return None if v is None else finite(v, "prior.bias_variance")

    @field_validator("mean")
    @classmethod
    def _finite_mean(cls, v: list[float] | None) -> list[float] | None:
        all_finite(v, "prior.mean")
        return v


class DynamicsSpec(Strict):
    process_noise: float = Field(0.0, ge=0)
    decay: float = Field(1.0, gt=0, le=1)
    steady_state: bool = False

    @field_validator("process_noise")
    @classmethod
    def _finite_q(cls, v: float) -> float:
        return finite(v, "dynamics.process_noise")


class EventsSpec(Strict):
    """How long ``/decide`` events wait for their reward, and what an unrewarded one gets."""

    ttl_s: float = Field(3600.0, gt=0, le=30 * 86400)
    default_reward: float | None = None

    @field_validator("default_reward")
    @classmethod
    def _finite_default(cls, v: float | None) -> float | None:
        return None if v is None else finite(v, "events.default_reward")


class ModelSpec(Strict):
    """The body of ``POST /v1/models``. ``thompson``: what a Thompson decision draws,
    ``linearized`` (the default: the network's outputs from the linearised predictive
    N(g(m, x), J Sigma J^T)) or ``parameters`` (theta from the posterior, through the network);
    the same law for a network linear in its parameters (``docs/algorithms.md`` 4.4)."""

    name: ModelName
    network: NetworkSpec
    likelihood: LikelihoodSpec
    filter: FilterSpec = Field(default_factory=lambda: LoFiSpec(type="lofi"))
    prior: PriorSpec = Field(default_factory=PriorSpec)
    dynamics: DynamicsSpec = Field(default_factory=DynamicsSpec)
    seed: Integer = Field(0, ge=0, le=2**63 - 1)
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "auto"
    monitor: bool = False
    events: EventsSpec = Field(default_factory=EventsSpec)
    thompson: Literal["linearized", "parameters"] = "linearized"


Number = StrictFloat  # JSON numbers only: no booleans, no numeric strings


class UpdateRequest(Strict):
    """The body of ``POST /v1/models/{name}/update``. ``outputs`` (one output index per row):
    row i's ``y`` is one number that observes output ``outputs[i]`` alone, the model's other
    outputs unobserved (``docs/algorithms.md`` 3.8); its prediction in the answer is of that
    output."""

    x: list[list[Number]] | None = Field(
        None, min_length=1, description="the input rows; absent for a state_space model"
    )
    y: list[Number | list[Number]] = Field(min_length=1)
    dt: list[Number] | None = Field(
        None,
        min_length=1,
        description="a state_space model's time step before each row (default 1 each)",
    )
    request_id: str | None = Field(None, min_length=1, max_length=200)
    outputs: list[Annotated[Integer, Field(ge=0)]] | None = Field(None, min_length=1)

    _check_finite = field_validator("x", "y", "dt")(finite_field)


class PredictRequest(Strict):
    """The body of ``POST /v1/models/{name}/predict``. ``variance=False`` asks for the mean alone:
    the three variance lists of the answer are then empty, and for a gaussian likelihood the mean
    costs one forward pass (``docs/algorithms.md`` 4.1.3)."""

    x: list[list[Number]] | None = Field(
        None, min_length=1, description="the input rows; absent for a state_space model"
    )
    dt: list[Number] | None = Field(
        None,
        min_length=1,
        description="a state_space model: one predicted observation per entry, that long "
        "after its latest update (default [1])",
    )
    steps_ahead: Integer | None = Field(
        None,
        ge=0,
        description="a state_space model: the prediction this many time steps after its latest "
        "update (the same as dt: [steps_ahead])",
    )
    num_samples: Integer = Field(0, ge=0)
    seed: Integer | None = Field(None, ge=0, le=2**63 - 1)
    variance: bool = True

    _check_finite = field_validator("x", "dt")(finite_field)


EVENT_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"


class DecideRequest(Strict):
    """The body of ``POST /v1/models/{name}/decide``: one row per candidate action (each row
    ``context + action``, for a model with one output, the expected reward), or the ``context``
    alone for a model whose outputs are the arms (one expected reward per output; the reward
    of the chosen arm then observes that output alone)."""

    actions: list[list[Number]] | None = Field(None, min_length=1)
    context: list[Number] | None = None
    strategy: Literal["thompson", "ucb", "greedy", "epsilon"] = "thompson"
    epsilon: float = Field(0.1, ge=0, le=1)
    event_id: str | None = Field(None, pattern=EVENT_ID_PATTERN)
    seed: Integer | None = Field(None, ge=0, le=2**63 - 1)

    _check_finite = field_validator("actions", "context")(finite_field)

    @model_validator(mode="after")
    def _candidates(self) -> DecideRequest:
        if self.actions is None and self.context is None:
            raise ValueError(
                "decide needs actions (one row per candidate action) or, for a model whose "
                "outputs are the arms, a context alone"
            )
        return self


class DecideResponse(BaseModel):
    event_id: str
    action: int
    scores: list[float]
    propensity: float
    propensities: list[float]
    propensity_samples: int | None
    version: int


class RewardRequest(Strict):
    event_id: str = Field(pattern=EVENT_ID_PATTERN)
    reward: Number

    @field_validator("reward")
    @classmethod
    def _finite_reward(cls, v: float) -> float:
        return finite(v, "reward")


class RewardResponse(BaseModel):
    event_id: str
    applied: bool
    duplicate: bool
    version: int


class DecideBatchRequest(Strict):
    """The body of ``POST /v1/models/{name}/decide/batch``: each item a ``/decide`` body, decided
    independently against the same published state, each with its own event. The items'
    actions together count against ``POSTSERVE_MAX_ROWS``."""

    items: list[DecideRequest] = Field(min_length=1)


class DecideBatchResponse(BaseModel):
    items: list[DecideResponse]


class RewardBatchRequest(Strict):
    """The body of ``POST /v1/models/{name}/reward/batch``: rewards applied in order as one
    update, each event at most once; all or nothing (one unknown or expired event, or one bad
    reward, refuses the whole batch). The items count against ``POSTSERVE_MAX_ROWS``."""

    items: list[RewardRequest] = Field(min_length=1)


class RewardBatchResponse(BaseModel):
    items: list[RewardResponse]


class RowInfluence(BaseModel):
    """How much a row moved the model (``docs/algorithms.md`` 4.5): ``size``, the Mahalanobis
    size of the mean step under the updated precision; ``loo_shift``, per output, the row's
    prediction after its update minus its leave-one-out prediction."""

    size: float
    loo_shift: list[float]


class RowPrediction(BaseModel):
    """One row of an ``/update`` answer: its pre-update predictive, and how much it moved the
    model (absent in answers stored by earlier versions)."""

    mean: list[float]
    variance: list[float]
    influence: RowInfluence | None = None


class UpdateResponse(BaseModel):
    version: int
    applied: int
    duplicate: bool = False
    predictions: list[RowPrediction]
    log_likelihood: list[float]


class PredictResponse(BaseModel):
    version: int
    mean: list[list[float]]
    variance: list[list[float]]
    epistemic_variance: list[list[float]]
    aleatoric_variance: list[list[float]]
    samples: list[list[list[float]]] = Field(default_factory=list)
    state_mean: list[list[float]] = Field(
        default_factory=list,
        description="a state_space model: the latent state's mean at each dt (else empty)",
    )
    state_covariance: list[list[list[float]]] = Field(
        default_factory=list,
        description="a state_space model: the latent state's covariance at each dt (else empty)",
    )
    point_estimate: bool = Field(
        False,
        description="the model's filter keeps a point estimate (sgd, replay_sgd), not a "
        "posterior: its epistemic variance is 0, the variance is the noise alone, and its "
        "samples (and Thompson draws) are the mean",
    )


class CalibrationSummary(BaseModel):
    """Scalar calibration figures over the current window (``service.calibration``); null where
    the window holds nothing they apply to."""

    observations: int = 0
    nll: float | None = None
    coverage: dict[str, float] | None = None
    residual_mean: float | None = None
    residual_variance: float | None = None
    brier: float | None = None
    log_loss: float | None = None
    ece: float | None = None


class ReliabilityBin(BaseModel):
    lower: float
    upper: float
    count: int
    confidence: float | None
    accuracy: float | None


class CalibrationPoint(BaseModel):
    """One closed bucket of the window: the figures of its observations alone."""

    version: int
    summary: CalibrationSummary


class InfluentialRow(BaseModel):
    version: int  # the model's version after the row
    request_id: str | None  # the request it came in (a reward's: ``event:<event_id>``)
    row: int  # its index in that request
    influence: RowInfluence  # weighed by the model's belief now (see ``weighed_by``)
    at_update: RowInfluence  # what ``/update`` answered for it


class InfluenceResponse(BaseModel):
    """``GET /v1/models/{name}/influence``: the most influential of the recent rows."""

    name: str
    version: int  # the belief that weighed them
    window: int  # the recent rows looked at (at most; ``POSTSERVE_INFLUENCE_WINDOW``)
    weighed_by: Literal["current", "at_update"]  # at_update: dynamics or a point estimate
    items: list[InfluentialRow]  # largest ``influence.size`` first


class CalibrationResponse(BaseModel):
    """``GET /v1/models/{name}/calibration``."""

    name: str
    likelihood: str
    version: int
    window: int
    levels: list[float]
    summary: CalibrationSummary
    pit_histogram: list[float] | None
    reliability: list[ReliabilityBin] | None
    history: list[CalibrationPoint]


class ModelInfo(BaseModel):
    name: str
    spec: ModelSpec
    version: int
    num_params: int
    state_bytes: int
    snapshot_version: int
    device: str
    step: Literal["eager", "compiled"] = Field(
        "eager",
        description="how updates step it: the eager step, or its compiled kernel "
        "(POSTSERVE_COMPILE_STEPS), built in the background after create or restore",
    )
    step_error: str | None = Field(None, description="why it has no compiled step, if one failed")
    output_step: Literal["eager", "compiled"] = Field(
        "eager",
        description="how rows that observe one output alone (`outputs`, rewards of arms that "
        "are outputs) step: eagerly, or by the compiled steps of each output, built in the "
        "background once the first such row arrives (POSTSERVE_COMPILE_STEPS)",
    )
    decide_step: Literal["eager", "compiled"] = Field(
        "eager",
        description="how a Thompson decision among one row's outputs (`/decide` with a context "
        "alone) draws: eagerly, or by its compiled kernel, built in the background at the "
        "first such decision (POSTSERVE_COMPILE_STEPS; models drawn in output space)",
    )
    predict_step: Literal["eager", "compiled"] = Field(
        "eager",
        description="how `/predict` of one row computes its mean and variances: eagerly, or "
        "by its compiled kernel, built in the background at the first such prediction "
        "(POSTSERVE_COMPILE_STEPS; not for state_space models)",
    )
    calibration: CalibrationSummary = Field(default_factory=CalibrationSummary)


class ModelList(BaseModel):
    models: list[ModelInfo]
    next_after: str | None = Field(
        None,
        description="with `limit`: the name to pass as `after` for the next page (null: this "
        "page is the last)",
    )


class SnapshotResponse(BaseModel):
    name: str
    version: int
    bytes: int


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, snake_case: what clients match on")
    message: str = Field(description="for people: what was wrong, naming the field or setting")


class ErrorResponse(BaseModel):
    """Every error answer: ``{"error": {"code", "message"}}`` (the codes by status in
    ``service/api/errors.py``)."""

    error: ErrorDetail


class Health(BaseModel):
    """``GET /healthz``: the process answers."""

    ok: bool


class Readiness(BaseModel):
    """``GET /readyz``: 200 once every model is restored and the store answers, else 503."""

    ready: bool
    models_restored: bool
    store: bool
