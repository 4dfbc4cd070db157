"""What the OpenAPI document says of each operation: summary, description, the errors it
answers and example bodies (``describe(name)`` is a route decorator's keyword arguments).

The examples are one session that works as written against a fresh server (the tests post them
in order): create ``ctr-home`` (the README's walkthrough model) and ``demand-daily``, update and
query ``ctr-home``, decide and reward events ``evt-0001`` to ``evt-0003``, delete
``demand-daily``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service.api.openapi import Error, errors
from service.schemas import Readiness

__all__ = [
    "ANSWERS",
    "DELETED",
    "MODEL",
    "OPERATIONS",
    "TAGS",
    "Operation",
    "describe",
    "name_examples",
]

MODEL = "ctr-home"  # the examples' model: MLP 3-16-1, bernoulli, lofi
DELETED = "demand-daily"  # the model the delete example removes: linear on 3, gaussian, kalman
# Every body example below fits both models (3 inputs, one output, labels 0 and 1).

_X = [[1.0, 0.0, 0.5], [0.0, 1.0, -0.5], [1.0, 1.0, 0.0]]
_ACTIONS = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]  # after a context of one feature: 3 inputs
_BODY_ERRORS: tuple[Error, ...] = (
    "not_found",
    "too_large",
    "unsupported_media_type",
    "invalid_input",
    "not_ready",
)


def _example(summary: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"summary": summary, "value": value}


@dataclass(frozen=True)
class Operation:
    summary: str
    description: str
    errors: tuple[Error, ...] = ()
    examples: dict[str, dict[str, Any]] = field(default_factory=dict)
    name: str = MODEL  # the example of its {name}, if it has one
    responses: dict[int | str, dict[str, Any]] = field(default_factory=dict)  # besides errors


OPERATIONS: dict[str, Operation] = {
    "create_model": Operation(
        "Create a model",
        "Hosts a new model at its prior. `network`, `likelihood` and `filter` each take one of "
        "the registered kinds, chosen by `type`; `prior`, `dynamics` and `events` have defaults. "
        "Answers 201 with the model's description (version 0). A refused create creates "
        "nothing. `monitor: true` also exports the model's calibration to Prometheus. The "
        "projected filters (`subspace`, `pulse`, `last_layer`) may carry a warm-up set "
        "(`filter.warmup`): its SGD runs before the answer, seconds to minutes for large "
        "networks; `sgd` and `replay_sgd` keep a point estimate (no epistemic variance).",
        (
            "already_exists",
            "limit_reached",
            (
                "too_large",
                "the state of this model would take 2147483648 bytes, over the limit "
                "of 1073741824 (POSTSERVE_MAX_STATE_BYTES)",
            ),
            "unsupported_media_type",
            ("invalid_input", "network.input_dim: Input should be greater than or equal to 1"),
            "invalid_spec",
            "store_unavailable",
            "not_ready",
        ),
        {
            "walkthrough": _example(
                "The README's walkthrough: click-through on 3 features, LoFi of rank 5",
                {
                    "name": MODEL,
                    "network": {
                        "type": "mlp",
                        "input_dim": 3,
                        "hidden": [16],
                        "output_dim": 1,
                        "activation": "relu",
                    },
                    "likelihood": {"type": "bernoulli"},
                    "filter": {"type": "lofi", "rank": 5},
                    "prior": {"variance": 0.1},
                    "dynamics": {"process_noise": 0.0, "decay": 1.0},
                    "monitor": True,
                },
            ),
            "kalman": _example(
                "Linear regression on 3 features, exact Kalman posterior",
                {
                    "name": DELETED,
                    "network": {"type": "linear", "input_dim": 3},
                    "likelihood": {"type": "gaussian", "noise_variance": 0.5},
                    "filter": {"type": "kalman"},
                },
            ),
        },
    ),
    "list_models": Operation(
        "List the models",
        "Every hosted model's description, by name; with `limit`, one page of them, and "
        "`next_after`, the name to pass as `after` for the next page (null on the last).",
        (("invalid_input", "query.limit: Input should be greater than or equal to 1"), "not_ready"),
    ),
    "get_model": Operation(
        "Describe a model",
        "The model's spec, version (observations applied), parameter count, state bytes, latest "
        "snapshot version and calibration summary.",
        ("not_found", "not_ready"),
    ),
    "delete_model": Operation(
        "Delete a model",
        "Removes the model, its snapshots, its log and its events, after its pending updates. "
        "Answers 204 with no body.",
        ("not_found", "store_unavailable", "not_ready"),
        name=DELETED,
    ),
    "update": Operation(
        "Apply observations",
        "One filtering step per row of `x` with its label in `y`, in order, applied once the "
        "log record is durable. Answers the new version and, per row, its pre-update prediction "
        "and log predictive density. With `outputs` (one output index per row), row i's `y` "
        "is one number observing output `outputs[i]` alone, and its prediction is of that "
        "output. A repeated `request_id` returns the first answer with "
        '`"duplicate": true` and changes nothing. A refused update changes neither the state '
        "nor the version.",
        (
            *_BODY_ERRORS,
            "step_rejected",
            "not_owner",
            "version_conflict",
            "store_unavailable",
        ),
        {
            "rows": _example(
                "Three observations, safe to retry",
                {"x": _X, "y": [1, 0, 1], "request_id": "batch-0001"},
            )
        },
    ),
    "predict": Operation(
        "Predict",
        "The predictive mean and variance (epistemic + aleatoric) of each row of `x` under the "
        "published posterior, and `num_samples` Thompson samples of shape (num_samples, rows, "
        "outputs), each sample one parameter draw shared by all rows; `seed` makes them "
        'reproducible. `"variance": false` answers the mean alone (the variance lists empty). '
        "Changes nothing.",
        (
            *_BODY_ERRORS[:3],
            ("invalid_input", "predict: row 0 of x has 2 values, the model takes 3"),
            *_BODY_ERRORS[4:],
        ),
        {
            "samples": _example(
                "Two rows, four Thompson samples",
                {
                    "x": _X[:2],
                    "num_samples": 4,
                    "seed": 7,
                },
            ),
            "mean": _example("The mean alone", {"x": _X[:1], "variance": False}),
        },
    ),
    "decide": Operation(
        "Choose an action",
        "Chooses one of the candidate `actions` (one feature row each, after the shared "
        "`context`; together they are the model's inputs) by `strategy`, or, with the "
        "`context` alone, one of the model's outputs (the arms; the reward then observes that "
        "output alone), and keeps the event (the chosen row, its propensity, the version) for "
        "its reward for `events.ttl_s`. Thompson draws follow the model's `thompson`. A "
        "known `event_id` answers its first decision. 409 `already_exists`: the event id is "
        "that of an expired event.",
        (
            *_BODY_ERRORS,
            ("already_exists", "event 'evt-0001' of model 'ctr-home' exists and has expired"),
            "store_unavailable",
        ),
        {
            "thompson": _example(
                "Thompson sampling over three actions",
                {
                    "actions": _ACTIONS,
                    "context": [0.3],
                    "strategy": "thompson",
                    "event_id": "evt-0001",
                    "seed": 3,
                },
            ),
        },
    ),
    "reward": Operation(
        "Reward a decision",
        "Applies the reward of a `/decide` event as one update with the event's features, at "
        'most once: a second reward answers `"duplicate": true` and changes nothing. 404: no '
        "model of that name, or the event is unknown or expired. Rewards are maximised.",
        (
            "not_found",
            (
                "not_found",
                "event 'evt-0001' of model 'ctr-home' is unknown or expired (events "
                "wait 3600 s for their reward, events.ttl_s)",
            ),
            *_BODY_ERRORS[1:],
            "step_rejected",
            "not_owner",
            "version_conflict",
            "store_unavailable",
        ),
        {"click": _example("A click on event evt-0001", {"event_id": "evt-0001", "reward": 1})},
    ),
    "decide_batch": Operation(
        "Choose actions for many",
        "Each item is a `/decide` body, decided independently against one read of the "
        "published state, each with its own event. The items' actions together count against "
        "POSTSERVE_MAX_ROWS.",
        (*_BODY_ERRORS, "already_exists", "store_unavailable"),
        {
            "two": _example(
                "Two decisions",
                {
                    "items": [
                        {"actions": _ACTIONS, "context": [0.3], "event_id": "evt-0002"},
                        {
                            "actions": _ACTIONS,
                            "context": [-1.2],
                            "strategy": "ucb",
                            "event_id": "evt-0003",
                        },
                    ]
                },
            ),
        },
    ),
    "reward_batch": Operation(
        "Reward many decisions",
        "All or nothing: an unknown or expired event (404) or a reward the likelihood refuses "
        "(422) names the item's index and nothing is applied. Otherwise the rewards are one "
        "update, in order, each event at most once (`duplicate` for one rewarded before or "
        "earlier in the batch). The items count against POSTSERVE_MAX_ROWS.",
        (*_BODY_ERRORS, "step_rejected", "not_owner", "version_conflict", "store_unavailable"),
        {
            "two": _example(
                "Rewards of events evt-0002 and evt-0003",
                {
                    "items": [
                        {"event_id": "evt-0002", "reward": 0},
                        {"event_id": "evt-0003", "reward": 1},
                    ]
                },
            ),
        },
    ),
    "calibration": Operation(
        "Calibration window",
        "The calibration figures of the model's sliding window of pre-update predictions "
        "against their labels (NLL; coverage and PIT for gaussian and poisson; Brier, log loss, "
        "reliability and ECE for classes) and their history by bucket.",
        ("not_found", "not_ready"),
    ),
    "influence": Operation(
        "Most influential observations",
        "The `top` rows of the model's recent window (`POSTSERVE_INFLUENCE_WINDOW` rows) that "
        "moved it most, largest first: each row's version, request and index in it, and its "
        "influence as `/update` answered it (the Mahalanobis size of its mean step; its "
        "leave-one-out shift of the prediction). Outliers, label errors and attacks rank high.",
        ("invalid_input", "not_found", "not_ready"),
    ),
    "snapshot": Operation(
        "Take a snapshot",
        "Writes a snapshot of the published state now (restarts replay the log after it).",
        ("not_found", "not_owner", "store_unavailable", "not_ready"),
    ),
    "healthz": Operation("Liveness", "Answers 200 while the process serves requests."),
    "readyz": Operation(
        "Readiness",
        "200 once every model is restored and the store answers; 503 with the same body "
        "otherwise (at start, or while Redis is unreachable).",
        responses={503: {"model": Readiness, "description": "Not ready: the same body."}},
    ),
}


#: the document's groups of operations, in the order /docs shows them
TAGS = [
    {"name": "models", "description": "Create, describe, snapshot and delete hosted models."},
    {"name": "observations", "description": "Update a posterior with labelled rows; predict."},
    {"name": "bandits", "description": "Decide among candidate actions, then reward the choice."},
    {"name": "health", "description": "Liveness and readiness probes (open without a key)."},
]
#: operation -> (its group, what its 2xx answer is)
ANSWERS: dict[str, tuple[str, str]] = {
    "create_model": ("models", "Created: the model's description."),
    "list_models": ("models", "The models' descriptions."),
    "get_model": ("models", "The model's description."),
    "delete_model": ("models", "Deleted: no body."),
    "calibration": ("models", "The calibration window."),
    "influence": ("models", "The most influential recent rows, largest first."),
    "snapshot": ("models", "The snapshot taken: its version and size in bytes."),
    "update": ("observations", "Applied (or, for a repeated request_id, its first answer)."),
    "predict": ("observations", "The predictive moments and samples, per row."),
    "decide": ("bandits", "The chosen action, its propensity and the event to reward."),
    "reward": ("bandits", "Applied, or a duplicate of an earlier reward."),
    "decide_batch": ("bandits", "One decision per item, in order."),
    "reward_batch": ("bandits", "One answer per item, in order."),
    "healthz": ("health", "The process serves."),
    "readyz": ("health", "Ready: every model restored, the store answers."),
}


def describe(name: str) -> dict[str, Any]:
    """The route decorator's ``summary``, ``description``, ``response_description``,
    ``responses``, ``tags`` and (for a body's examples) ``openapi_extra`` for operation
    ``name``."""
    op = OPERATIONS[name]
    tag, answer = ANSWERS[name]
    kwargs: dict[str, Any] = {
        "summary": op.summary,
        "description": op.description,
        "response_description": answer,
        "responses": {**errors(*op.errors), **op.responses},
        "tags": [tag],
    }
    if op.examples:
        media = {"application/json": {"examples": op.examples}}
        kwargs["openapi_extra"] = {"requestBody": {"content": media}}
    return kwargs


def name_examples() -> dict[str, str]:
    """The ``{name}`` example of each operation, by operation id."""
    return {name: op.name for name, op in OPERATIONS.items()}
