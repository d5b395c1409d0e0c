"""API-key check for the inference routes.

With `--api-key`, protected routes require `Authorization: Bearer <key>` (OpenAI/Cohere/Jina
clients) or `Authorization: Api-Key <key>` (Baseten/BEI clients). It runs as ASGI middleware,
before the body is read or parsed, so an unauthenticated caller gets 401 and learns nothing
about the request schema. The comparison is constant-time.

Protected: /rerank, /predict, /v1/rerank, /v2/rerank, /tokenize, /info (it reveals the model
and the server's limits). Open: /health, /live (probes), /metrics (scraped from inside the
cluster; aggregate numbers only), /openapi.json and /docs (the public schema).
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from reranker_runtime.errors import UnauthorizedError

PROTECTED_PATHS = frozenset(
    {"/rerank", "/predict", "/v1/rerank", "/v2/rerank", "/tokenize", "/info"}
)
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


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] not in PROTECTED_PATHS
            or scope["method"] == "OPTIONS"
        ):
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        error = check_authorization(header, self.api_key)
        if error is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps(error.to_body()).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def document_api_key(schema: dict[str, Any]) -> dict[str, Any]:
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
        if path in PROTECTED_PATHS:
            for operation in operations.values():
                operation["security"] = [{"Bearer": []}, {"ApiKey": []}]
    return schema
