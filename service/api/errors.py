"""Errors to responses, in one table: ``{"error": {"code": ..., "message": ...}}``."""

from __future__ import annotations

import logging
import typing
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.errors import (
    AlreadyExists,
    Forbidden,
    InvalidInput,
    InvalidSpec,
    LimitReached,
    NotFound,
    NotOwner,
    NotReady,
    PostserveError,
    StepRejected,
    StoreUnavailable,
    TooLarge,
    Unauthorized,
    VersionConflict,
)

__all__ = [
    "METHODS",
    "NOT_UTF8",
    "STATUS",
    "allowed_methods",
    "error_response",
    "install",
    "refusal",
    "response_for",
]

log = logging.getLogger("postserve.api")

#: the answer to a body FastAPI cannot decode at all (its 400: bytes that are not UTF-8)
NOT_UTF8 = "the request body is not JSON: its bytes are not UTF-8 text"

#: Most specific class first.
STATUS: list[tuple[type[PostserveError], int]] = [
    (TooLarge, 413),
    (InvalidInput, 422),
    (InvalidSpec, 422),
    (StepRejected, 422),
    (NotFound, 404),
    (AlreadyExists, 409),
    (LimitReached, 409),
    (NotOwner, 409),
    (VersionConflict, 409),
    (Unauthorized, 401),
    (Forbidden, 403),
    (StoreUnavailable, 503),
    (NotReady, 503),
]


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def _status_of(exc: PostserveError) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def response_for(exc: PostserveError) -> JSONResponse:
    """The response for an error, by the table above."""
    return error_response(_status_of(exc), exc.code, exc.message)


async def _postserve(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PostserveError)
    return response_for(exc)


def _required_fields(endpoint: object) -> list[str]:
    """The required fields of the body model an endpoint takes (none if it takes none)."""
    try:
        hints = typing.get_type_hints(endpoint)
    except (TypeError, NameError):
        return []
    for hint in hints.values():
        if isinstance(hint, type) and issubclass(hint, BaseModel):
            return [n for n, f in hint.model_fields.items() if f.is_required()]
    return []


def refusal(request: Request, exc: RequestValidationError) -> tuple[int, str, str]:
    """(status, code, message) for a request whose parameters or body did not validate.

    A body that is not JSON (a form, text) is 415 naming the content type; an empty one names the
    fields the body must have; otherwise 422 with the first few failures, each with its place.
    """
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";")[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        return (
            415,
            "unsupported_media_type",
            (f"the body must be JSON sent with content-type: application/json, got {ctype!r}"),
        )
    errors = exc.errors()
    if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") == "missing" for e in errors):
        required = _required_fields(request.scope.get("endpoint"))
        wants = f" with {', '.join(required)}" if required else ""
        return 422, "invalid_input", f"the request body is empty: send a JSON object{wants}"
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return 422, "invalid_input", "; ".join(parts) or "invalid request body"


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(*refusal(request, exc))


#: the methods a 405's ``Allow`` may name (OPTIONS, TRACE and CONNECT are never routed)
METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """The methods some route answers on this request's path (HEAD with GET): the ``Allow`` of
    a 405, which Starlette fills from the first route that matches the path alone."""
    routes = request.app.router.routes
    return [
        method
        for method in METHODS
        if any(r.matches({**request.scope, "method": method})[0] == Match.FULL for r in routes)
    ]


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 400:  # FastAPI could not decode the body at all (bytes that are not UTF-8)
        return error_response(422, "invalid_input", NOT_UTF8)
    if status == 405:
        allow = allowed_methods(request)
        return error_response(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.url.path}; allowed: {', '.join(allow)}",
            {"Allow": ", ".join(allow)},
        )
    code = {404: "not_found"}.get(status, "http_error")
    return error_response(status, code, str(exc.detail), exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal", "internal server error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(PostserveError, _postserve)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
