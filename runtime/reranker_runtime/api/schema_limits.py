"""The server's own limits in its published OpenAPI schema.

Request models (api/schemas.py) mark every array that --max-client-batch-size bounds with
`x-max-client-batch-size`; this fills in `maxItems` with the server's value when the schema is
first generated (`api/app.py`), so generated clients and schema-driven testers see the limit the
server enforces (422 beyond it, TEI's status).
"""

from __future__ import annotations

from typing import Any

from reranker_runtime.api.schemas import CLIENT_BATCH_KEY

__all__ = ["apply_client_batch_limit"]


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
