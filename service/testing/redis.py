"""A real ``redis-server`` for tests and benchmarks, on a free port, persisting to its own folder.

pytest is imported only to skip a test when ``redis-server`` is not installed.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import NoReturn

from service.testing.servers import free_port

__all__ = ["RedisServer"]


def _skip(reason: str) -> NoReturn:
    """Skip the calling test (pytest is imported only here); outside pytest, raise."""
    try:
        import pytest
    except ImportError:
        raise RuntimeError(reason) from None
    pytest.skip(reason)


class RedisServer:
    """A real ``redis-server`` on a free port, persisting to ``workdir``.

    ``RedisServer(dir, appendfsync="always")`` starts redis with AOF on (``--appendonly yes``),
    so it can be SIGKILLed and started again on the same folder, which is how the tests check what
    survives a Redis crash. Skips the calling test when ``redis-server`` is not installed.
    """

    def __init__(
        self, workdir: Path, appendfsync: str = "always", password: str | None = None
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            _skip("redis-server is not installed")
        self.binary = binary
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.appendfsync = appendfsync
        self.password = password
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = False  # once started, restarts keep the port (the tests' URLs name it)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start it (again, on the same port and folder, after ``kill`` or ``stop``). On its
        first start, a port taken between ``free_port()`` and redis's bind (by another test
        process) is given up for another."""
        for attempt in range(3):
            if self._start() or self.started or attempt == 2:
                break
            self.proc, self.port = None, free_port()
        self.started = True
        return self

    def _start(self) -> bool:
        """Start redis and wait until it answers; False if it exited because its port was
        taken."""
        assert self.proc is None
        log = self.dir / "redis.log"
        if not self.started:
            log.unlink(missing_ok=True)  # a failed first try's
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                self.appendfsync,
                "--logfile",
                str(log),
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = log.read_text(errors="replace") if log.exists() else ""
                if "address already in use" in text.lower():
                    return False
                raise AssertionError(f"redis-server exited: {text}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(64)[:1] in (b"+", b"-"):  # PONG, or NOAUTH when a password is set
                        return True
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"redis-server did not start: {log.read_text(errors='replace')}")

    def kill(self) -> None:
        """SIGKILL: what was not yet written to the AOF is lost."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
