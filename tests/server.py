"""A real Postserve server in a subprocess, for the end-to-end tests.

``Server`` runs ``python -m service serve --port PORT`` with its settings in ``POSTSERVE_*``
environment variables, waits (bounded) for ``/readyz``, and stops it with SIGTERM (then SIGKILL)
or kills it outright with SIGKILL. The same object can be started again on the same data
directory, which is how the restart tests simulate a crash and a recovery. The server's stdout and
stderr go to a file per start (``server-N.log``), never to a pipe that could fill up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

import httpx

__all__ = ["MakeServer", "Server", "assert_clean_log", "free_port", "running"]

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A port nothing listens on now (bind to port 0 on 127.0.0.1 and let the kernel pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    """One Postserve server process at a time, on a fixed data directory."""

    def __init__(
        self,
        workdir: Path,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.extra_env = dict(env or {})
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0
        self.log_path = self.workdir / "server-0.log"
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        assert self.proc is not None, "the server is not running"
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTSERVE_")}
        env.update(
            {
                "POSTSERVE_DATA_DIR": str(self.data_dir),
                "POSTSERVE_STORE": "sqlite",
                "POSTSERVE_DEVICE": "cpu",
                "POSTSERVE_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self) -> str:
        """Start the server and wait for /readyz; returns the base URL."""
        assert self.proc is None, "already running"
        for attempt in range(3):
            self.port = free_port()
            self.starts += 1
            self.log_path = self.workdir / f"server-{self.starts}.log"
            self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in _reap)
            cmd = [sys.executable, "-m", "service", "serve", "--port", str(self.port), *self.args]
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.workdir,
                env=self.environment(),
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            if self._wait_ready():
                return self.url
            log = self.log_text()
            self.kill()
            if "address already in use" in log.lower() and attempt < 2:
                continue  # somebody took the port between free_port() and the bind: try another
            raise AssertionError(
                f"the server did not become ready within {READY_TIMEOUT_S} s; its log:\n{log}"
            )
        raise AssertionError("unreachable")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        url = f"http://127.0.0.1:{self.port}/readyz"
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code == 200:
                        return True
                time.sleep(0.1)
        return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT_S."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL: a crash, nothing gets to run."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self._reap()

    def restart(self, *, crash: bool = True) -> str:
        """Kill (or stop) the server and start a new one on the same data directory."""
        if crash:
            self.kill()
        else:
            self.stop()
        return self.start()

    def _reap(self) -> None:
        assert self.proc is not None
        self.proc.wait()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self, all_starts: bool = False) -> str:
        """The log of the current (or last) start, or of every start."""
        paths = (
            [self.workdir / f"server-{i}.log" for i in range(1, self.starts + 1)]
            if all_starts
            else [self.log_path]
        )
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def assert_clean_log(server: Server) -> None:
    """No traceback and no ERROR line in any log of this server (every start)."""
    text = server.log_text(all_starts=True)
    bad = [line for line in text.splitlines() if "Traceback" in line or " ERROR " in line]
    assert not bad, f"the server logged errors:\n{text}"


@contextlib.contextmanager
def running(
    workdir: Path, env: dict[str, str] | None = None, args: Sequence[str] = ()
) -> Iterator[Server]:
    """A started server, stopped on exit; its log is checked for errors if the body passed."""
    server = Server(workdir, env, args)
    try:
        server.start()
        yield server
    finally:
        server.stop()
    assert_clean_log(server)


#: the ``make_server`` fixture (tests/conftest.py): ``make_server(env=..., args=..., start=True)``
MakeServer = Callable[..., Server]
