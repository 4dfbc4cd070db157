"""Shared fixtures: ``make_server`` starts real Postserve processes, ``app_client`` serves the
app in this process (both from service/testing.py)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from service.testing import (
    InProcessClient,
    MakeAppClient,
    MakeServer,
    Server,
    assert_clean_log,
    in_process,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked ``slow`` first (a stable sort, so each module keeps its order): with the
    suite split over two processes (``.ci/test``), the longest start at once instead of one of
    them finishing last, alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[MakeServer]:
    """``make_server(env=..., args=..., start=True)``: a Server on its own data directory under
    tmp_path, stopped at teardown (whose logs must then hold no traceback)."""
    made: list[Server] = []

    def make(
        env: dict[str, str] | None = None, args: Sequence[str] = (), start: bool = True
    ) -> Server:
        server = Server(tmp_path / f"server{len(made)}", env, args)
        made.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in made:
        server.stop()
    for server in made:
        assert_clean_log(server)


@pytest.fixture
def app_client() -> Iterator[MakeAppClient]:
    """``app_client(**settings)``: a synchronous httpx client for
    ``create_app(Settings(store="memory", device="cpu", **settings))`` served in this process
    (lifespan run, engine ready; no environment variable read), closed at teardown (no ERROR
    may have been logged)."""
    made: list[InProcessClient] = []

    def make(**settings: Any) -> InProcessClient:
        client = in_process(**settings)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
    for client in made:
        assert_clean_log(client)
