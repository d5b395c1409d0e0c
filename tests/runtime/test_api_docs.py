"""/docs and /redoc over HTTP against the real app: the pages work without the internet (every
script, stylesheet and icon they load is served by this server), stay open behind --api-key,
and follow a proxy's path prefix."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from reranker_runtime.api import create_app
from reranker_runtime.engines.torch_engine import TorchEngine
from runtime.api_support import serving, settings_for

pytestmark = pytest.mark.asyncio

# What a browser fetches from a page: <script src>, <link href>, Swagger's `url:` and ReDoc's
# spec-url (the schema).
_FETCHED = re.compile(r"""(?:src|href|spec-url)="([^"]*)"|url: '([^']*)'""")


def _fetched(html: str) -> list[str]:
    return [a or b for a, b in _FETCHED.findall(html)]


@pytest.mark.parametrize(
    ("page", "renderer"),
    [("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")],
)
async def test_docs_pages_load_only_from_this_server(
    xlmr_reranker: Path, xlmr_engine: TorchEngine, page: str, renderer: str
) -> None:
    # With an API key: the docs, their assets and the schema they read are all open.
    async with serving(settings_for(xlmr_reranker, api_key="k"), xlmr_engine) as client:
        html = await client.get(page)
        assert html.status_code == 200, html.text
        urls = _fetched(html.text)
        assert f"/docs/assets/{renderer}" in urls and "/openapi.json" in urls, urls
        # Nothing from another host (a CDN or a font service): air-gapped clusters render it.
        assert all(u.startswith("/") and not u.startswith("//") for u in urls), urls
        for url in urls:
            resp = await client.get(url)
            assert resp.status_code == 200, (url, resp.text[:200])
            assert len(resp.content) > 500, url
        script = await client.get(f"/docs/assets/{renderer}")
        assert script.headers["content-type"].startswith("text/javascript")
        assert "max-age" in script.headers["cache-control"]
        # HEAD as for every GET route (monitors, link checkers): the headers, no body.
        head = await client.head(f"/docs/assets/{renderer}")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(script.content))


async def test_swagger_ui_renders_the_schemas_openapi_version(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    # FastAPI publishes OpenAPI 3.1, which Swagger UI renders from version 5 on (4.x shows
    # "Unable to render this definition").
    async with serving(settings_for(xlmr_reranker), xlmr_engine) as client:
        assert (await client.get("/openapi.json")).json()["openapi"].startswith("3.1")
        bundle = (await client.get("/docs/assets/swagger-ui-bundle.js")).text
        # Swagger UI's own version (the bundle also holds React's and others').
        version = re.search(r'PACKAGE_VERSION:"(\d+)\.', bundle)
        assert version is not None and int(version.group(1)) >= 5


async def test_docs_assets_are_a_fixed_list(xlmr_reranker: Path, xlmr_engine: TorchEngine) -> None:
    async with serving(settings_for(xlmr_reranker), xlmr_engine) as client:
        for name in ("core.py", "__init__.py", "..%2F..%2Fapi%2Fapp.py", "x.js"):
            resp = await client.get(f"/docs/assets/{name}")
            assert resp.status_code == 404, name
            assert resp.json()["error_type"] == "NotFound"


async def test_docs_follow_the_proxys_path_prefix(xlmr_reranker: Path) -> None:
    # Served under a prefix (uvicorn --root-path, or the app mounted in another), the browser
    # must ask for the assets and the schema under that prefix too. (The pages need no model:
    # no lifespan runs here.)
    app = create_app(settings_for(xlmr_reranker))
    for root, prefix in (("/reranker", "/reranker/"), ("/reranker/", "/reranker/"), ("/", "/")):
        transport = httpx.ASGITransport(app=app, root_path=root)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for page in ("/docs", "/redoc"):
                urls = _fetched((await client.get(page)).text)
                assert urls and all(u.startswith(prefix) for u in urls), (root, urls)
                # Never `//docs/...` (another host) or `/reranker//docs`.
                assert not any("//" in u for u in urls), (root, urls)
