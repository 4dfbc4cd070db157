"""``/docs`` (Swagger UI) and ``/redoc``, served with no internet.

FastAPI's own pages load their JavaScript, CSS, favicon and (ReDoc) fonts from CDNs, so they are
blank on a machine that cannot reach them. These pages load the same files from
``/docs/assets``, served from the ``fastapi-offline`` package (Swagger UI 5, which renders the
OpenAPI 3.1 documents FastAPI writes, and ReDoc 2); nothing on them is fetched from elsewhere.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["ASSETS", "ASSETS_URL", "install"]

#: the directory of the Swagger UI and ReDoc files (swagger-ui-bundle.js, swagger-ui.css,
#: redoc.standalone.js, favicon.png)
ASSETS = Path(str(files("fastapi_offline"))) / "static"
ASSETS_URL = "/docs/assets"
#: Swagger UI settings: no request to the online validator (its badge), models collapsed
SWAGGER_PARAMETERS = {"validatorUrl": None, "defaultModelsExpandDepth": 0}


def install(app: FastAPI) -> None:
    """Serve ``/docs``, ``/redoc`` and their assets (the app must be made with
    ``docs_url=None, redoc_url=None``, which turns FastAPI's CDN pages off)."""
    assert app.openapi_url is not None
    openapi_url, title = app.openapi_url, app.title
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")

    def root(request: Request) -> str:
        return str(request.scope.get("root_path", ""))

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        base = root(request)
        return get_swagger_ui_html(
            openapi_url=base + openapi_url,
            title=f"{title} - Swagger UI",
            swagger_js_url=f"{base}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{base}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{base}{ASSETS_URL}/favicon.png",
            swagger_ui_parameters=SWAGGER_PARAMETERS,
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        base = root(request)
        return get_redoc_html(
            openapi_url=base + openapi_url,
            title=f"{title} - ReDoc",
            redoc_js_url=f"{base}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{base}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
