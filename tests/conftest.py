"""Shared fixtures: ``make_server`` starts real Postserve processes (see tests/server.py)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from server import MakeServer, Server, assert_clean_log


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
