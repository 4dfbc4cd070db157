"""``create_app(settings)``: the FastAPI application, everything passed in, no globals.

The store and its write lease come from ``service.store.make_backend(settings)`` unless a
``backend`` is given.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.api import docs, errors, oip
from service.api.auth import Authenticate, Keyring
from service.api.dataplane import DataPlane, hot_routes
from service.api.openapi import DESCRIPTION, document
from service.api.operations import TAGS, name_examples
from service.api.routes import ROUTES, CountsRefusals, router
from service.config import Settings
from service.hosting import Engine
from service.metrics import RequestMetrics, make_registry
from service.store import Backend, make_backend

__all__ = ["create_app"]


class BodyLimit:
    """Answers 413 to a request body over ``limit`` bytes, before anything parses it.

    A declared Content-Length is checked up front; a body without one (chunked) is read here up to
    the limit and handed on whole.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.limit:
                await self._reject(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = bool(message.get("more_body", False))
            if size > self.limit:
                await self._reject(scope, receive, send)
                return
        body: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = errors.error_response(
            413,
            "too_large",
            f"request body over the limit of {self.limit} bytes (POSTSERVE_MAX_BODY_BYTES)",
        )
        await response(scope, receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


def create_app(settings: Settings | None = None, backend: Backend | None = None) -> FastAPI:
    settings = settings or Settings()
    engine = Engine(settings, backend or make_backend(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    registry = make_registry(engine)
    keyring = Keyring(settings.keys)
    # The middleware stack, outermost first: every request is counted and timed, including
    # those refused for their size or their key.
    middleware = [
        Middleware(RequestMetrics, registry=registry, routes=ROUTES),
        Middleware(BodyLimit, limit=settings.max_body_bytes),
        Middleware(Authenticate, keyring=keyring),
        # innermost: the model-scoped POST routes, served without FastAPI's router
        Middleware(DataPlane, routes=hot_routes(ROUTES, CountsRefusals), refused=engine.refused),
    ]
    app = FastAPI(
        title="Postserve",
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
        middleware=middleware,
        docs_url=None,  # FastAPI's pages load from CDNs; docs.install serves them offline
        redoc_url=None,
        generate_unique_id_function=lambda route: route.name,  # operation ids: the functions
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.registry = registry
    app.include_router(router)
    app.include_router(oip.router)
    docs.install(app)
    errors.install(app)
    app.openapi = document(  # type: ignore[method-assign]
        app, keys=keyring.enabled, names=name_examples(), create="create_model"
    )
    return app
