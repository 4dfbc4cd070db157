"""The Open Inference Protocol (KServe v2, REST) beside the v1 routes: health, metadata, and
``infer`` mapped to ``/predict`` (README, "Open Inference Protocol").

What each route answers, as the protocol's JSON objects
(``kserve/open-inference-protocol``, ``specification/protocol/inference_rest.md``):

- ``GET /v2``: ``{"name": "postserve", "version", "extensions": []}``;
- ``GET /v2/health/live``: ``{"live": true}``; ``GET /v2/health/ready``: ``{"ready": bool}``,
  503 until the models are restored and the store answers (``/readyz``'s rule);
- ``GET /v2/models/{name}``: the model's tensors: one input, ``x`` (``[-1, I]``; ``dt``, ``[-1]``
  for a ``state_space`` model), and the outputs ``mean``, ``variance``, ``epistemic_variance``,
  ``aleatoric_variance`` (each ``[-1, C]``) and ``samples`` (``[-1, -1, C]``), of the model's
  datatype (``FP32`` or ``FP64``); ``GET /v2/models/{name}/ready``: ``{"name", "ready"}``;
- ``POST /v2/models/{name}/infer``: the predictive of the rows of input ``x`` (data flat in
  row-major order, or nested, of any numeric datatype), with the request parameters
  ``num_samples`` and ``seed`` (Thompson samples, as ``/predict``'s); the requested ``outputs``
  (by default all but ``samples``, and ``samples`` when drawn); the answer's ``parameters`` hold
  the posterior's ``version`` and whether it is a ``point_estimate``.

Errors are the protocol's ``{"error": "<message>"}``: 400 for a request that is not valid
(where v1 answers 422), 404 for an unknown model, and the v1 status otherwise. Models are not
versioned here (every update makes a new posterior; each serves its latest), so the
``/versions/<v>`` forms answer 400 saying so. Binary tensor data (the protocol's binary
extension) is refused with 400; JSON data is always answered as JSON.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
import pydantic
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from service import __version__
from service.api.errors import STATUS
from service.errors import InvalidInput, PostserveError
from service.filters.statespace import StateSpace
from service.hosting import Engine
from service.schemas import PredictRequest

__all__ = ["NUMERIC", "OUTPUTS", "router"]

router = APIRouter(prefix="/v2", include_in_schema=False)

#: the datatypes whose data are numbers (BOOL and BYTES are refused)
NUMERIC = frozenset(
    {"FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32"}
    | {"UINT64"}
)
#: the outputs of every model, in answer order (``samples`` only when drawn)
OUTPUTS = ("mean", "variance", "epistemic_variance", "aleatoric_variance", "samples")
_VARIANCES = frozenset(OUTPUTS[1:4])
_UNVERSIONED = (
    "Postserve does not version models for this protocol: every update makes a new posterior "
    "and each model serves its latest; use /v2/models/{name}"
)

Parameter = str | int | float | bool


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[int] = Field(min_length=1)
    datatype: str
    parameters: dict[str, Parameter] | None = None
    data: list[Any]


class _Output(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    parameters: dict[str, Parameter] | None = None


class InferenceRequest(BaseModel):
    """The protocol's ``$inference_request``."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    parameters: dict[str, Parameter] | None = None
    inputs: list[_Input] = Field(min_length=1)
    outputs: list[_Output] | None = None


def _error(status: int, message: str) -> Response:
    return Response(orjson.dumps({"error": message}), status, media_type="application/json")


def _refused(exc: PostserveError) -> Response:
    status = next((s for cls, s in STATUS if isinstance(exc, cls)), 500)
    return _error(400 if status == 422 else status, exc.message)


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def _datatype(dtype: str) -> str:
    return {"float32": "FP32", "float64": "FP64"}[dtype]


@router.get("")
async def server_metadata() -> Response:
    return _json({"name": "postserve", "version": __version__, "extensions": []})


@router.get("/health/live")
async def server_live() -> Response:
    return _json({"live": True})


@router.get("/health/ready")
async def server_ready(request: Request) -> Response:
    restored, store_ok = await _engine(request).readiness()
    ready = restored and store_ok
    return _json({"ready": ready}, 200 if ready else 503)


@router.get("/models/{name}")
async def model_metadata(name: str, request: Request) -> Response:
    try:
        h = await _engine(request).catalogue.fetch(name)
    except PostserveError as exc:
        return _refused(exc)
    network = h.filter.network
    datatype, C = _datatype(h.spec.dtype), network.output_dim
    first = {"name": "dt", "shape": [-1]} if isinstance(network, StateSpace) else None
    source = first or {"name": "x", "shape": [-1, network.input_dim]}
    outputs = [{"name": o, "datatype": datatype, "shape": [-1, C]} for o in OUTPUTS[:4]]
    outputs.append({"name": "samples", "datatype": datatype, "shape": [-1, -1, C]})
    return _json(
        {
            "name": name,
            "platform": "postserve",
            "inputs": [{**source, "datatype": datatype}],
            "outputs": outputs,
        }
    )


@router.get("/models/{name}/ready")
async def model_ready(name: str, request: Request) -> Response:
    engine = _engine(request)
    try:
        await engine.catalogue.fetch(name)
    except PostserveError as exc:
        return _refused(exc)
    return _json({"name": name, "ready": engine.ready})


@router.post("/models/{name}/infer")
async def infer(name: str, request: Request) -> Response:
    engine = _engine(request)
    if "inference-header-content-length" in request.headers:
        return _error(400, "binary tensor data is not supported: send the tensors as JSON")
    try:
        body = InferenceRequest.model_validate_json(await request.body())
        h = await engine.catalogue.fetch(name)
        state_space = isinstance(h.filter.network, StateSpace)
        rows = _rows(body, h.filter.network.input_dim, state_space)
        wanted = _wanted(body)
        samples, seed = _sampling(body.parameters or {})
        if "samples" in wanted and not samples:
            raise InvalidInput("output 'samples' needs the request parameter num_samples >= 1")
        req = PredictRequest.model_validate(
            {
                **({"dt": rows} if state_space else {"x": rows}),
                "num_samples": samples,
                "seed": seed,
                "variance": bool(wanted & _VARIANCES),
            }
        )
        answer = await engine.predict(name, req)
    except pydantic.ValidationError as exc:
        return _error(400, _message(exc))
    except PostserveError as exc:
        return _refused(exc)
    datatype = _datatype(h.spec.dtype)
    outputs = []
    for out in OUTPUTS:
        if out in wanted or (body.outputs is None and out == "samples" and samples):
            values = getattr(answer, out)
            shape = [len(values), *_shape(values[0])] if values else [0]
            outputs.append(
                {"name": out, "datatype": datatype, "shape": shape, "data": _flat(values)}
            )
    reply: dict[str, Any] = {"model_name": name}
    if body.id is not None:
        reply["id"] = body.id
    reply["parameters"] = {"version": answer.version, "point_estimate": answer.point_estimate}
    reply["outputs"] = outputs
    return _json(reply)


@router.api_route("/models/{name}/versions/{version}", methods=["GET"])
@router.api_route("/models/{name}/versions/{version}/ready", methods=["GET"])
@router.api_route("/models/{name}/versions/{version}/infer", methods=["POST"])
async def versioned(name: str, version: str) -> Response:
    return _error(400, _UNVERSIONED)


def _rows(body: InferenceRequest, input_dim: int, state_space: bool) -> list[Any]:
    """The one input's data as rows (N, I), or a state-space model's dt values (N,)."""
    expected = "dt" if state_space else "x"
    if len(body.inputs) != 1 or body.inputs[0].name != expected:
        given = ", ".join(repr(t.name) for t in body.inputs)
        raise InvalidInput(f"this model takes one input, {expected!r}; got {given}")
    tensor = body.inputs[0]
    if tensor.datatype not in NUMERIC:
        raise InvalidInput(f"input {expected!r}: datatype {tensor.datatype!r} is not numeric")
    if (tensor.parameters or {}).get("binary_data_size") is not None:
        raise InvalidInput("binary tensor data is not supported: send the tensors as JSON")
    flat = _flat(tensor.data)
    if any(not isinstance(v, int | float) or isinstance(v, bool) for v in flat):
        raise InvalidInput(f"input {expected!r}: data must be numbers")
    if any(d < 0 for d in tensor.shape) or math.prod(tensor.shape) != len(flat):
        raise InvalidInput(
            f"input {expected!r}: shape {tensor.shape} does not match its {len(flat)} values"
        )
    if state_space:
        if len(tensor.shape) > 2 or math.prod(tensor.shape[1:]) != 1:
            raise InvalidInput(f"input 'dt': shape must be [N] or [N, 1], got {tensor.shape}")
        return flat
    shape = tensor.shape if len(tensor.shape) == 2 else [1, *tensor.shape]
    if len(shape) != 2 or shape[1] != input_dim:
        raise InvalidInput(
            f"input 'x': shape must be [N, {input_dim}] (or [{input_dim}]), got {tensor.shape}"
        )
    return [flat[i : i + input_dim] for i in range(0, len(flat), input_dim)]


def _wanted(body: InferenceRequest) -> frozenset[str]:
    if body.outputs is None:
        return frozenset(OUTPUTS[:4])
    names = [o.name for o in body.outputs]
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise InvalidInput(f"unknown outputs {unknown}; the outputs are {list(OUTPUTS)}")
    return frozenset(names)


def _sampling(parameters: dict[str, Parameter]) -> tuple[int, int | None]:
    """(num_samples, seed) from the request's parameters (other parameters are ignored)."""
    samples, seed = parameters.get("num_samples", 0), parameters.get("seed")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise InvalidInput("parameter num_samples must be a non-negative integer")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidInput("parameter seed must be an integer")
    return samples, seed


def _flat(values: Any) -> list[Any]:
    """Nested lists in row-major order, flattened (the protocol accepts either form)."""
    if not isinstance(values, list):
        return [values]
    if not any(isinstance(v, list) for v in values):
        return values
    out: list[Any] = []
    for v in values:
        out.extend(_flat(v))
    return out


def _shape(value: Any) -> list[int]:
    return [len(value), *_shape(value[0])] if isinstance(value, list) and value else []


def _message(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)
