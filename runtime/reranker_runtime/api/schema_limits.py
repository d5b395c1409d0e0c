"""The server's own limits in its published OpenAPI schema.

Request models (api/schemas.py) mark every array that --max-client-batch-size bounds with
`x-max-client-batch-size`; this fills in `maxItems` with the server's value when the schema is
first generated, so generated clients and schema-driven testers see the limit the server enforces
(413 beyond it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from reranker_runtime.api.schemas import CLIENT_BATCH_KEY

__all__ = ["apply_client_batch_limit", "publish_limits"]


def apply_client_batch_limit(node: Any, max_items: int) -> None:
    """Replace each `x-max-client-batch-size` marker in a schema with `maxItems`, in place."""
    if isinstance(node, dict):
        if node.pop(CLIENT_BATCH_KEY, None):
            node["maxItems"] = max_items
        for value in node.values():
            apply_client_batch_limit(value, max_items)
    elif isinstance(node, list):
        for value in node:
            apply_client_batch_limit(value, max_items)


def publish_limits(app: FastAPI, max_client_batch_size: int) -> None:
    """Make `app.openapi()` publish the limits. Install before other `app.openapi` wrappers
    (they call this one)."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            apply_client_batch_limit(schema, max_client_batch_size)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
