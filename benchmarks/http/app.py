"""The service's own app plus a no-op route, for measuring overhead ratios on one server."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from service.api import create_app
from service.config import Settings
from service.runtime import tune_allocator, tune_gc


class NoopBody(BaseModel):
    x: list[list[float]]


def app() -> FastAPI:
    """uvicorn factory: ``uvicorn --factory benchmarks.http.app:app``."""
    tune_allocator()
    tune_gc()
    application = create_app(Settings())

    @application.post("/bench/noop")
    async def noop(body: NoopBody) -> dict[str, bool]:
        return {"ok": True}

    return application
