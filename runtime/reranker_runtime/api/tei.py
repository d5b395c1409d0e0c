"""TEI/BEI routes: POST /rerank (the seed's API, exact), /predict, /tokenize, /decode, and
POST / and /invocations (SageMaker), which serve /rerank for a reranker and /predict for a
classifier, as TEI does (router/src/http/server.rs, `run`).

Each route parses, calls the service and formats; InferenceRoute (deps.py) checks the API key,
admits, cancels on disconnect and releases.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError as PydanticValidationError

from reranker_runtime.api.deps import (
    REQUEST_TIMEOUT_OPENAPI,
    InferenceRoute,
    admitted_service,
    annotate,
    count_request,
    get_lifecycle,
    not_limited,
    request_arrival,
    request_id,
    request_timeout,
    tei_method,
    timing_headers,
)
from reranker_runtime.api.errors import FASTAPI_BODY_PARSE_ERROR
from reranker_runtime.api.schemas import (
    INPUT_ERROR,
    DecodeRequest,
    Prediction,
    PredictRequest,
    RankItem,
    RerankRequest,
    SimpleToken,
    TokenizeRequest,
    VertexRequest,
    VertexResponse,
)
from reranker_runtime.config import ServeSettings
from reranker_runtime.errors import (
    EmptyInputError,
    TooManyInputsError,
    ValidationError,
    WrongModelKindError,
)
from reranker_runtime.limits import check_request_characters
from reranker_runtime.tokenization import TokenInfo

T = TypeVar("T")

router = APIRouter(tags=["TEI / BEI"], route_class=InferenceRoute)


def _validated(model: type[RerankRequest] | type[PredictRequest], data: Any, *loc: Any) -> Any:
    """`model` from parsed JSON, its errors reported like FastAPI's (at `loc` in the body)."""
    try:
        return model.model_validate(data)
    except PydanticValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *loc, *e["loc"])} for e in exc.errors()]
        ) from None


def _characters(text: str | tuple[str, str]) -> int:
    return len(text) if isinstance(text, str) else len(text[0]) + len(text[1])


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
        truncate=body.truncate,
        truncation_direction=body.truncation_direction,
        raw_scores=body.raw_scores,
        max_chunks_per_text=body.max_chunks_per_doc,
        timeout_s=request_timeout(request),
        arrived_at=request_arrival(request),
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
    characters = len(body.query) * len(body.texts) + sum(len(t) for t in body.texts)
    response.headers.update(timing_headers(request, result, started, characters))
    return items


@router.post(
    "/predict",
    response_model=list[Prediction] | list[list[Prediction]],
    summary="Classify texts or pairs (TEI)",
    openapi_extra=REQUEST_TIMEOUT_OPENAPI,
    description=(
        "TEI's forms: a string, `[text]` or a pair `[text_a, text_b]` is one input and returns a "
        "list of {label, score}; a batch `[[text], [text_a, text_b], ...]` returns a list of "
        "such lists. Labels are sorted by score, best first."
    ),
)
async def predict(
    body: PredictRequest, request: Request, response: Response
) -> list[Prediction] | list[list[Prediction]]:
    started = time.perf_counter()
    result = await admitted_service(request).predict(
        body.items,
        truncate=body.truncate,
        truncation_direction=body.truncation_direction,
        raw_scores=body.raw_scores,
        timeout_s=request_timeout(request),
        arrived_at=request_arrival(request),
        request_id=request_id(request),
    )
    out = [
        [Prediction(label=label, score=score) for label, score in labels]
        for labels in result.predictions
    ]
    annotate(request, pairs=len(out), tokens=result.total_tokens)
    characters = sum(_characters(item) for item in body.items)
    response.headers.update(timing_headers(request, result, started, characters))
    return out[0] if body.single else out


@router.post("/tokenize", response_model=list[list[SimpleToken]], summary="Tokenize texts (TEI)")
@not_limited
async def tokenize(body: TokenizeRequest, request: Request) -> Response:
    if body.prompt_name is not None:
        # TEI refuses a prompt the model does not have (core/src/tokenization.rs); a
        # cross-encoder has none.
        raise ValidationError(
            f"`prompt_name` is set to `{body.prompt_name}` but this model has no "
            "sentence-transformers prompts; leave it out"
        )
    counted: dict[str, int] = {}

    def encode(tokens: list[list[TokenInfo]]) -> bytes:
        counted.update(pairs=len(tokens), tokens=sum(len(seq) for seq in tokens))
        return tokens_json(tokens)

    content = await admitted_service(request).tokenize_answer(
        body.inputs, encode, add_special_tokens=body.add_special_tokens
    )
    annotate(request, **counted)
    return Response(content, media_type="application/json")


# Tokens per json.dumps call in tokens_json: each call holds the GIL for its whole run, and
# between calls the event loop gets its turn (a piece takes about a millisecond).
TOKENS_PER_PIECE = 2048


def tokens_json(sequences: Sequence[Sequence[TokenInfo]]) -> bytes:
    """/tokenize's answer (list[list[SimpleToken]]) as JSON, as FastAPI would write it, built in
    pieces of TOKENS_PER_PIECE tokens so that it never holds the GIL for long."""
    out: list[str] = []
    for seq in sequences:
        pieces = []
        for i in range(0, len(seq), TOKENS_PER_PIECE):
            piece = [
                {"id": t.id, "text": t.text, "special": t.special, "start": t.start, "stop": t.stop}
                for t in seq[i : i + TOKENS_PER_PIECE]
            ]
            pieces.append(json.dumps(piece, ensure_ascii=False, separators=(",", ":"))[1:-1])
        out.append("[" + ",".join(pieces) + "]")
    return ("[" + ",".join(out) + "]").encode("utf-8")


@router.post("/decode", response_model=list[str], summary="Decode token ids to text (TEI)")
@not_limited
async def decode(body: DecodeRequest, request: Request) -> list[str]:
    texts = await admitted_service(request).decode(
        body.sequences, skip_special_tokens=body.skip_special_tokens
    )
    annotate(request, pairs=len(texts))
    return texts


_DEFAULT_ROUTE_BODY = {
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    {"$ref": "#/components/schemas/RerankRequest"},
                    {"$ref": "#/components/schemas/PredictRequest"},
                ]
            }
        }
    },
    "required": True,
}


async def default_route(request: Request, response: Response) -> Any:
    """POST / and /invocations: /rerank's request and answer for a reranker, /predict's for a
    classifier (TEI picks the route by model type at start; we pick it per request, once the
    model is loaded, so the body is validated after admission)."""
    try:
        data = json.loads(await request.body())
    except json.JSONDecodeError as exc:  # reported as FastAPI reports it on the other routes
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body", exc.pos), "ctx": {"error": exc.msg}}]
        ) from None
    except UnicodeDecodeError:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body", 0), "ctx": {"error": "not UTF-8"}}]
        ) from None
    except (RecursionError, ValueError):  # too deep, or a number too long for int(): as the
        # other routes answer it (app.py, BODY_UNPARSABLE)
        raise HTTPException(400, FASTAPI_BODY_PARSE_ERROR) from None
    reranker = admitted_service(request).info.num_labels == 1
    _check_default_route_shape(data, reranker)
    body = _validated(RerankRequest if reranker else PredictRequest, data)
    method = tei_method(body)
    if method is not None:
        count_request(request, method)
    if isinstance(body, RerankRequest):
        return await rerank(body, request, response)
    return await predict(body, request, response)


def _check_default_route_shape(data: Any, reranker: bool) -> None:
    """A body of the other model type's route (e.g. InferenceClient.text_classification on a
    reranker) gets a message that says which body this server takes, not a list of missing
    fields. A schema error like the others: 422, not counted in te_request_* (TEI: the same)."""
    if not isinstance(data, dict):
        return
    message = None
    if reranker and "inputs" in data and "query" not in data and "texts" not in data:
        message = (
            "this server serves a reranker, so POST / takes /rerank's body "
            '({"query": ..., "texts": [...]}); {"inputs": ...} is /predict\'s body: post it to '
            "/predict to score each input with the reranker's one label"
        )
    if not reranker and ("query" in data or "texts" in data) and "inputs" not in data:
        message = (
            "this server serves a classifier, so POST / takes /predict's body "
            '({"inputs": ...}); {"query", "texts"} is /rerank\'s body, which needs a reranker'
        )
    if message is not None:
        raise RequestValidationError([{"type": INPUT_ERROR, "loc": ("body",), "msg": message}])


DEFAULT_ROUTE_PATHS = ("/", "/invocations")
for _path, _name in zip(
    DEFAULT_ROUTE_PATHS,
    ("Rerank or classify by model type (TEI)", "Rerank or classify by model type (SageMaker, TEI)"),
    strict=True,
):
    router.add_api_route(
        _path,
        default_route,
        methods=["POST"],
        response_model=list[RankItem] | list[Prediction] | list[list[Prediction]],
        response_model_exclude_none=True,
        summary=_name,
        openapi_extra={"requestBody": _DEFAULT_ROUTE_BODY},
    )


def _check_vertex_totals(
    parsed: list[RerankRequest | PredictRequest], settings: ServeSettings
) -> None:
    """The per-request limits hold for the whole /vertex request, not for each instance: its
    texts (--max-client-batch-size, 422) and their characters (--max-request-characters, 413)."""
    texts = sum(len(p.texts) if isinstance(p, RerankRequest) else len(p.items) for p in parsed)
    if texts > settings.max_client_batch_size:
        raise TooManyInputsError(
            "instances", texts, settings.max_client_batch_size, unit="texts in all"
        )
    parts: list[str | tuple[str, str]] = []
    for p in parsed:
        parts += [p.query, *p.texts] if isinstance(p, RerankRequest) else list(p.items)
    check_request_characters(parts, settings.max_request_characters)


async def _named_instance(index: int, call: Awaitable[T]) -> T:
    """An instance's refusal names the instance (`instances.1: ...`), as its schema errors do;
    not one about the whole server (a classifier's 424 keeps TEI's wording)."""
    try:
        return await call
    except (EmptyInputError, ValidationError) as exc:
        if isinstance(exc, WrongModelKindError):
            raise
        exc.message = f"instances.{index}: {exc.message}"
        exc.args = (exc.message,)
        raise


@router.post(
    "/vertex",
    response_model=VertexResponse,
    response_model_exclude_none=True,
    summary="Vertex AI: several /rerank or /predict bodies at once (TEI)",
    description=(
        "TEI's Vertex route: each instance that is a /rerank body is reranked, any other is "
        "classified as a /predict body; `predictions` holds each answer, in order. One failing "
        "instance fails the request. --max-client-batch-size (422) and --max-request-characters "
        "(413) bound all instances' texts together."
    ),
)
async def vertex(body: VertexRequest, request: Request, response: Response) -> VertexResponse:
    parsed = [
        _validated(RerankRequest, instance, "instances", i)
        if "query" in instance or "texts" in instance
        else _validated(PredictRequest, instance, "instances", i)
        for i, instance in enumerate(body.instances)
    ]  # all of them first: an invalid one refuses the request before any work starts
    _check_vertex_totals(parsed, get_lifecycle(request).settings)
    request_timeout(request)  # a bad X-Request-Timeout is the request's, not an instance's
    calls: list[Awaitable[Any]] = [
        _named_instance(
            i,
            rerank(item, request, Response())
            if isinstance(item, RerankRequest)
            else predict(item, request, Response()),
        )
        for i, item in enumerate(parsed)
    ]
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        predictions = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:  # the request failed: the other instances' work is not needed
            task.cancel()
        raise
    return VertexResponse(predictions=list(predictions))
