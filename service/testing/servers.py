"""Real Postserve server processes for tests and benchmarks: free ports, start, stop, kill.

:class:`Server` runs ``python -m service serve`` (or any command taking ``--port``) on a free
port with its settings in ``POSTSERVE_*`` variables, waits for ``/readyz``, and stops, kills and
restarts it on the same data directory; :func:`running` is a started one whose log is checked on
exit. Benchmarks pass a command prefix (CPU pinning), their own command and ``inherit_env=True``.
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
from typing import IO, TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from service.testing.inprocess import InProcessClient

__all__ = [
    "READY_TIMEOUT_S",
    "SERVE",
    "MakeServer",
    "Server",
    "assert_clean_log",
    "free_port",
    "running",
    "wait_ready",
]

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
#: the server command of :class:`Server` (``--port PORT`` and the extra arguments follow)
SERVE: tuple[str, ...] = (sys.executable, "-m", "service", "serve")
#: the settings a test server gets unless ``inherit_env``: what it needs and nothing of the caller's
TEST_ENV = {"POSTSERVE_STORE": "sqlite", "POSTSERVE_DEVICE": "cpu", "POSTSERVE_THREADS": "1"}


def free_port() -> int:
    """A port nothing listens on now (bind to port 0 on 127.0.0.1 and let the kernel pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(
    url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = READY_TIMEOUT_S
) -> bool:
    """Poll ``{url}/readyz`` until it answers 200 (True), ``proc`` exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/readyz").status_code == 200:
                    return True
            time.sleep(0.1)
    return False


# -- a server process --------------------------------------------------------------------------


class Server:
    """One server process at a time, on a fixed data directory (``workdir/data``).

    The command is ``[*prefix, *command, "--port", PORT, *args]``, run in ``cwd`` (default:
    ``workdir``) with stdout and stderr to ``workdir/server-N.log`` (one file per start, never a
    pipe that could fill up). Its environment is this process's without any ``POSTSERVE_*``
    variable, plus :data:`TEST_ENV`, or with ``inherit_env=True`` this process's as it is; then
    ``POSTSERVE_DATA_DIR`` and ``env`` on top.
    """

    def __init__(
        self,
        workdir: Path,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        *,
        command: Sequence[str] = SERVE,
        prefix: Sequence[str] = (),
        cwd: Path | None = None,
        inherit_env: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.extra_env = dict(env or {})
        self.args = list(args)
        self.command = list(command)
        self.prefix = list(prefix)
        self.cwd = self.workdir if cwd is None else Path(cwd)
        self.inherit_env = inherit_env
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None  # of the last process reaped
        self.port = 0
        self.starts = 0
        self.log_path = self.workdir / "server-0.log"
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        assert self.proc is not None, "the server is not running"
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the server is not running"
        return self.proc.pid

    def environment(self) -> dict[str, str]:
        if self.inherit_env:
            env = dict(os.environ)
        else:
            env = {k: v for k, v in os.environ.items() if not k.startswith("POSTSERVE_")}
            env.update(TEST_ENV)
        env.update({"POSTSERVE_DATA_DIR": str(self.data_dir), "PYTHONUNBUFFERED": "1"})
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = READY_TIMEOUT_S, port: int | None = None) -> str:
        """Start the server and wait (at most ``timeout`` s) for /readyz; returns the base URL.
        ``port``: listen there (a replica coming back at its address) instead of a free port."""
        assert self.proc is None, "already running"
        for attempt in range(3):
            self.port = free_port() if port is None else port
            self.starts += 1
            self.log_path = self.workdir / f"server-{self.starts}.log"
            self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in _reap)
            cmd = [*self.prefix, *self.command, "--port", str(self.port), *self.args]
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.cwd,
                env=self.environment(),
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            if wait_ready(self.url, self.proc, timeout):
                return self.url
            log = self.log_text()
            self.kill()
            if "address already in use" in log.lower() and attempt < 2 and port is None:
                continue  # somebody took the port between free_port() and the bind: try another
            raise AssertionError(
                f"the server did not become ready within {timeout} s; its log:\n{log}"
            )
        raise AssertionError("unreachable")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout`` s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
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
        self.returncode = self.proc.wait()
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


def assert_clean_log(server: Server | InProcessClient) -> None:
    """No traceback and no ERROR line in any log of this server (every start), or no ERROR record
    logged by the service while this in-process client was open."""
    if not isinstance(server, Server):
        assert not server.errors_logged, "the app logged errors:\n" + "\n".join(
            server.errors_logged
        )
        return
    text = server.log_text(all_starts=True)
    bad = [line for line in text.splitlines() if "Traceback" in line or " ERROR " in line]
    assert not bad, f"the server logged errors:\n{text}"


#: the ``make_server`` fixture (tests/conftest.py): ``make_server(env=..., args=..., start=True)``
MakeServer = Callable[..., Server]
