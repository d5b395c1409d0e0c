"""Cohere v2 (`POST /v2/rerank`) and Jina (`POST /v1/rerank`) rerank routes.

Both APIs truncate long documents instead of refusing them, so these routes always score with
truncation on; each result says whether its pair was cut (`truncated`, an extension field that
clients of either API ignore). `max_tokens_per_doc` cuts each document to that many tokens
(text cut at the token boundary) before pairing it with the query.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from reranker_runtime.api.deps import (
    Runtime,
    annotate,
    cancel_on_disconnect,
    get_runtime,
    request_id,
    timing_headers,
)
from reranker_runtime.api.schemas import (
    CohereRerankRequest,
    CohereRerankResponse,
    JinaRerankRequest,
    JinaRerankResponse,
)
from reranker_runtime.api.tei import ranked

router = APIRouter(tags=["Cohere v2 / Jina"])

# Cohere bills one search unit per query with up to 100 documents.
_DOCS_PER_SEARCH_UNIT = 100


async def _cut_documents(
    service: Any, documents: list[str], max_tokens: int
) -> tuple[list[str], list[bool]]:
    """Cut each document to `max_tokens` tokens (no special tokens), at a token boundary of
    the original text, so the server tokenizes exactly the first `max_tokens` tokens again."""
    # One token past the cut tells whether a document is longer; only that much is tokenized.
    tokens = await service.tokenize(documents, add_special_tokens=False, max_tokens=max_tokens + 1)
    out: list[str] = []
    cut: list[bool] = []
    for doc, toks in zip(documents, tokens, strict=True):
        if len(toks) <= max_tokens:
            out.append(doc)
            cut.append(False)
            continue
        stop = getattr(toks[max_tokens - 1], "stop", None)
        out.append(doc[:stop] if stop is not None else doc)
        cut.append(stop is not None)
    return out, cut


async def _score(
    body: CohereRerankRequest | JinaRerankRequest, request: Request, runtime: Runtime
) -> tuple[list[dict[str, Any]], Any, dict[str, str]]:
    started = time.perf_counter()
    service = runtime.require_service()
    async with service.admit():

        async def work() -> tuple[Any, list[bool]]:
            documents = body.documents
            cut = [False] * len(documents)
            # Too many documents: skip the cut and let rerank() refuse them (413 naming the limit).
            limit = runtime.settings.max_client_batch_size
            if body.max_tokens_per_doc is not None and 0 < len(documents) <= limit:
                documents, cut = await _cut_documents(service, documents, body.max_tokens_per_doc)
            result = await service.rerank(
                body.query,
                documents,
                truncate=True,
                request_id=request_id(request),
                texts_field="documents",
            )
            return result, cut

        result, cut = await cancel_on_disconnect(request, work())
    scores = [float(s) for s in result.scores]
    order = ranked(scores)
    if body.top_n is not None:
        order = order[: body.top_n]
    results: list[dict[str, Any]] = []
    for i in order:
        item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if body.return_documents:
            item["document"] = {"text": body.documents[i]}
        item["truncated"] = bool(result.truncated[i]) or cut[i]
        results.append(item)
    annotate(request, pairs=len(scores), tokens=result.total_tokens)
    return results, result, timing_headers(result, started)


@router.post("/v2/rerank", response_model=CohereRerankResponse, summary="Rerank (Cohere v2 API)")
async def cohere_rerank(
    body: CohereRerankRequest, request: Request, runtime: Runtime = Depends(get_runtime)
) -> JSONResponse:
    results, result, headers = await _score(body, request, runtime)
    units = max(1, math.ceil(len(body.documents) / _DOCS_PER_SEARCH_UNIT))
    return JSONResponse(
        {
            "id": str(uuid.uuid4()),
            "results": results,
            "meta": {
                "api_version": {"version": "2"},
                "billed_units": {"search_units": units},
                "tokens": {"input_tokens": int(result.total_tokens), "output_tokens": 0},
            },
        },
        headers=headers,
    )


@router.post("/v1/rerank", response_model=JinaRerankResponse, summary="Rerank (Jina API)")
async def jina_rerank(
    body: JinaRerankRequest, request: Request, runtime: Runtime = Depends(get_runtime)
) -> JSONResponse:
    results, result, headers = await _score(body, request, runtime)
    model = body.model or runtime.settings.served_model_name or runtime.settings.model or ""
    return JSONResponse(
        {
            "id": str(uuid.uuid4()),
            "model": model,
            "results": results,
            "usage": {"total_tokens": int(result.total_tokens)},
        },
        headers=headers,
    )
