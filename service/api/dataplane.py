"""The data plane: the model-scoped POST routes (``/v1/models/{name}/update``, ``predict``,
``decide``, ``reward`` and the batches) dispatched without FastAPI's router.

A request to one of them costs FastAPI's router a scan of every route's regex, its dependency
solver and its request wrapper: together more than the whole step of a small model
(``benchmarks/README.md``). :class:`DataPlane` is the innermost middleware: it splits the path
once, reads the body, parses and validates it exactly as FastAPI would (the same JSON parser's
semantics, the same pydantic model, errors at ``("body", ...)``, the same answers through
:func:`service.api.errors.refusal`), and calls the route's own endpoint function, so the routes
in :mod:`service.api.routes` stay the one definition of what each operation does (and of the
OpenAPI document). Every other request goes on to FastAPI.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import pydantic_core
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import NOT_UTF8, error_response, refusal, response_for
from service.errors import PostserveError

__all__ = ["PREFIX", "DataPlane", "HotRoute", "hot_routes"]

PREFIX = "/v1/models/"

Endpoint = Callable[..., Coroutine[Any, Any, Response]]


@dataclass(frozen=True)
class HotRoute:
    """One route of the data plane: its FastAPI route (its template for the metrics, its body
    field for validation, the required fields of an empty body) and its endpoint."""

    route: APIRoute
    endpoint: Endpoint
    counts_refusals: bool  # a refused body counts as a refused update (``CountsRefusals``)


def hot_routes(routes: Sequence[BaseRoute], counting: type[APIRoute]) -> dict[str, HotRoute]:
    """The POST routes ``/v1/models/{name}/<op>`` whose endpoint takes ``(name, body, request)``
    and nothing else, by ``<op>`` (``update``, ``decide/batch``, ...); the routes of class
    ``counting`` count refusals."""
    found: dict[str, HotRoute] = {}
    for route in routes:
        if not isinstance(route, APIRoute) or route.methods != {"POST"}:
            continue
        op = route.path.removeprefix(PREFIX + "{name}/")
        params = set(inspect.signature(route.endpoint).parameters)
        if op == route.path or params != {"name", "body", "request"} or route.body_field is None:
            continue
        found[op] = HotRoute(route, route.endpoint, isinstance(route, counting))
    return found


def _is_json(ctype: str) -> bool:
    """Whether FastAPI parses a body of this content type as JSON: application/json or +json."""
    media = ctype.split(";")[0].strip().lower()
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


def _loads(raw: bytes) -> Any:
    """``json.loads(raw)`` (what FastAPI parses bodies with), 6x faster on numeric bodies.

    pydantic-core's parser gives what ``json`` gives (big integers exact, NaN and Infinity
    accepted); what it refuses (lone surrogates, UTF-16 and UTF-32, malformed text) goes to
    ``json`` itself, so the result, or the error and its position, is always ``json``'s."""
    try:
        return pydantic_core.from_json(raw)
    except ValueError:
        return json.loads(raw)


class _Undecodable(Exception):
    """A JSON body that could not be decoded at all: FastAPI answers 400 (``errors._http``)."""


def _invalid(errors: list[dict[str, Any]], body: Any = None) -> RequestValidationError:
    return RequestValidationError(errors, body=body)


class DataPlane:
    """ASGI middleware: the requests for ``routes`` answered here, all else passed to ``app``.

    ``refused(name, code)`` counts an update refused by validation, as ``CountsRefusals`` does
    for the same route under FastAPI."""

    def __init__(
        self, app: ASGIApp, routes: dict[str, HotRoute], refused: Callable[[str, str], None]
    ) -> None:
        self.app, self.routes, self.refused = app, routes, refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] == "http" and scope["method"] == "POST" and path.startswith(PREFIX):
            name, sep, op = path[len(PREFIX) :].partition("/")
            hot = self.routes.get(op)
            if hot is not None and name and sep:
                await self._serve(hot, name, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(
        self, hot: HotRoute, name: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        # what Starlette's router would set: the metrics read the route's template from it
        scope.update(route=hot.route, endpoint=hot.endpoint, path_params={"name": name})
        request = Request(scope, receive)
        response: Response
        try:
            body = await self._body(hot, request)
        except RequestValidationError as exc:
            status, code, message = refusal(request, exc)
            response = error_response(status, code, message)
            if hot.counts_refusals:
                self.refused(name, code)
        except _Undecodable:  # FastAPI's 400, which errors._http answers so
            response = error_response(422, "invalid_input", NOT_UTF8)
            if hot.counts_refusals:
                self.refused(name, "invalid_input")
        else:
            try:
                response = await hot.endpoint(name=name, body=body, request=request)
            except PostserveError as exc:
                response = response_for(exc)
        await response(scope, receive, send)

    @staticmethod
    async def _body(hot: HotRoute, request: Request) -> Any:
        """The body validated as FastAPI validates it: parsed when its content type is JSON, the
        raw bytes under any other (or none), missing when empty; errors at ``("body", ...)``."""
        raw = await request.body()
        if not raw:
            raise _invalid(
                [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
            )
        value: Any = raw
        ctype = request.headers.get("content-type")
        if ctype and _is_json(ctype):
            try:
                value = _loads(raw)
            except json.JSONDecodeError as exc:
                error = {
                    "type": "json_invalid",
                    "loc": ("body", exc.pos),
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": exc.msg},
                }
                raise _invalid([error], exc.doc) from exc
            except Exception as exc:  # not UTF-8 (or nested past the parser's depth)
                raise _Undecodable from exc
        field = hot.route.body_field
        assert field is not None  # hot_routes takes only routes with a body
        body, errors = field.validate(value, {}, loc=("body",))
        if errors:
            raise _invalid(errors, value)
        return body
