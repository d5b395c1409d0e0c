"""Cohere v2 (`POST /v2/rerank`) and Jina (`POST /v1/rerank`) rerank routes.

Both APIs truncate long documents instead of refusing them, so these routes always score with
truncation on; each result says whether its pair was cut (`truncated`, an extension field that
clients of either API ignore). `max_tokens_per_doc` cuts each document to its first that many
tokens before pairing it with the query (done by the service). `max_chunks_per_doc` (Cohere's
parameter) scores a long document as up to that many windows and keeps the best; each result
says how many windows it used (`chunks`, an extension field like `truncated`).
"""

from __future__ import annotations

import math
import time
import uuid

from fastapi import APIRouter, Request, Response

from reranker_runtime.api.deps import (
    REQUEST_TIMEOUT_OPENAPI,
    InferenceRoute,
    admitted_service,
    annotate,
    request_arrival,
    request_id,
    request_timeout,
    timing_headers,
)
from reranker_runtime.api.schemas import (
    ApiRerankResult,
    CohereApiVersion,
    CohereBilledUnits,
    CohereMeta,
    CohereRerankRequest,
    CohereRerankResponse,
    CohereTokens,
    DocumentText,
    JinaRerankRequest,
    JinaRerankResponse,
    JinaUsage,
)
from reranker_runtime.service import RerankResult

router = APIRouter(tags=["Cohere v2 / Jina"], route_class=InferenceRoute)

# Cohere bills one search unit per query with up to 100 documents.
_DOCS_PER_SEARCH_UNIT = 100


async def _rerank(
    body: CohereRerankRequest | JinaRerankRequest, request: Request, response: Response
) -> tuple[list[ApiRerankResult], RerankResult]:
    started = time.perf_counter()
    result = await admitted_service(request).rerank(
        body.query,
        body.documents,
        truncate=True,
        max_tokens_per_text=body.max_tokens_per_doc,
        max_chunks_per_text=body.max_chunks_per_doc,
        timeout_s=request_timeout(request),
        arrived_at=request_arrival(request),
        request_id=request_id(request),
        texts_field="documents",
    )
    order = result.ranking()
    if body.top_n is not None:
        order = order[: body.top_n]
    results = [
        ApiRerankResult(
            index=i,
            relevance_score=result.scores[i],
            document=DocumentText(text=body.documents[i]) if body.return_documents else None,
            truncated=result.truncated[i],
            chunks=result.chunks[i],
        )
        for i in order
    ]
    annotate(request, pairs=len(result.scores), tokens=result.total_tokens)
    characters = len(body.query) * len(body.documents) + sum(len(d) for d in body.documents)
    response.headers.update(timing_headers(request, result, started, characters))
    return results, result


@router.post(
    "/v2/rerank",
    response_model=CohereRerankResponse,
    response_model_exclude_none=True,
    summary="Rerank (Cohere v2 API)",
    openapi_extra=REQUEST_TIMEOUT_OPENAPI,
)
async def cohere_rerank(
    body: CohereRerankRequest, request: Request, response: Response
) -> CohereRerankResponse:
    results, result = await _rerank(body, request, response)
    return CohereRerankResponse(
        id=str(uuid.uuid4()), results=results, meta=_meta("2", len(body.documents), result)
    )


def _meta(version: str, documents: int, result: RerankResult) -> CohereMeta:
    units = max(1, math.ceil(documents / _DOCS_PER_SEARCH_UNIT))
    return CohereMeta(
        api_version=CohereApiVersion(version=version),
        billed_units=CohereBilledUnits(search_units=units),
        tokens=CohereTokens(input_tokens=result.total_tokens, output_tokens=0),
    )


@router.post(
    "/v1/rerank",
    response_model=JinaRerankResponse,
    response_model_exclude_none=True,
    summary="Rerank (Jina API)",
    openapi_extra=REQUEST_TIMEOUT_OPENAPI,
)
async def jina_rerank(
    body: JinaRerankRequest, request: Request, response: Response
) -> JinaRerankResponse:
    results, result = await _rerank(body, request, response)
    settings = admitted_service(request).settings
    return JinaRerankResponse(
        id=str(uuid.uuid4()),
        model=body.model or settings.served_model_name or settings.model or "",
        results=results,
        usage=JinaUsage(total_tokens=result.total_tokens),
        meta=_meta("1", len(body.documents), result),
    )
