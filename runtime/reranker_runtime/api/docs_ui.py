"""The interactive API docs, /docs (Swagger UI) and /redoc, served from this process.

FastAPI's own pages load their JavaScript and CSS from a CDN, so in an air-gapped cluster (or
behind a proxy that blocks jsdelivr) they render blank. TEI embeds its Swagger UI; so do we: the
assets come from the `fastapi-offline` package (Swagger UI 5, which renders OpenAPI 3.1) and are
served here under /docs/assets/. Only the files named below are served. Open, like /openapi.json.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from functools import cache
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, Response

DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"
ASSETS_PATH = "/docs/assets"
OAUTH2_REDIRECT_PATH = "/docs/oauth2-redirect"
TITLE = "reranker-runtime"

# name -> media type; nothing else under the package's static folder is served.
_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
# A day: the assets change only when the package is upgraded.
_ASSET_CACHE = "public, max-age=86400"

router = APIRouter(include_in_schema=False)


@cache
def _asset(name: str) -> bytes:
    """Read once, on first request: 2.8 MB for all four, none of it loaded by a server whose
    docs nobody opens."""
    return (files("fastapi_offline") / "static" / name).read_bytes()


def _root(request: Request) -> str:
    # root_path: behind a proxy that serves the API under a prefix (an Ingress path, say), the
    # browser must ask for the assets under that prefix too, as FastAPI's own /docs does. No
    # trailing slash: `//docs/...` would name a host.
    return str(request.scope.get("root_path", "")).rstrip("/")


def _asset_url(request: Request, name: str) -> str:
    return f"{_root(request)}{ASSETS_PATH}/{name}"


@router.get(DOCS_PATH)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{TITLE} - Swagger UI",
        oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_PATH}",
        swagger_js_url=_asset_url(request, "swagger-ui-bundle.js"),
        swagger_css_url=_asset_url(request, "swagger-ui.css"),
        swagger_favicon_url=_asset_url(request, "favicon.png"),
        swagger_ui_parameters=request.app.swagger_ui_parameters,
    )


@router.get(OAUTH2_REDIRECT_PATH)
async def swagger_ui_oauth2_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get(REDOC_PATH)
async def redoc(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{TITLE} - ReDoc",
        redoc_js_url=_asset_url(request, "redoc.standalone.js"),
        redoc_favicon_url=_asset_url(request, "favicon.png"),
        with_google_fonts=False,  # a font CDN: the page falls back to the browser's fonts
    )


def _asset_route(name: str, media_type: str) -> Callable[[], Coroutine[Any, Any, Response]]:
    async def asset() -> Response:
        headers = {"cache-control": _ASSET_CACHE}
        return Response(_asset(name), media_type=media_type, headers=headers)

    return asset


# One literal route per asset (no path parameter): HEAD, the access log's route label and the
# 404 for any other name work as for every other route.
for _name, _media_type in _ASSETS.items():
    router.add_api_route(
        f"{ASSETS_PATH}/{_name}", _asset_route(_name, _media_type), methods=["GET"]
    )
