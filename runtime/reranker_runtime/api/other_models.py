"""Routes TEI serves for embedding models: a cross-encoder answers them 424 with TEI's error body
and message, as TEI does for a model of another type, instead of 404, so a client pointed at the
wrong server learns why.

TEI's messages (core/src/infer.rs: `embed` on a classifier, `embed_sparse` without SPLADE
pooling) are kept word for word and followed by what to use instead. The OpenAI-compatible routes
answer in OpenAI's error shape, as TEI's `openai_embed` does (`OpenAICompatErrorResponse`). Every
request is refused the same way; the body is read only to count it in te_request_count as TEI
does before it fails (`method` by the shape of `inputs` / `input`). Behind the API key like TEI's
routes.
Left out of our OpenAPI schema: they exist for clients that call TEI's paths, not to be generated
into new clients.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from reranker_runtime import metrics
from reranker_runtime.api.auth import ProtectedRoute
from reranker_runtime.api.deps import ClientDisconnected, count_request

router = APIRouter(tags=["TEI: other model types (424)"], route_class=ProtectedRoute)

FAILED_DEPENDENCY = 424
NOT_EMBEDDING = "Backend error: Model is not an embedding model"
NOT_SPLADE = "Backend error: Model is not an embedding model with SPLADE pooling"
_ADVICE = " (this server serves a cross-encoder: use /rerank, or /predict for a classifier)"


async def _tei_method(request: Request, field: str) -> str:
    """te_request_count's `method` as TEI gives it: "batch" when the body's `field` is a list,
    else "single" (also for a body that is not JSON)."""
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):  # not JSON (or nested too deep for the parser)
        return "single"
    except ClientDisconnect:
        raise ClientDisconnected() from None  # left while sending its body: 499
    inputs = body.get(field) if isinstance(body, dict) else None
    return "batch" if isinstance(inputs, list) else "single"


def _refusal(message: str, *, openai: bool = False) -> JSONResponse:
    metrics.REQUEST_FAILURE.inc(err="model_type")
    text = message + _ADVICE
    body = (
        {"message": text, "code": FAILED_DEPENDENCY, "type": "Backend"}
        if openai
        else {"error": text, "error_type": "Backend"}
    )
    return JSONResponse(body, status_code=FAILED_DEPENDENCY)


def _route(path: str, message: str, *, openai: bool = False) -> None:
    field = "input" if openai else "inputs"

    async def refuse(request: Request) -> JSONResponse:
        # TEI's /similarity embeds the source sentence and the sentences as one batch.
        method = "batch" if path == "/similarity" else await _tei_method(request, field)
        count_request(request, method)
        return _refusal(message, openai=openai)

    router.add_api_route(
        path,
        refuse,
        methods=["POST"],
        response_class=JSONResponse,
        include_in_schema=False,
        name=f"refuse_{path.strip('/').replace('/', '_')}",
    )


for _path in ("/embed", "/embed_all", "/similarity"):
    _route(_path, NOT_EMBEDDING)
_route("/embed_sparse", NOT_SPLADE)
for _path in ("/embeddings", "/v1/embeddings"):
    _route(_path, NOT_EMBEDDING, openai=True)
