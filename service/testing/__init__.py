"""Test support shared by ``tests/`` and ``benchmarks/``: servers to run Postserve against, and spec
builders. Not used by the service itself.

* :class:`Server` runs a real server process (``python -m service serve``, or any command taking
  ``--port``) on a free port with its settings in ``POSTSERVE_*`` variables, waits for ``/readyz``,
  and stops, kills and restarts it on the same data directory; :func:`running` is a started one
  whose log is checked on exit. Benchmarks pass a command prefix (CPU pinning), their own command
  and ``inherit_env=True``.
* :class:`InProcessClient` serves an app in this process through ``httpx.ASGITransport`` (its
  lifespan run, the engine ready): a synchronous ``httpx.Client`` with no process and no socket;
  :func:`in_process` makes one from ``Settings(store="memory", device="cpu", ...)``.
* :class:`RedisServer` is a real ``redis-server`` with AOF on, on a free port.
* :func:`updates_until_killed` posts concurrent updates to a server and SIGKILLs it mid-stream.
* :func:`linear_spec` and :func:`mlp_spec` build the JSON body of ``POST /v1/models``.

Only the standard library and httpx are imported up front; anyio, torch and the app come in when
an :class:`InProcessClient` is made, and pytest only when ``redis-server`` is missing (to skip).
"""

from service.testing.inprocess import InProcessClient, MakeAppClient, app_settings, in_process
from service.testing.load import Acked, updates_until_killed
from service.testing.redis import RedisServer
from service.testing.servers import (
    SERVE,
    MakeServer,
    Server,
    assert_clean_log,
    free_port,
    running,
    wait_ready,
)
from service.testing.specs import linear_spec, mlp_spec

__all__ = [
    "SERVE",
    "Acked",
    "InProcessClient",
    "MakeAppClient",
    "MakeServer",
    "RedisServer",
    "Server",
    "app_settings",
    "assert_clean_log",
    "free_port",
    "in_process",
    "linear_spec",
    "mlp_spec",
    "running",
    "updates_until_killed",
    "wait_ready",
]
