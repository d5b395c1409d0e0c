"""API-key check for the protected routes: every route of a router built with
`route_class=ProtectedRoute` (the inference routers use its subclass `InferenceRoute`, and /info
has its own protected router), so a route added to those routers cannot be left open.

With `--api-key`, protected routes require `Authorization: Bearer <key>` (OpenAI/Cohere/Jina
clients) or `Authorization: Api-Key <key>` (Baseten/BEI clients). The check runs before the body
is read or parsed, so an unauthenticated caller gets 401 and learns nothing about the request
schema. The comparison is constant-time. Open: /health, /live (probes), /metrics (scraped from
inside the cluster; aggregate numbers only), /openapi.json, /api-doc/openapi.json, /docs and /redoc (the
public schema and its pages, api/docs_ui.py).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from reranker_runtime.api.errors import error_response
from reranker_runtime.errors import UnauthorizedError

_SCHEMES = ("bearer", "api-key")


def check_authorization(header: str | None, api_key: str) -> UnauthorizedError | None:
    """None when `header` carries the key; otherwise the error to answer with."""
    if not header:
        return UnauthorizedError(
            "missing API key: send 'Authorization: Bearer <key>' or 'Authorization: Api-Key <key>'"
        )
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() not in _SCHEMES or not token.strip():
        return UnauthorizedError(
            "malformed Authorization header: expected 'Bearer <key>' or 'Api-Key <key>'"
        )
    # compare_digest on bytes: constant-time regardless of where the strings differ.
    if not hmac.compare_digest(token.strip().encode("utf-8"), api_key.encode("utf-8")):
        return UnauthorizedError("invalid API key")
    return None


class ProtectedRoute(APIRoute):
    """A route that answers 401 without the server's API key (when one is set)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            api_key: str | None = request.app.state.api_key
            if api_key:
                error = check_authorization(request.headers.get("authorization"), api_key)
                if error is not None:
                    return error_response(error, path=request.url.path)
            return await handler(request)

        return checked


def all_routes(routes: Iterable[BaseRoute]) -> list[BaseRoute]:
    """Every route, looking into included routers (FastAPI keeps those as one entry that holds
    the router it included, `original_router`)."""
    out: list[BaseRoute] = []
    for route in routes:
        included = getattr(route, "original_router", None)
        out.extend(all_routes(included.routes) if included is not None else [route])
    return out


def protected_operations(routes: Iterable[BaseRoute]) -> frozenset[tuple[str, str]]:
    """(path, method) of every protected route: `/` is open for GET and protected for POST."""
    return frozenset(
        (r.path, method.lower())
        for r in all_routes(routes)
        if isinstance(r, ProtectedRoute)
        for method in (r.methods or ())
    )


def document_api_key(
    schema: dict[str, Any], protected: frozenset[tuple[str, str]]
) -> dict[str, Any]:
    """Declare the key in an OpenAPI schema: both schemes, required on the protected routes, so
    /docs offers "Authorize" and generated clients send the header."""
    components = schema.setdefault("components", {})
    components["securitySchemes"] = {
        "Bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "Authorization: Bearer <key>",
        },
        "ApiKey": {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "Baseten/BEI style: Authorization: Api-Key <key>",
        },
    }
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if (path, method) in protected:
                operation["security"] = [{"Bearer": []}, {"ApiKey": []}]
    return schema
