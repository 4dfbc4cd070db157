"""The bad-input matrix: every bad request gets a 4xx with ``{"error": {"code", "message"}}``
naming the problem, and changes no model (version and a seeded /predict answer, byte for byte) and
no catalogue.

The whole matrix runs against the app in this process (memory store); a sample of it, and the
chunked upload that only a real HTTP server sees, against a real server process (sqlite store)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch

from service.testing import MakeAppClient, in_process, linear_spec, running

LIMITS = {"max_body_bytes": 65536, "max_rows": 100, "max_samples": 50, "max_state_bytes": 10**7}
LIMITS_ENV = {f"POSTSERVE_{k.upper()}": str(v) for k, v in LIMITS.items()}

MODELS: list[dict[str, Any]] = [
    {
        "name": "gauss",
        "network": {"type": "linear", "input_dim": 2},
        "likelihood": {"type": "gaussian", "noise_variance": 0.5},
        "filter": {"type": "ekf"},
    },
    {
        "name": "gauss2",
        "network": {"type": "linear", "input_dim": 2, "output_dim": 2},
        "likelihood": {"type": "gaussian", "noise_variance": [0.1, 0.2]},
        "filter": {"type": "lofi", "rank": 2},
    },
    {
        "name": "bern",
        "network": {"type": "mlp", "input_dim": 2, "hidden": [4]},
        "likelihood": {"type": "bernoulli"},
        "filter": {"type": "lofi", "rank": 2},
    },
    {
        "name": "cat",
        "network": {"type": "mlp", "input_dim": 2, "hidden": [4], "output_dim": 3},
        "likelihood": {"type": "categorical"},
        "filter": {"type": "diagonal"},
    },
    {
        "name": "pois",
        "network": {"type": "linear", "input_dim": 2},
        "likelihood": {"type": "poisson"},
        "filter": {"type": "ekf"},
        "prior": {"variance": 0.1},
    },
    {
        "name": "kal64",
        "network": {"type": "linear", "input_dim": 2},
        "likelihood": {"type": "gaussian", "noise_variance": 1.0},
        "filter": {"type": "kalman"},
        "dtype": "float64",
    },
]
GOOD_Y = {
    "gauss": [0.5, -0.3, 1.2],
    "gauss2": [[0.5, 0.1], [-0.3, 0.0], [1.2, 2.0]],
    "bern": [1, 0, 1],
    "cat": [2, 0, 1],
    "pois": [3, 0, 1],
    "kal64": [0.5, -0.3, 1.2],
}
GOOD_X = [[0.5, -1.0], [1.0, 0.25], [-0.75, 0.5]]
QUERY = {"x": [[0.5, -1.0], [1.0, 2.0]], "num_samples": 3, "seed": 11}


def _load(c: httpx.Client) -> httpx.Client:
    for spec in MODELS:
        r = c.post("/v1/models", json=spec)
        assert r.status_code == 201, r.text
        r = c.post(
            f"/v1/models/{spec['name']}/update", json={"x": GOOD_X, "y": GOOD_Y[spec["name"]]}
        )
        assert r.status_code == 200 and r.json()["version"] == 3, r.text
    return c


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    """The models, in the app served in this process."""
    with in_process(**LIMITS) as c:
        yield _load(c)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """The same models on a real server process."""
    with (
        running(tmp_path_factory.mktemp("bad-input"), env=LIMITS_ENV) as s,
        httpx.Client(base_url=s.url, timeout=30) as c,
    ):
        yield _load(c)


def _observe(c: httpx.Client) -> dict[str, Any]:
    """The catalogue, and per model its spec, version and a seeded /predict answer (raw bytes)."""
    listed = c.get("/v1/models")
    assert listed.status_code == 200
    seen: dict[str, Any] = {"names": sorted(m["name"] for m in listed.json()["models"])}
    for spec in MODELS:
        name = spec["name"]
        info = c.get(f"/v1/models/{name}").json()
        predicted = c.post(f"/v1/models/{name}/predict", json=QUERY)
        assert predicted.status_code == 200, predicted.text
        seen[name] = (info["spec"], info["version"], predicted.content)
    return seen


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    body: str | bytes | dict[str, Any] | None
    status: int
    code: str
    says: tuple[str, ...]  # substrings the message must hold (case-insensitive)
    ctype: str = "application/json"


def U(model: str) -> str:
    return f"/v1/models/{model}/update"


def P(model: str) -> str:
    return f"/v1/models/{model}/predict"


def _spec(name: str = "fresh", **over: Any) -> dict[str, Any]:
    return linear_spec(name, 2, **over)


BIG_MLP = {"type": "mlp", "input_dim": 100, "hidden": [100], "output_dim": 1}
PADDING = " " * 70_000
ROWS_101 = [[0.1, 0.2]] * 101

CASES = [
    # non-finite numbers (raw JSON text: Python's json module writes NaN / Infinity)
    Case("nan-x", "POST", U("gauss"), '{"x": [[NaN, 1.0]], "y": [0.5]}', 422, "invalid_input", ("nan",)),
    Case("nan-x-later-row", "POST", U("gauss"), '{"x": [[1.0, 1.0], [1.0, NaN]], "y": [0.5, 0.1]}', 422, "invalid_input", ("nan",)),
    Case("nan-y", "POST", U("gauss"), '{"x": [[1.0, 1.0]], "y": [NaN]}', 422, "invalid_input", ("nan",)),
    Case("inf-y", "POST", U("gauss"), '{"x": [[1.0, 2.0]], "y": [Infinity]}', 422, "invalid_input", ("infinite",)),
    Case("minus-inf-x", "POST", U("bern"), '{"x": [[-Infinity, 2.0]], "y": [1]}', 422, "invalid_input", ("infinite",)),
    Case("overflowing-literal-x", "POST", U("gauss"), '{"x": [[1e400, 2.0]], "y": [1.0]}', 422, "invalid_input", ("infinite",)),
    Case("nan-y-row-gauss2", "POST", U("gauss2"), '{"x": [[1.0, 2.0]], "y": [[1.0, NaN]]}', 422, "invalid_input", ("nan",)),
    Case("nan-x-predict", "POST", P("gauss"), '{"x": [[1.0, NaN]], "num_samples": 2}', 422, "invalid_input", ("nan",)),
    Case("inf-x-predict", "POST", P("cat"), '{"x": [[Infinity, 0.0]]}', 422, "invalid_input", ("infinite",)),
    Case("x-over-float32-range", "POST", U("gauss"), {"x": [[1e300, 0.0]], "y": [1.0]}, 422, "invalid_input", ("x holds", "float32 range")),
    Case("y-over-float32-range", "POST", U("gauss"), {"x": [[1.0, 0.0]], "y": [1e308]}, 422, "invalid_input", ("y holds", "float32 range")),
    Case("x-over-float32-range-predict", "POST", P("bern"), {"x": [[-1e39, 0.0]]}, 422, "invalid_input", ("float32 range",)),
    # shapes
    Case("x-row-too-wide", "POST", U("gauss"), {"x": [[1.0, 2.0], [1.0, 2.0, 3.0]], "y": [1.0, 2.0]}, 422, "invalid_input", ("row 1", "3 values", "takes 2")),
    Case("x-row-too-narrow", "POST", U("cat"), {"x": [[1.0]], "y": [0]}, 422, "invalid_input", ("row 0", "takes 2")),
    Case("x-row-empty", "POST", U("gauss"), {"x": [[]], "y": [1.0]}, 422, "invalid_input", ("row 0", "0 values")),
    Case("x-row-wrong-width-predict", "POST", P("bern"), {"x": [[1.0, 2.0, 3.0]]}, 422, "invalid_input", ("3 values", "takes 2")),
    Case("x-y-lengths-differ", "POST", U("gauss"), {"x": [[1.0, 2.0], [3.0, 4.0]], "y": [1.0, 2.0, 3.0]}, 422, "invalid_input", ("2 rows", "y has 3")),
    Case("y-shorter-than-x", "POST", U("bern"), {"x": [[1.0, 2.0], [3.0, 4.0]], "y": [1]}, 422, "invalid_input", ("2 rows", "y has 1")),
    Case("empty-x", "POST", U("gauss"), {"x": [], "y": []}, 422, "invalid_input", ("x", "at least 1")),
    Case("empty-x-predict", "POST", P("gauss"), {"x": []}, 422, "invalid_input", ("x", "at least 1")),
    Case("gauss2-y-row-too-long", "POST", U("gauss2"), {"x": [[1.0, 2.0]], "y": [[1.0, 2.0, 3.0]]}, 422, "invalid_input", ("y must have shape", "(1, 3)")),
    Case("gauss2-scalar-y", "POST", U("gauss2"), {"x": [[1.0, 2.0]], "y": [1.0]}, 422, "invalid_input", ("y must have shape",)),
    Case("gauss2-ragged-y", "POST", U("gauss2"), {"x": [[1.0, 2.0], [1.0, 2.0]], "y": [[1.0, 2.0], [1.0]]}, 422, "invalid_input", ("same shape",)),
    Case("gauss2-mixed-y", "POST", U("gauss2"), {"x": [[1.0, 2.0], [1.0, 2.0]], "y": [[1.0, 2.0], 1.0]}, 422, "invalid_input", ("same shape",)),
    Case("gauss-y-rows-of-two", "POST", U("gauss"), {"x": [[1.0, 2.0]], "y": [[1.0, 2.0]]}, 422, "invalid_input", ("y must have shape",)),
    # labels outside the likelihood's support (the valid first row must not be applied either)
    Case("categorical-index-too-big", "POST", U("cat"), {"x": [[1.0, 2.0], [0.0, 1.0]], "y": [1, 3]}, 422, "invalid_input", ("out of range", "[0, 2]")),
    Case("categorical-index-negative", "POST", U("cat"), {"x": [[1.0, 2.0]], "y": [-1]}, 422, "invalid_input", ("out of range",)),
    Case("categorical-index-fractional", "POST", U("cat"), {"x": [[1.0, 2.0], [0.0, 1.0]], "y": [0, 1.5]}, 422, "invalid_input", ("integer",)),
    Case("categorical-one-hot-rows", "POST", U("cat"), {"x": [[1.0, 2.0]], "y": [[0, 1, 0]]}, 422, "invalid_input", ("class ind",)),
    Case("bernoulli-y-2", "POST", U("bern"), {"x": [[1.0, 2.0], [0.0, 1.0]], "y": [1, 2]}, 422, "invalid_input", ("0 or 1",)),
    Case("bernoulli-y-half", "POST", U("bern"), {"x": [[1.0, 2.0]], "y": [0.5]}, 422, "invalid_input", ("0 or 1",)),
    Case("bernoulli-y-negative", "POST", U("bern"), {"x": [[1.0, 2.0]], "y": [-1]}, 422, "invalid_input", ("0 or 1",)),
    Case("poisson-negative", "POST", U("pois"), {"x": [[1.0, 2.0], [0.0, 1.0]], "y": [2, -1]}, 422, "invalid_input", ("non-negative integer",)),
    Case("poisson-fractional", "POST", U("pois"), {"x": [[1.0, 2.0]], "y": [2.5]}, 422, "invalid_input", ("non-negative integer",)),
    # unknown models
    Case("unknown-model-update", "POST", U("nope"), {"x": [[1.0, 2.0]], "y": [1.0]}, 404, "not_found", ("nope",)),
    Case("unknown-model-predict", "POST", P("nope"), {"x": [[1.0, 2.0]]}, 404, "not_found", ("nope",)),
    Case("unknown-model-get", "GET", "/v1/models/nope", None, 404, "not_found", ("nope",)),
    Case("unknown-model-delete", "DELETE", "/v1/models/nope", None, 404, "not_found", ("nope",)),
    Case("unknown-model-snapshot", "POST", "/v1/models/nope/snapshot", None, 404, "not_found", ("nope",)),
    Case("unknown-route", "GET", "/v1/nothing-here", None, 404, "not_found", ("not found",)),
    # names on create
    Case("name-with-space", "POST", "/v1/models", _spec(name="has space"), 422, "invalid_input", ("name",)),
    Case("name-129-chars", "POST", "/v1/models", _spec(name="n" * 129), 422, "invalid_input", ("name",)),
    Case("name-with-slash", "POST", "/v1/models", _spec(name="a/b"), 422, "invalid_input", ("name",)),
    Case("name-empty", "POST", "/v1/models", _spec(name=""), 422, "invalid_input", ("name",)),
    Case("name-missing", "POST", "/v1/models", {k: v for k, v in _spec().items() if k != "name"}, 422, "invalid_input", ("name", "required")),
    Case("duplicate-create", "POST", "/v1/models", _spec(name="gauss", network={"type": "linear", "input_dim": 5}), 409, "already_exists", ("gauss",)),
    # unknown fields
    Case("unknown-field-update", "POST", U("gauss"), {"x": [[1.0, 2.0]], "y": [1.0], "weight": 2}, 422, "invalid_input", ("weight",)),
    Case("unknown-field-predict", "POST", P("gauss"), {"x": [[1.0, 2.0]], "y": [1.0]}, 422, "invalid_input", ("y", "not permitted")),
    Case("unknown-field-create", "POST", "/v1/models", _spec(colour="blue"), 422, "invalid_input", ("colour",)),
    Case("unknown-nested-field-create", "POST", "/v1/models", _spec(network={"type": "linear", "input_dim": 2, "depth": 3}), 422, "invalid_input", ("depth",)),
    # wrong types
    Case("x-is-a-string", "POST", U("gauss"), {"x": "abc", "y": [1.0]}, 422, "invalid_input", ("x",)),
    Case("y-is-a-string", "POST", U("gauss"), {"x": [[1.0, 2.0]], "y": "abc"}, 422, "invalid_input", ("y",)),
    Case("x-entry-is-a-word", "POST", U("gauss"), {"x": [[1.0, "abc"]], "y": [1.0]}, 422, "invalid_input", ("x",)),
    Case("x-missing", "POST", U("gauss"), {"y": [1.0]}, 422, "invalid_input", ("x", "required")),
    Case("request-id-number", "POST", U("gauss"), {"x": [[1.0, 2.0]], "y": [1.0], "request_id": 5}, 422, "invalid_input", ("request_id",)),
    Case("request-id-empty", "POST", U("gauss"), {"x": [[1.0, 2.0]], "y": [1.0], "request_id": ""}, 422, "invalid_input", ("request_id",)),
    Case("request-id-too-long", "POST", U("gauss"), {"x": [[1.0, 2.0]], "y": [1.0], "request_id": "r" * 201}, 422, "invalid_input", ("request_id",)),
    Case("num-samples-word", "POST", P("gauss"), {"x": [[1.0, 2.0]], "num_samples": "many"}, 422, "invalid_input", ("num_samples",)),
    Case("num-samples-negative", "POST", P("gauss"), {"x": [[1.0, 2.0]], "num_samples": -1}, 422, "invalid_input", ("num_samples",)),
    Case("num-samples-fractional", "POST", P("gauss"), {"x": [[1.0, 2.0]], "num_samples": 2.5}, 422, "invalid_input", ("num_samples",)),
    Case("seed-negative", "POST", P("gauss"), {"x": [[1.0, 2.0]], "seed": -1}, 422, "invalid_input", ("seed",)),
    Case("seed-over-63-bits", "POST", P("gauss"), {"x": [[1.0, 2.0]], "seed": 2**64}, 422, "invalid_input", ("seed",)),
    Case("input-dim-word", "POST", "/v1/models", _spec(network={"type": "linear", "input_dim": "two"}), 422, "invalid_input", ("input_dim",)),
    Case("unknown-filter", "POST", "/v1/models", _spec(filter={"type": "ukf"}), 422, "invalid_input", ("filter",)),
    Case("unknown-likelihood", "POST", "/v1/models", _spec(likelihood={"type": "student"}), 422, "invalid_input", ("likelihood",)),
    Case("not-json", "POST", U("gauss"), '{"x": [[1.0, 2.0]], "y": [1.0]', 422, "invalid_input", ("json",)),
    Case("empty-body-update", "POST", U("gauss"), "", 422, "invalid_input", ("body is empty", "with y")),
    Case("update-without-x", "POST", U("gauss"), {"y": [1.0]}, 422, "invalid_input", ("x is required",)),
    Case("update-dt-not-state-space", "POST", U("gauss"), {"x": [[1.0, 2.0]], "y": [1.0], "dt": [1.0]}, 422, "invalid_input", ("dt is for state_space",)),
    Case("predict-without-x", "POST", P("gauss"), {"num_samples": 2}, 422, "invalid_input", ("x is required",)),
    Case("form-body-update", "POST", U("gauss"), "x=1&y=2", 415, "unsupported_media_type", ("json", "x-www-form-urlencoded"), "application/x-www-form-urlencoded"),
    Case("text-body-predict", "POST", P("gauss"), '{"x": [[1.0, 2.0]]}', 415, "unsupported_media_type", ("text/plain",), "text/plain"),
    Case("form-body-create", "POST", "/v1/models", "name=a", 415, "unsupported_media_type", ("content-type",), "application/x-www-form-urlencoded"),
    Case("empty-body-create", "POST", "/v1/models", "", 422, "invalid_input", ("body is empty", "name, network, likelihood")),
    Case("json-array-body", "POST", U("gauss"), "[]", 422, "invalid_input", ("object",)),
    Case("body-not-utf8", "POST", U("gauss"), b'{"x": [[1.0, 2.0]], "y": [\xff]}', 422, "invalid_input", ("not JSON", "UTF-8")),
    Case("wrong-method-update", "PUT", U("gauss"), {"x": [[1.0, 2.0]], "y": [1.0]}, 405, "method_not_allowed", ("PUT", "allowed: POST")),
    Case("wrong-method-models", "DELETE", "/v1/models", None, 405, "method_not_allowed", ("allowed: GET, POST",)),
    # values of another JSON type are not coerced to the schema's
    Case("boolean-as-integer", "POST", "/v1/models", _spec(filter={"type": "lofi", "rank": False}), 422, "invalid_input", ("rank", "integer")),
    Case("string-as-integer", "POST", P("gauss"), {"x": [[1.0, 2.0]], "num_samples": "3"}, 422, "invalid_input", ("num_samples", "integer")),
    Case("integer-as-boolean", "POST", P("gauss"), {"x": [[1.0, 2.0]], "variance": 1}, 422, "invalid_input", ("variance", "boolean")),
    Case("string-as-number", "POST", "/v1/models", _spec(prior={"variance": "0.5"}), 422, "invalid_input", ("prior.variance", "number")),
    Case("string-as-boolean", "POST", "/v1/models", _spec(monitor="yes"), 422, "invalid_input", ("monitor", "boolean")),
    # limits
    Case("body-over-limit-update", "POST", U("gauss"), '{"x": [[1.0, 2.0]], "y": [1.0]' + PADDING + "}", 413, "too_large", ("POSTSERVE_MAX_BODY_BYTES",)),
    Case("body-over-limit-create", "POST", "/v1/models", json.dumps(_spec()) + PADDING, 413, "too_large", ("POSTSERVE_MAX_BODY_BYTES",)),
    Case("rows-over-limit-update", "POST", U("gauss"), {"x": ROWS_101, "y": [0.0] * 101}, 413, "too_large", ("101 rows", "POSTSERVE_MAX_ROWS")),
    Case("rows-over-limit-predict", "POST", P("gauss"), {"x": ROWS_101}, 413, "too_large", ("101 rows", "POSTSERVE_MAX_ROWS")),
    Case("samples-over-limit", "POST", P("bern"), {"x": [[1.0, 2.0]], "num_samples": 51, "seed": 1}, 413, "too_large", ("51", "POSTSERVE_MAX_SAMPLES")),
    Case("samples-far-over-limit", "POST", P("bern"), {"x": [[1.0, 2.0]], "num_samples": 10**30}, 413, "too_large", ("POSTSERVE_MAX_SAMPLES",)),
    Case("state-over-limit-ekf-on-mlp", "POST", "/v1/models", _spec(network=BIG_MLP, filter={"type": "ekf"}), 413, "too_large", ("POSTSERVE_MAX_STATE_BYTES",)),
    Case("state-over-limit-huge-diagonal", "POST", "/v1/models", _spec(network={"type": "mlp", "input_dim": 100000, "hidden": [100000, 100000]}, filter={"type": "diagonal"}), 413, "too_large", ("POSTSERVE_MAX_STATE_BYTES",)),
    # specs that cannot be built
    Case("kalman-with-mlp", "POST", "/v1/models", _spec(network={"type": "mlp", "input_dim": 2, "hidden": [3]}, filter={"type": "kalman"}), 422, "invalid_spec", ("kalman",)),
    Case("kalman-with-bernoulli", "POST", "/v1/models", _spec(likelihood={"type": "bernoulli"}, filter={"type": "kalman"}), 422, "invalid_spec", ("kalman",)),
    Case("prior-mean-wrong-length", "POST", "/v1/models", _spec(prior={"variance": 1.0, "mean": [0.0, 0.0]}), 422, "invalid_spec", ("prior mean", "(3,)")),
    Case("prior-mean-nan", "POST", "/v1/models", json.dumps(_spec(prior={"mean": [float("nan"), 0.0, 0.0]})), 422, "invalid_input", ("prior.mean",)),
    Case("prior-variance-zero", "POST", "/v1/models", _spec(prior={"variance": 0.0}), 422, "invalid_input", ("prior.variance",)),
    Case("prior-bias-variance-zero", "POST", "/v1/models", _spec(prior={"bias_variance": 0.0}), 422, "invalid_input", ("prior.bias_variance",)),
    Case("prior-bias-variance-over-float32", "POST", "/v1/models", _spec(prior={"bias_variance": 1e300}), 422, "invalid_spec", ("prior.bias_variance", "float32")),
    Case("iterations-negative", "POST", "/v1/models", _spec(likelihood={"type": "poisson", "iterations": -1}), 422, "invalid_input", ("iterations",)),
    Case("iterations-over-limit", "POST", "/v1/models", _spec(likelihood={"type": "bernoulli", "iterations": 101}), 422, "invalid_input", ("iterations", "100")),
    Case("iterations-fractional", "POST", "/v1/models", _spec(likelihood={"type": "poisson", "iterations": 2.5}), 422, "invalid_input", ("iterations", "integer")),
    Case("iterations-boolean", "POST", "/v1/models", _spec(likelihood={"type": "poisson", "iterations": True}), 422, "invalid_input", ("iterations", "integer")),
    Case("iterations-on-gaussian", "POST", "/v1/models", _spec(likelihood={"type": "gaussian", "iterations": 3}), 422, "invalid_input", ("iterations",)),
    Case("noise-variance-negative", "POST", "/v1/models", _spec(likelihood={"type": "gaussian", "noise_variance": -1.0}), 422, "invalid_input", ("noise_variance",)),
    Case("noise-variance-wrong-count", "POST", "/v1/models", _spec(likelihood={"type": "gaussian", "noise_variance": [1.0, 2.0, 3.0]}), 422, "invalid_spec", ("noise_variance", "3 entries")),
    Case("categorical-one-class", "POST", "/v1/models", _spec(likelihood={"type": "categorical"}), 422, "invalid_spec", ("output_dim",)),
    Case("bernoulli-two-outputs", "POST", "/v1/models", _spec(network={"type": "linear", "input_dim": 2, "output_dim": 2}, likelihood={"type": "bernoulli"}), 422, "invalid_spec", ("output_dim",)),
    Case("decay-over-one", "POST", "/v1/models", _spec(dynamics={"decay": 1.5}), 422, "invalid_input", ("decay",)),
    Case("unknown-device", "POST", "/v1/models", _spec(device="tpu"), 422, "invalid_spec", ("tpu",)),
    Case("device-meta", "POST", "/v1/models", _spec(device="meta"), 422, "invalid_spec", ("device", "meta", "cpu")),
    Case("device-mps", "POST", "/v1/models", _spec(device="mps"), 422, "invalid_spec", ("device", "mps")),
    Case("device-xla", "POST", "/v1/models", _spec(device="xla"), 422, "invalid_spec", ("device", "xla")),
    Case("device-cuda-absent", "POST", "/v1/models", _spec(device=f"cuda:{torch.cuda.device_count()}"), 422, "invalid_spec", ("device", "cuda")),
    Case("prior-variance-over-float32", "POST", "/v1/models", _spec(prior={"variance": 1e308}), 422, "invalid_spec", ("prior.variance", "float32")),
    Case("prior-variance-under-float32", "POST", "/v1/models", _spec(prior={"variance": 1e-320}), 422, "invalid_spec", ("prior.variance", "float32")),
    Case("process-noise-over-float32", "POST", "/v1/models", _spec(dynamics={"process_noise": 1e39}), 422, "invalid_spec", ("dynamics.process_noise",)),
    Case("noise-variance-under-float32", "POST", "/v1/models", _spec(likelihood={"type": "gaussian", "noise_variance": 1e-40}), 422, "invalid_spec", ("likelihood.noise_variance",)),
    Case("prior-variance-over-float64", "POST", "/v1/models", _spec(prior={"variance": 1e308}, dtype="float64"), 422, "invalid_spec", ("prior.variance", "float64")),
    Case("name-dot", "POST", "/v1/models", _spec(name="."), 422, "invalid_spec", ("name",)),
    Case("name-dot-dot", "POST", "/v1/models", _spec(name=".."), 422, "invalid_spec", ("name",)),
    # steps the filter rejects: the whole request (its valid first row included) is refused
    Case("step-rejected-kalman-f64", "POST", U("kal64"), {"x": [[0.5, 0.5], [1e300, 1e300]], "y": [0.1, 0.2]}, 422, "step_rejected", ("non-finite",)),
    Case("step-rejected-kalman-f64-big-y", "POST", U("kal64"), {"x": [[1e200, 1e200]], "y": [1e300]}, 422, "step_rejected", ("non-finite",)),
    # a query whose predictive overflows must not answer 200 with nulls for numbers
    Case("predict-overflow", "POST", P("gauss"), {"x": [[1e30, 1e30]], "num_samples": 2, "seed": 1}, 422, "invalid_input", ("finite",)),
]  # fmt: skip


def _send(c: httpx.Client, case: Case) -> httpx.Response:
    if case.body is None:
        return c.request(case.method, case.path)
    text = case.body if isinstance(case.body, str | bytes) else json.dumps(case.body)
    return c.request(case.method, case.path, content=text, headers={"content-type": case.ctype})


def _assert_error(r: httpx.Response, status: int, code: str, says: tuple[str, ...]) -> None:
    assert r.status_code == status, r.text
    if status == 405:  # the methods the path answers, in the message and in Allow
        assert r.headers["allow"] == r.json()["error"]["message"].split("allowed: ")[1]
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["code"] == code, body
    for s in says:
        assert s.lower() in body["error"]["message"].lower(), (s, body)


#: one or two of each kind, for the real server
SERVED = {
    "nan-x", "overflowing-literal-x", "x-row-too-wide", "categorical-index-too-big",
    "unknown-model-update", "unknown-route", "name-with-slash", "duplicate-create",
    "unknown-field-update", "not-json", "body-over-limit-update", "rows-over-limit-predict",
    "samples-over-limit", "state-over-limit-ekf-on-mlp", "kalman-with-mlp",
    "step-rejected-kalman-f64", "predict-overflow", "body-not-utf8", "wrong-method-update",
    "wrong-method-models", "boolean-as-integer",
}  # fmt: skip
SERVED_CASES = [c for c in CASES if c.id in SERVED]
assert len(SERVED_CASES) == len(SERVED)


def _refused_and_nothing_changed(c: httpx.Client, case: Case) -> None:
    before = _observe(c)
    r = _send(c, case)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    _assert_error(r, case.status, case.code, case.says)
    assert _observe(c) == before


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request_is_refused_and_changes_nothing(client: httpx.Client, case: Case) -> None:
    _refused_and_nothing_changed(client, case)


@pytest.mark.parametrize("case", SERVED_CASES, ids=[c.id for c in SERVED_CASES])
def test_bad_request_to_a_real_server_is_refused_and_changes_nothing(
    served: httpx.Client, case: Case
) -> None:
    _refused_and_nothing_changed(served, case)


def test_chunked_body_over_the_limit_is_refused(served: httpx.Client) -> None:
    """No content-length: the limit holds while the body streams in (through uvicorn)."""
    before = _observe(served)
    chunks = [b'{"x": [[1.0, 2.0]], "y": [1.0]', *([b" " * 8192] * 10), b"}"]
    r = served.post(U("gauss"), content=iter(chunks), headers={"content-type": "application/json"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    _assert_error(r, 413, "too_large", ("POSTSERVE_MAX_BODY_BYTES",))
    assert _observe(served) == before


def test_the_limits_themselves_are_allowed(client: httpx.Client) -> None:
    """Exactly at each limit is fine (and a 128-character name is a name)."""
    r = client.post(P("bern"), json={"x": [[0.1, 0.2]] * 100, "num_samples": 50, "seed": 1})
    assert r.status_code == 200, r.text
    assert len(r.json()["samples"]) == 50 and len(r.json()["mean"]) == 100
    name = "n" * 128
    r = client.post("/v1/models", json=_spec(name=name, filter={"type": "kalman"}))
    assert r.status_code == 201, r.text
    r = client.post(U(name), json={"x": [[0.1, 0.2]] * 100, "y": [0.5] * 100})
    assert r.status_code == 200 and r.json()["version"] == 100, r.text
    assert client.delete(f"/v1/models/{name}").status_code == 204


def test_integers_are_json_schema_integers(client: httpx.Client) -> None:
    """An integer may be written with a zero fraction (JSON Schema's integer: 2.0 is one), and
    numbers may be written as integers; booleans and strings are neither."""
    spec = _spec(name="ints", network={"type": "linear", "input_dim": 2.0}, seed=7.0)
    r = client.post("/v1/models", json={**spec, "prior": {"variance": 1}})
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["network"]["input_dim"] == 2 and r.json()["spec"]["seed"] == 7
    r = client.post(P("ints"), json={"x": [[1, 2]], "num_samples": 2.0, "seed": 3.0})
    assert r.status_code == 200 and len(r.json()["samples"]) == 2, r.text
    r = client.post(P("ints"), json={"x": [[1, 2]], "num_samples": 2.5})
    _assert_error(r, 422, "invalid_input", ("num_samples", "integer"))
    assert client.delete("/v1/models/ints").status_code == 204


def test_rejected_requests_leave_the_model_usable(client: httpx.Client) -> None:
    """After a rejected step the model takes the next good update from the same version."""
    before = client.get("/v1/models/kal64").json()["version"]
    bad = client.post(U("kal64"), json={"x": [[1e300, 1e300]], "y": [0.0]})
    assert bad.status_code == 422
    good = client.post(U("kal64"), json={"x": [[0.1, 0.2]], "y": [0.3]})
    assert good.status_code == 200 and good.json()["version"] == before + 1


def test_a_create_over_the_process_state_budget_is_refused(app_client: MakeAppClient) -> None:
    """POSTSERVE_MAX_TOTAL_STATE_BYTES caps all states together: an EKF model of 3,001
    parameters (36 MB in float32) fits in a 50 MB budget once, not twice; nothing is created by
    the refused one, and deleting the first makes room again."""
    ekf = {"type": "mlp", "input_dim": 100, "hidden": [30], "output_dim": 1}
    with app_client(max_total_state_bytes=50_000_000) as c:
        assert (
            c.post("/v1/models", json=_spec("a", network=ekf, filter={"type": "ekf"})).status_code
            == 201
        )
        r = c.post("/v1/models", json=_spec("b", network=ekf, filter={"type": "ekf"}))
        _assert_error(r, 409, "limit_reached", ("POSTSERVE_MAX_TOTAL_STATE_BYTES", "budget"))
        assert c.get("/v1/models/b").status_code == 404
        small = c.post("/v1/models", json=_spec("c"))  # a small one still fits
        assert small.status_code == 201
        assert c.delete("/v1/models/a").status_code == 204
        assert (
            c.post("/v1/models", json=_spec("b", network=ekf, filter={"type": "ekf"})).status_code
            == 201
        )


def test_a_predict_answer_over_the_number_limit_is_refused(app_client: MakeAppClient) -> None:
    """POSTSERVE_MAX_ANSWER_NUMBERS bounds rows x (4 + num_samples) x outputs of one answer: the
    limit itself is answered, one row more is 413 naming the setting, and nothing is computed."""
    with app_client(max_answer_numbers=420) as c:
        spec = _spec(
            "three",
            likelihood={"type": "categorical"},
            network={"type": "linear", "input_dim": 2, "output_dim": 3},
        )
        assert c.post("/v1/models", json=spec).status_code == 201
        ok = c.post(P("three"), json={"x": [[0.1, 0.2]] * 10, "num_samples": 10, "seed": 1})
        assert ok.status_code == 200, ok.text  # 10 x 14 x 3 = 420
        r = c.post(P("three"), json={"x": [[0.1, 0.2]] * 11, "num_samples": 10, "seed": 1})
        _assert_error(r, 413, "too_large", ("462 numbers", "POSTSERVE_MAX_ANSWER_NUMBERS"))


# ---- the data plane (``service/api/dataplane.py``) against FastAPI's own routing ----

#: the cases the data plane serves (a POST to a model-scoped route with a body), and a few good
#: requests beside them
PLANE_CASES = [
    c
    for c in CASES
    if c.method == "POST"
    and c.path.startswith("/v1/models/")
    and c.path.split("/", 4)[-1] in {"update", "predict", "decide", "reward"}
]
GOOD = [
    ("POST", P("gauss"), QUERY),
    ("POST", P("cat"), {"x": GOOD_X, "num_samples": 2, "seed": 5}),
    ("POST", U("gauss"), {"x": GOOD_X, "y": GOOD_Y["gauss"]}),
    ("POST", U("cat"), {"x": GOOD_X[:1], "y": [1], "request_id": "r-1"}),
    ("POST", U("cat"), {"x": GOOD_X[:1], "y": [1], "request_id": "r-1"}),  # its duplicate
]


@pytest.fixture(scope="module")
def fastapi_only() -> Iterator[httpx.Client]:
    """The same models in an app without the data plane: FastAPI routes every request."""
    from service.api import create_app
    from service.api.dataplane import DataPlane
    from service.testing.inprocess import InProcessClient, app_settings

    app = create_app(app_settings(**LIMITS))
    app.user_middleware = [m for m in app.user_middleware if m.cls is not DataPlane]
    with InProcessClient(app) as c:
        yield _load(c)


def _counted(c: httpx.Client) -> list[str]:
    """The refused updates by reason, and the POSTs by route template and status."""
    return [
        ln
        for ln in c.get("/metrics").text.splitlines()
        if ln.startswith("postserve_updates_rejected")
        or (ln.startswith("postserve_http_requests_total") and 'method="POST"' in ln)
    ]


def test_the_data_plane_answers_as_fastapi_routing_does(
    app_client: MakeAppClient, fastapi_only: httpx.Client
) -> None:
    """Every bad body of the matrix on the data plane's routes, and good ones, get the same
    status, headers' content type and body from the data plane as from FastAPI's router, and
    leave the same counts of refused updates and requests by route template."""
    assert len(PLANE_CASES) >= 40
    with app_client(**LIMITS) as plane:
        _load(plane)
        for case in PLANE_CASES:
            a, b = _send(plane, case), _send(fastapi_only, case)
            assert (a.status_code, a.json()) == (b.status_code, b.json()), case.id
            assert a.headers["content-type"] == b.headers["content-type"], case.id
        for method, path, body in GOOD:
            a = plane.request(method, path, json=body)
            b = fastapi_only.request(method, path, json=body)
            assert a.status_code == b.status_code == 200, (path, a.text, b.text)
            assert a.content == b.content, path
        counted = _counted(plane)
        assert any('route="/v1/models/{name}/update",status="422"' in ln for ln in counted)
        assert counted == _counted(fastapi_only)
