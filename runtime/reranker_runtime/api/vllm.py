"""vLLM's Score API for text (`POST /score`, `POST /v1/score`), for clients written against
`vllm serve <cross-encoder>`.

One side with one text is scored against each text of the other side (1:N) through the rerank
path (fair batching, one query tokenized once); two lists of the same length pair up element by
element (N:N) through the predict path. Scores come back in request order, sigmoid(logit) unless
`use_activation` is false, as vLLM gives them for a cross-encoder. A long text is never split
into windows here (vLLM scores one sequence per pair), whatever --max-chunks-per-doc says, so a
pair scores the same through either path.
"""

from __future__ import annotations

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
from reranker_runtime.api.schemas import ScoreData, ScoreRequest, ScoreResponse, ScoreUsage
from reranker_runtime.errors import (
    EmptyInputError,
    InputTooLongError,
    ScorePairTooLongError,
    ValidationError,
)
from reranker_runtime.service import PredictResult, RerankResult, RerankService

router = APIRouter(tags=["vLLM"], route_class=InferenceRoute)


def _truncate(body: ScoreRequest, service: RerankService) -> bool | None:
    """vLLM's truncate_prompt_tokens as this server can honour it: -1 (or any value at least
    the model's maximum input length) cuts to that maximum; absent follows --auto-truncate.
    A smaller budget is refused rather than silently scored at another length."""
    budget = body.truncate_prompt_tokens
    if budget is None:
        return None
    limit = service.info.max_input_length
    if budget == -1 or budget >= limit:
        return True
    raise ValidationError(
        f"truncate_prompt_tokens={budget} is not supported: pairs are cut to the model's maximum "
        f"input length ({limit} tokens); send -1 for that, or leave the field out"
    )


def _check_sides(first: tuple[str, list[str]], second: tuple[str, list[str]]) -> None:
    """vLLM's 1:1, 1:N or N:N, and no empty text, each error naming the field."""
    for name, texts in (first, second):
        if not texts:
            raise EmptyInputError(f"`{name}` must not be empty: send at least one text")
        for i, text in enumerate(texts):
            if not text.strip():
                raise EmptyInputError(
                    f"`{name}[{i}]` is empty; every text needs at least one non-space character"
                )
    (name_1, texts_1), (name_2, texts_2) = first, second
    if len(texts_1) > 1 and len(texts_1) != len(texts_2):
        raise ValidationError(
            f"`{name_1}` has {len(texts_1)} texts and `{name_2}` {len(texts_2)}: send one "
            f"`{name_1}` text to score against every `{name_2}` text (1:N), or as many as "
            f"`{name_2}` to score them pair by pair (N:N)"
        )


@router.post(
    "/score",
    response_model=ScoreResponse,
    summary="Score text pairs (vLLM Score API)",
    openapi_extra=REQUEST_TIMEOUT_OPENAPI,
)
@router.post(
    "/v1/score",
    response_model=ScoreResponse,
    summary="Score text pairs (vLLM Score API)",
    openapi_extra=REQUEST_TIMEOUT_OPENAPI,
)
async def score(body: ScoreRequest, request: Request, response: Response) -> ScoreResponse:
    try:
        return await _score(body, request, response)
    except InputTooLongError as exc:
        # The advice names this API's truncation field, not /rerank's `truncate`.
        raise ScorePairTooLongError(str(exc)) from exc


async def _score(body: ScoreRequest, request: Request, response: Response) -> ScoreResponse:
    started = time.perf_counter()
    service = admitted_service(request)
    first, second = body.sides
    _check_sides(first, second)
    (_, texts_1), (name_2, texts_2) = first, second
    truncate = _truncate(body, service)
    timed: RerankResult | PredictResult
    if len(texts_1) == 1:
        timed = await service.rerank(
            texts_1[0],
            texts_2,
            truncate=truncate,
            raw_scores=not body.activation_on,
            max_chunks_per_text=1,
            texts_field=name_2,
            timeout_s=request_timeout(request),
            arrived_at=request_arrival(request),
            request_id=request_id(request),
        )
        scores = timed.scores
        # The one text is paired with every text of the other side.
        characters = len(texts_1[0]) * len(texts_2) + sum(map(len, texts_2))
    else:
        service.check_reranker()
        timed = await service.predict(
            list(zip(texts_1, texts_2, strict=True)),
            truncate=truncate,
            raw_scores=not body.activation_on,
            timeout_s=request_timeout(request),
            arrived_at=request_arrival(request),
            request_id=request_id(request),
            inputs_field=f"{first[0]}/{name_2}",
        )
        scores = [labels[0][1] for labels in timed.predictions]
        characters = sum(map(len, texts_1)) + sum(map(len, texts_2))
    tokens = timed.total_tokens
    annotate(request, pairs=len(scores), tokens=tokens)
    response.headers.update(timing_headers(request, timed, started, characters))
    settings = service.settings
    return ScoreResponse(
        id=f"score-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=body.model or settings.served_model_name or settings.model or "",
        data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)],
        usage=ScoreUsage(prompt_tokens=tokens, total_tokens=tokens),
    )
