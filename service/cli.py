"""``postserve``: the command line (typer)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from service.config import Settings

__all__ = ["app"]

app = typer.Typer(add_completion=False, help="Postserve: online Bayesian inference over HTTP.")
log = logging.getLogger("postserve")
_REPORT_PNG = Path("report.png")


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
    from service.runtime import tune_allocator, tune_gc

    settings = Settings()
    tune_allocator()
    tune_gc()
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


@app.command()
def report(
    name: str = typer.Argument(..., help="the model"),
    out: Annotated[Path, typer.Option(help="PNG file to write")] = _REPORT_PNG,
    url: str = typer.Option(
        "http://127.0.0.1:8000", envvar="POSTSERVE_URL", help="the server's base URL"
    ),
    api_key: str | None = typer.Option(
        None, envvar="POSTSERVE_API_KEY", help="a key with the read scope, if keys are on"
    ),
) -> None:
    """Draw a model's calibration window (reliability or PIT, coverage over time) and its most
    influential recent observations as a PNG."""
    from service.client import Client, PostserveHTTPError
    from service.report import draw_report

    try:
        with Client(url, api_key=api_key) as client:
            cal = client.calibration(name)
            influence = client.influence(name, top=20)
    except PostserveHTTPError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    try:
        draw_report(cal, out, influence)
    except ImportError as exc:
        typer.echo(
            "error: the report needs matplotlib; in the repository run "
            "`.venv/bin/pip install -e '.[report]'` (or `pip install matplotlib` in this Python)",
            err=True,
        )
        raise typer.Exit(1) from exc
    s = cal.summary
    typer.echo(f"wrote {out}: {name} at version {cal.version}, {s.observations} observations")


if __name__ == "__main__":
    app()
