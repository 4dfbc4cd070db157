"""The app served in this process: a synchronous ``httpx.Client`` with no process and no socket.

:class:`InProcessClient` serves an app through ``httpx.ASGITransport`` (its lifespan run, the
engine ready); :func:`in_process` makes one from ``Settings(store="memory", device="cpu", ...)``.
anyio, torch and the app are imported only when a client is made.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

from service.testing.servers import READY_TIMEOUT_S, assert_clean_log

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal
    from starlette.applications import Starlette

    from service.config import Settings

__all__ = ["InProcessClient", "MakeAppClient", "app_settings", "in_process"]


class _ErrorRecords(logging.Handler):
    """Keeps the formatted ERROR (and worse) records of a logger."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class _PortalTransport(httpx.BaseTransport):
    """A synchronous transport that runs each request through ``httpx.ASGITransport`` on the
    event loop of a blocking portal (the loop the app's lifespan runs on)."""

    def __init__(self, app: Starlette, portal: BlockingPortal) -> None:
        self._asgi = httpx.ASGITransport(app=app)
        self._portal = portal

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()  # a sync body (an iterator, say) becomes bytes, which ASGITransport takes
        return self._portal.call(self._handle, request)

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        import anyio

        timeout = request.extensions.get("timeout", {}).get("read")
        try:
            with anyio.fail_after(timeout):
                response = await self._asgi.handle_async_request(request)
                raw = b"".join([part async for part in response.aiter_raw()])
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"no answer within {timeout} s", request=request) from exc
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=httpx.ByteStream(raw),
            extensions=response.extensions,
        )

    def close(self) -> None:
        """Nothing to close: the app's lifespan belongs to the :class:`InProcessClient`."""


class InProcessClient(httpx.Client):
    """A synchronous ``httpx.Client`` for an app served in this process.

    An event loop runs in a thread (``anyio.from_thread.start_blocking_portal``); the app's
    lifespan is entered on it (``ASGITransport`` runs none), and the client waits until
    ``GET /readyz`` is 200. Each request runs through ``httpx.ASGITransport`` on that loop, so
    the app sees one loop for its whole life, as under uvicorn. ``close()`` (or leaving the
    ``with`` block) runs the lifespan's shutdown and stops the loop. ERROR records of the
    ``postserve`` loggers while it is open are kept in ``errors_logged`` (see
    :func:`assert_clean_log`; leaving a ``with`` block without an exception asserts there are
    none), and torch's intra-op thread count, which the engine sets, is put back.

    ``transport`` serves the same app to another client, e.g.
    ``service.client.Client(str(c.base_url), transport=c.transport)``.
    """

    def __init__(
        self,
        app: Starlette,
        *,
        base_url: str = "http://postserve",
        timeout: float = 30.0,
        ready_timeout: float = READY_TIMEOUT_S,
        **kwargs: Any,
    ) -> None:
        import anyio.from_thread
        import torch

        self.app = app
        self._errors = _ErrorRecords()
        self._stack = contextlib.ExitStack()
        self._stack.callback(torch.set_num_threads, torch.get_num_threads())
        logger = logging.getLogger("postserve")
        logger.addHandler(self._errors)
        self._stack.callback(logger.removeHandler, self._errors)
        try:
            portal = self._stack.enter_context(anyio.from_thread.start_blocking_portal())
            self.transport = _PortalTransport(app, portal)
            super().__init__(transport=self.transport, base_url=base_url, timeout=timeout, **kwargs)
            lifespan = app.router.lifespan_context(app)
            self._stack.enter_context(portal.wrap_async_context_manager(lifespan))
            self._wait_ready(ready_timeout)
        except BaseException:
            self._stack.close()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (r := self.get("/readyz")).status_code != 200:
            if time.monotonic() > deadline:
                raise AssertionError(f"the app was not ready within {timeout} s: {r.text}")
            time.sleep(0.01)

    @property
    def errors_logged(self) -> list[str]:
        return list(self._errors.lines)

    def close(self) -> None:
        """Close the client, run the app's shutdown and stop the event loop."""
        try:
            super().close()
        finally:
            self._stack.close()

    def __enter__(self) -> InProcessClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        self.close()
        if exc_type is None:
            assert_clean_log(self)


def app_settings(**overrides: Any) -> Settings:
    """``Settings(store="memory", device="cpu", **overrides)``, reading no ``POSTSERVE_*``
    variable of this process (as a :class:`Server`'s process gets none of them)."""
    return _given_settings()(**{"store": "memory", "device": "cpu", **overrides})


@functools.cache
def _given_settings() -> type[Settings]:
    """Settings that come from the constructor's arguments only."""
    from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

    from service.config import Settings

    class GivenSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings,)

    return GivenSettings


def in_process(**overrides: Any) -> InProcessClient:
    """An :class:`InProcessClient` for ``create_app(app_settings(**overrides))``."""
    from service.api import create_app

    return InProcessClient(create_app(app_settings(**overrides)))


#: the ``app_client`` fixture (tests/conftest.py): ``app_client(**settings)``
MakeAppClient = Callable[..., InProcessClient]
