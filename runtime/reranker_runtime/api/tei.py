"""TEI/BEI routes: POST /rerank (the seed's API, exact), /predict, /tokenize."""

from __future__ import annotations

import time
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
    Prediction,
    PredictRequest,
    RankItem,
    RerankRequest,
    SimpleToken,
    TokenizeRequest,
)

router = APIRouter(tags=["TEI / BEI"])


def truncate_flag(requested: bool | None, runtime: Runtime) -> bool:
    # --auto-truncate turns truncation on for every request (TEI's auto_truncate).
    return bool(requested) or runtime.settings.auto_truncate


def ranked(scores: list[float]) -> list[int]:
    """Indices by score, best first; ties keep request order (stable sort)."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


@router.post(
    "/rerank",
    response_model=list[RankItem],
    response_model_exclude_none=True,
    summary="Rank texts against a query (BEI/TEI)",
)
async def rerank(
    body: RerankRequest, request: Request, runtime: Runtime = Depends(get_runtime)
) -> JSONResponse:
    started = time.perf_counter()
    service = runtime.require_service()
    async with service.admit():
        result = await cancel_on_disconnect(
            request,
            service.rerank(
                body.query,
                body.texts,
                truncate=truncate_flag(body.truncate, runtime),
                truncation_direction=body.truncation_direction,
                raw_scores=body.raw_scores,
                request_id=request_id(request),
            ),
        )
    scores = [float(s) for s in result.scores]
    items: list[dict[str, Any]] = []
    for i in ranked(scores):
        item: dict[str, Any] = {"index": i, "score": scores[i]}
        if body.return_text:
            item["text"] = body.texts[i]
        items.append(item)
    annotate(request, pairs=len(scores), tokens=result.total_tokens)
    return JSONResponse(items, headers=timing_headers(result, started))


@router.post(
    "/predict",
    response_model=list[Prediction] | list[list[Prediction]],
    summary="Classify texts or pairs (TEI)",
    description=(
        "A single input (a string or a pair) returns a list of {label, score}; a list of inputs "
        "returns a list of such lists. Labels are sorted by score, best first."
    ),
)
async def predict(
    body: PredictRequest, request: Request, runtime: Runtime = Depends(get_runtime)
) -> JSONResponse:
    started = time.perf_counter()
    service = runtime.require_service()
    async with service.admit():
        result = await cancel_on_disconnect(
            request,
            service.predict(
                body.items,
                truncate=truncate_flag(body.truncate, runtime),
                truncation_direction=body.truncation_direction,
                raw_scores=body.raw_scores,
                request_id=request_id(request),
            ),
        )
    out = [
        [{"label": label, "score": float(score)} for label, score in labels]
        for labels in result.predictions
    ]
    annotate(request, pairs=len(out), tokens=result.total_tokens)
    return JSONResponse(out[0] if body.single else out, headers=timing_headers(result, started))


@router.post("/tokenize", response_model=list[list[SimpleToken]], summary="Tokenize texts (TEI)")
async def tokenize(
    body: TokenizeRequest, request: Request, runtime: Runtime = Depends(get_runtime)
) -> JSONResponse:
    service = runtime.require_service()
    async with service.admit():
        tokens = await cancel_on_disconnect(
            request, service.tokenize(body.inputs, add_special_tokens=body.add_special_tokens)
        )
    out = [[_token_dict(t) for t in seq] for seq in tokens]
    annotate(request, pairs=len(out), tokens=sum(len(seq) for seq in out))
    return JSONResponse(out)


def _token_dict(token: Any) -> dict[str, Any]:
    if isinstance(token, dict):
        return token
    return {
        "id": int(token.id),
        "text": token.text,
        "special": bool(token.special),
        "start": token.start,
        "stop": token.stop,
    }
