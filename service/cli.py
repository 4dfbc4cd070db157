"""``postserve``: the command line (typer)."""

from __future__ import annotations

import logging

import typer

from service.config import Settings

__all__ = ["app"]

app = typer.Typer(add_completion=False, help="Postserve: online Bayesian inference over HTTP.")
log = logging.getLogger("postserve")


@app.callback()
def main() -> None:
    """Postserve: online Bayesian inference over HTTP."""


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="address to bind"),
    port: int = typer.Option(8000, help="port to bind"),
) -> None:
    """Run the HTTP service (settings from POSTSERVE_* environment variables)."""
    import uvicorn

    from service.api import create_app
    from service.runtime import tune_allocator

    settings = Settings()
    tune_allocator()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not settings.keys and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "no API keys configured (POSTSERVE_API_KEYS): binding 127.0.0.1 only, not %s", host
        )
        host = "127.0.0.1"
    elif not settings.keys:
        log.warning("no API keys configured (POSTSERVE_API_KEYS): every route is open on %s", host)
    where = settings.data_dir if settings.store == "sqlite" else "memory"
    log.info("postserve on http://%s:%d, store %s (%s)", host, port, settings.store, where)
    uvicorn.run(
        create_app(settings), host=host, port=port, log_level=settings.log_level, access_log=False
    )


if __name__ == "__main__":
    app()
