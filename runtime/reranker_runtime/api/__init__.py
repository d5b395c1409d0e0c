"""HTTP layer: FastAPI app factory, schemas, routes (TEI/BEI, Cohere v2/Jina, operations), auth."""

from __future__ import annotations

from reranker_runtime.api.app import create_app

__all__ = ["create_app"]
