"""TEI/BEI routes: POST /rerank (the seed's API, exact), /predict, /tokenize.

Each route parses, calls the service and formats; InferenceRoute (deps.py) checks the API key,
admits, cancels on disconnect and releases.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response

from reranker_runtime.api.deps import (
    REQUEST_TIMEOUT_OPENAPI,
    InferenceRoute,
    admitted_service,
    annotate,
    request_id,
    request_timeout,
    timing_headers,
)
from reranker_runtime.api.schemas import (
    Prediction,
    PredictRequest,
    RankItem,
    RerankRequest,
    SimpleToken,
    TokenizeRequest,
)

router = APIRouter(tags=["TEI / BEI"], route_class=InferenceRoute)


@router.post(
    "/rerank",
    response_model=list[RankItem],
    response_model_exclude_none=True,
    summary="Rank texts against a query (BEI/TEI)",
    openapi_extra=REQUEST_TIMEOUT_OPENAPI,
)
async def rerank(body: RerankRequest, request: Request, response: Response) -> list[RankItem]:
    started = time.perf_counter()
    service = admitted_service(request)
    result = await service.rerank(
        body.query,
        body.texts,
        truncate=bool(body.truncate),
        truncation_direction=body.truncation_direction,
        raw_scores=body.raw_scores,
        max_chunks_per_text=body.max_chunks_per_doc,
        timeout_s=request_timeout(request),
        request_id=request_id(request),
    )
    # `chunks` and `truncated` only when chunking is on (the request's or the server's max_chunks_per_doc > 1):
    # otherwise the body is exactly TEI's.
    chunked = (body.max_chunks_per_doc or service.settings.max_chunks_per_doc) > 1
    items = [
        RankItem(
            index=i,
            score=result.scores[i],
            text=body.texts[i] if body.return_text else None,
            chunks=result.chunks[i] if chunked else None,
            truncated=result.truncated[i] if chunked else None,
        )
        for i in result.ranking()
    ]
    annotate(request, pairs=len(items), tokens=result.total_tokens)
    response.headers.update(timing_headers(result, started))
    return items


@router.post(
    "/predict",
    response_model=list[Prediction] | list[list[Prediction]],
    summary="Classify texts or pairs (TEI)",
    openapi_extra=REQUEST_TIMEOUT_OPENAPI,
    description=(
        "A single input (a string or a pair) returns a list of {label, score}; a list of inputs "
        "returns a list of such lists. Labels are sorted by score, best first."
    ),
)
async def predict(
    body: PredictRequest, request: Request, response: Response
) -> list[Prediction] | list[list[Prediction]]:
    started = time.perf_counter()
    result = await admitted_service(request).predict(
        body.items,
        truncate=bool(body.truncate),
        truncation_direction=body.truncation_direction,
        raw_scores=body.raw_scores,
        timeout_s=request_timeout(request),
        request_id=request_id(request),
    )
    out = [
        [Prediction(label=label, score=score) for label, score in labels]
        for labels in result.predictions
    ]
    annotate(request, pairs=len(out), tokens=result.total_tokens)
    response.headers.update(timing_headers(result, started))
    return out[0] if body.single else out


@router.post("/tokenize", response_model=list[list[SimpleToken]], summary="Tokenize texts (TEI)")
async def tokenize(body: TokenizeRequest, request: Request) -> list[list[SimpleToken]]:
    tokens = await admitted_service(request).tokenize(
        body.inputs, add_special_tokens=body.add_special_tokens
    )
    out = [
        [
            SimpleToken(id=t.id, text=t.text, special=t.special, start=t.start, stop=t.stop)
            for t in seq
        ]
        for seq in tokens
    ]
    annotate(request, pairs=len(out), tokens=sum(len(seq) for seq in out))
    return out
