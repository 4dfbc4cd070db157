"""The v1 routes: validate (pydantic), call the engine once, return a schema.

Authentication happens before the routes, in :mod:`service.api.auth`."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute

from service.api.errors import refusal
from service.api.operations import describe
from service.hosting import Engine
from service.influence import KEEP as INFLUENCE_TOP
from service.schemas import (
    CalibrationResponse,
    DecideBatchRequest,
    DecideBatchResponse,
    DecideRequest,
    DecideResponse,
    Health,
    InfluenceResponse,
    ModelInfo,
    ModelList,
    ModelSpec,
    PredictRequest,
    PredictResponse,
    Readiness,
    RewardBatchRequest,
    RewardBatchResponse,
    RewardRequest,
    RewardResponse,
    SnapshotResponse,
    UpdateRequest,
    UpdateResponse,
)

__all__ = ["ROUTES", "CountsRefusals", "router", "updates"]


def _json(answer: BaseModel, status_code: int = 200) -> Response:
    """An answer encoded once, by pydantic's serialiser: the engine built it from the response
    model, so FastAPI's second validation and encoding of it (``response_model``, which stays for
    the OpenAPI document) would only repeat the work."""
    return Response(answer.model_dump_json(), status_code, media_type="application/json")


def _raw(answer: bytes) -> Response:
    """An answer the engine encoded itself (from its tensors, or once for a kept event)."""
    return Response(answer, media_type="application/json")


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


class CountsRefusals(APIRoute):
    """A route whose bodies are updates: one refused by validation is counted as a refused
    update, under the code it is answered with (``invalid_input``, ``unsupported_media_type``),
    as the engine counts the ones it refuses itself."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def counted(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                code = refusal(request, exc)[1]
                _engine(request).refused(request.path_params.get("name", ""), code)
                raise
            except HTTPException as exc:
                if exc.status_code == 400:  # a body that is not UTF-8: answered invalid_input
                    _engine(request).refused(request.path_params.get("name", ""), "invalid_input")
                raise

        return counted


#: the largest page of ``GET /v1/models``
MAX_PAGE = 10_000

router = APIRouter()
updates = APIRouter(route_class=CountsRefusals)


@router.post("/v1/models", status_code=201, response_model=ModelInfo, **describe("create_model"))
async def create_model(spec: ModelSpec, request: Request) -> Response:
    return _json(await _engine(request).create(spec), 201)


@router.get("/v1/models", response_model=ModelList, **describe("list_models"))
async def list_models(
    request: Request,
    limit: Annotated[
        int | None,
        Query(
            ge=1,
            le=MAX_PAGE,
            description="at most this many models, by name (default: all of them)",
            openapi_examples={"a page": {"value": 100}},
        ),
    ] = None,
    after: Annotated[
        str | None,
        Query(
            max_length=128,
            description="the models whose names sort after this one (the previous page's "
            "`next_after`)",
            openapi_examples={"next page": {"value": "ctr-home"}},
        ),
    ] = None,
) -> Response:
    return _json(_engine(request).list_models(limit, after))


@router.get("/v1/models/{name}", response_model=ModelInfo, **describe("get_model"))
async def get_model(name: str, request: Request) -> Response:
    return _json(await _engine(request).info(name))


@router.delete("/v1/models/{name}", status_code=204, **describe("delete_model"))
async def delete_model(name: str, request: Request) -> Response:
    await _engine(request).delete(name)
    return Response(status_code=204)


@updates.post("/v1/models/{name}/update", response_model=UpdateResponse, **describe("update"))
async def update(name: str, body: UpdateRequest, request: Request) -> Response:
    return _raw(await _engine(request).update_json(name, body))


@router.post("/v1/models/{name}/predict", response_model=PredictResponse, **describe("predict"))
async def predict(name: str, body: PredictRequest, request: Request) -> Response:
    # Encoded from the tensors where they are computed (off the event loop when large).
    return _raw(await _engine(request).predict_json(name, body))


@router.post("/v1/models/{name}/decide", response_model=DecideResponse, **describe("decide"))
async def decide(name: str, body: DecideRequest, request: Request) -> Response:
    return _raw(await _engine(request).decide_json(name, body))


@router.post("/v1/models/{name}/reward", response_model=RewardResponse, **describe("reward"))
async def reward(name: str, body: RewardRequest, request: Request) -> Response:
    return _json(await _engine(request).reward(name, body))


@router.post(
    "/v1/models/{name}/decide/batch",
    response_model=DecideBatchResponse,
    **describe("decide_batch"),
)
async def decide_batch(name: str, body: DecideBatchRequest, request: Request) -> Response:
    return _raw(await _engine(request).decide_batch_json(name, body))


@router.post(
    "/v1/models/{name}/reward/batch",
    response_model=RewardBatchResponse,
    **describe("reward_batch"),
)
async def reward_batch(name: str, body: RewardBatchRequest, request: Request) -> Response:
    return _raw(await _engine(request).reward_batch_json(name, body))


@router.get(
    "/v1/models/{name}/calibration",
    response_model=CalibrationResponse,
    **describe("calibration"),
)
async def calibration(name: str, request: Request) -> Response:
    return _json(await _engine(request).calibration(name))


@router.get(
    "/v1/models/{name}/influence",
    response_model=InfluenceResponse,
    **describe("influence"),
)
async def influence(
    name: str,
    request: Request,
    top: Annotated[
        int,
        Query(
            ge=1,
            le=INFLUENCE_TOP,
            description="how many rows, largest first",
            openapi_examples={"five": {"value": 5}},
        ),
    ] = 10,
) -> Response:
    return _json(await _engine(request).influence(name, top))


@router.post("/v1/models/{name}/snapshot", response_model=SnapshotResponse, **describe("snapshot"))
async def snapshot(name: str, request: Request) -> Response:
    return _json(await _engine(request).snapshot(name))


@router.get("/healthz", response_model=Health, **describe("healthz"))
async def healthz() -> dict[str, bool]:
    return {"ok": True}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/readyz", response_model=Readiness, **describe("readyz"))
async def readyz(request: Request) -> JSONResponse:
    restored, store_ok = await _engine(request).readiness()
    ready = restored and store_ok
    return JSONResponse(
        {"ready": ready, "models_restored": restored, "store": store_ok},
        status_code=200 if ready else 503,
    )


router.include_router(updates)  # keeps each route's class

#: every route of both routers (``router.routes`` holds ``updates`` as one included router)
ROUTES: list[BaseRoute] = [
    *(r for r in router.routes if isinstance(r, APIRoute)),
    *updates.routes,
]
