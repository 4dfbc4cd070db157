"""``create_app(settings)``: the FastAPI application, everything passed in, no globals."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.api import errors
from service.api.auth import Keyring
from service.api.routes import router
from service.config import Settings
from service.engine import Engine
from service.store import MemoryStore, SQLiteStore, Store

__all__ = ["create_app", "make_store"]


def make_store(settings: Settings) -> Store:
    if settings.store == "memory":
        return MemoryStore(settings.idempotency_ttl_s)
    return SQLiteStore(settings.data_dir / "postserve.sqlite3", settings.idempotency_ttl_s)


class BodyLimit:
    """Answers 413 to a request body over ``limit`` bytes, before the route parses it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooBig
            return message

        try:
            await self.app(scope, limited, send)
        except _TooBig:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = errors.error_response(
            413,
            "too_large",
            f"request body over the limit of {self.limit} bytes (POSTSERVE_MAX_BODY_BYTES)",
        )
        await response(scope, receive, send)


class _TooBig(Exception):
    pass


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    settings = settings or Settings()
    engine = Engine(settings, store or make_store(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="Postserve", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.keyring = Keyring(settings.keys)
    app.include_router(router)
    errors.install(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
