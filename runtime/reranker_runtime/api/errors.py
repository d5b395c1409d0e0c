"""Every error a client can get, mapped to HTTP in one place.

Bodies follow TEI's error model, `{"error": str, "error_type": str}`; `error_type` uses TEI's
names (Validation, Empty, Overloaded, Unhealthy, Backend) plus Unauthorized, NotFound and
MethodNotAllowed, so TEI clients that branch on it keep working.

| error                                   | status | error_type       | headers / advice added |
|-----------------------------------------|--------|------------------|------------------------|
| malformed JSON body, body not UTF-8     | 400    | Validation       |                        |
| EmptyInputError                         | 400    | Empty            |                        |
| UnauthorizedError (api/auth.py)         | 401    | Unauthorized     | WWW-Authenticate       |
| unknown path                            | 404    | NotFound         |                        |
| wrong method                            | 405    | MethodNotAllowed |                        |
| body over --payload-limit               | 413    | Validation       | names the server flag  |
| TooManyCharactersError                  | 413    | Validation       | names the server flag  |
| TooManyChunksPerTextError               | 413    | Validation       | max_chunks_per_doc     |
| TooManyChunksPerRequestError            | 413    | Validation       | names the server flag  |
| Content-Type not JSON, Content-Encoding | 415    | Validation       |                        |
|   not identity (api/deps.py)            |        |                  |                        |
| TooManyInputsError (TEI's status)       | 422    | Validation       | names the server flag  |
| ValidationError, InputTooLongError,     | 422    | Validation       | InputTooLong: truncate |
|   request schema errors                 |        |                  |                        |
| WrongModelKindError (a route of another | 424    | Backend          | (TEI's status)         |
|   model type)                           |        |                  |                        |
| EngineError (a failed forward pass)     | 424    | Backend          | (TEI's status)         |
| TooManyCallsError (gRPC calls open at   | 429    | Overloaded       | Retry-After: 1, flag   |
|   once; gRPC: RESOURCE_EXHAUSTED)       |        |                  |                        |
| OverloadedError                         | 429    | Overloaded       | Retry-After: 1, flag   |
| client went away before the answer      | 499    | (no body)        |                        |
| InternalError (the batcher crashed),    | 500    | Backend          |                        |
|   any other exception                   |        |                  |                        |
| NotReadyError (every lifecycle state)   | 503    | Unhealthy        | Retry-After: 5         |
| DeadlineUnreachableError                | 503    | Overloaded       | Retry-After: 1         |
| DeadlineExceededError                   | 504    | Timeout          | names the header, flag |
| RequestReadTimeoutError (a gRPC client  | 408    | Timeout          | names the flag         |
|   stream that does not end; gRPC:       |        |                  |                        |
|   DEADLINE_EXCEEDED)                    |        |                  |                        |
| StreamIdleError (a gRPC stream quiet    | 408    | Timeout          | open a new one         |
|   for 5 min; gRPC: DEADLINE_EXCEEDED)   |        |                  |                        |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

from reranker_runtime.errors import (
    DeadlineExceededError,
    DeadlineUnreachableError,
    EmptyInputError,
    EmptyTokenizerInputError,
    EngineError,
    InputTooLongError,
    InternalError,
    NotReadyError,
    OverloadedError,
    RequestReadTimeoutError,
    RerankerError,
    ScorePairTooLongError,
    StreamIdleError,
    TooManyCallsError,
    TooManyCharactersError,
    TooManyChunksPerRequestError,
    TooManyChunksPerTextError,
    TooManyInputsError,
    UnauthorizedError,
    ValidationError,
    WrongModelKindError,
)

# nginx's "client closed request": the client left before the answer; nothing was sent.
CLIENT_CLOSED_REQUEST = 499
OVERLOADED_RETRY_AFTER_S = 1
NOT_READY_RETRY_AFTER_S = 5
# What the access middleware sends for an exception nothing else handled (never a traceback).
INTERNAL_ERROR_BODY = {"error": "internal server error", "error_type": "Backend"}


@dataclass(frozen=True)
class HttpError:
    """How one kind of error is answered."""

    status: int
    error_type: str
    headers: dict[str, str] = field(default_factory=dict)
    advice: str = ""  # appended to the message: what the client or the operator can change


# Most specific kind first: a kind's entry is the first one it is an instance of.
ERROR_TABLE: tuple[tuple[type[RerankerError], HttpError], ...] = (
    (EmptyInputError, HttpError(400, "Empty")),
    # TEI answers a route of another model type with 424 Failed Dependency, error_type Backend
    # (router/src/http/server.rs: `From<&ErrorType> for StatusCode`).
    (WrongModelKindError, HttpError(424, "Backend")),
    (UnauthorizedError, HttpError(401, "Unauthorized", {"WWW-Authenticate": "Bearer"})),
    (
        TooManyInputsError,
        HttpError(
            422,  # TEI's: ErrorType::Validation
            "Validation",
            advice=" or raise --max-client-batch-size (RERANKER_MAX_CLIENT_BATCH_SIZE)",
        ),
    ),
    (
        TooManyCharactersError,
        HttpError(
            413,
            "Validation",
            advice=", or raise --max-request-characters (RERANKER_MAX_REQUEST_CHARACTERS)",
        ),
    ),
    (
        TooManyChunksPerTextError,
        HttpError(
            413,
            "Validation",
            advice="; send a larger max_chunks_per_doc (server default: --max-chunks-per-doc) or "
            "set truncate=true to score only the first windows",
        ),
    ),
    (
        TooManyChunksPerRequestError,
        HttpError(
            413,
            "Validation",
            advice="; send fewer or shorter texts or a smaller max_chunks_per_doc, or raise "
            "--max-chunks-per-request (RERANKER_MAX_CHUNKS_PER_REQUEST)",
        ),
    ),
    (
        ScorePairTooLongError,
        HttpError(422, "Validation", advice="; shorten it or send truncate_prompt_tokens: -1"),
    ),
    (InputTooLongError, HttpError(422, "Validation", advice="; shorten it or set truncate=true")),
    (ValidationError, HttpError(422, "Validation")),
    (
        TooManyCallsError,
        HttpError(
            429,
            "Overloaded",
            {"Retry-After": str(OVERLOADED_RETRY_AFTER_S)},
            advice=" (--max-connections); retry shortly",
        ),
    ),
    (
        OverloadedError,
        HttpError(
            429,
            "Overloaded",
            {"Retry-After": str(OVERLOADED_RETRY_AFTER_S)},
            advice=" (--max-concurrent-requests); retry shortly",
        ),
    ),
    (
        DeadlineUnreachableError,
        HttpError(
            503,
            "Overloaded",
            {"Retry-After": str(OVERLOADED_RETRY_AFTER_S)},
            advice="; retry with a longer X-Request-Timeout, fewer or shorter texts, or on a less "
            "busy replica",
        ),
    ),
    (
        DeadlineExceededError,
        HttpError(
            504,
            "Timeout",
            advice="; send a longer X-Request-Timeout header (server default: --request-timeout) "
            "or fewer texts",
        ),
    ),
    (
        RequestReadTimeoutError,
        HttpError(408, "Timeout", advice=" (--request-read-timeout); send the whole request"),
    ),
    (StreamIdleError, HttpError(408, "Timeout", advice="; open a new one when there is more")),
    (NotReadyError, HttpError(503, "Unhealthy", {"Retry-After": str(NOT_READY_RETRY_AFTER_S)})),
    # TEI answers a failed forward pass with ErrorType::Backend, 424 Failed Dependency.
    (EngineError, HttpError(424, "Backend")),
    (InternalError, HttpError(500, "Backend")),
)
_FALLBACK = HttpError(500, "Backend")

# FastAPI's message for a body its JSON parser raised on, other than a syntax error.
FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"
BODY_UNPARSABLE = (
    "body could not be parsed as JSON: it is nested too deeply or holds a number too long for "
    "the parser (over 4300 digits); send a flat JSON object with ordinary numbers"
)


# Errors raised by FastAPI/Starlette themselves (routing, body size), by status.
HTTP_ERROR_TYPES = {
    400: "Validation",
    404: "NotFound",
    405: "MethodNotAllowed",
    413: "Validation",
    415: "Validation",
}

# TEI's `err` label of te_request_failure for each kind (core/src/infer.rs, http/server.rs);
# most specific kind first. A kind not listed is labelled by its status (_REASON_BY_STATUS).
FAILURE_REASONS: tuple[tuple[type[RerankerError], str], ...] = (
    (EmptyTokenizerInputError, "tokenization"),  # TEI: Infer::tokenize / Infer::decode
    (EmptyInputError, "validation"),
    (TooManyInputsError, "batch_size"),
    (TooManyChunksPerTextError, "batch_size"),
    (TooManyChunksPerRequestError, "batch_size"),
    (WrongModelKindError, "model_type"),
    (InputTooLongError, "tokenization"),
    (ValidationError, "validation"),
    (OverloadedError, "overloaded"),
    (DeadlineUnreachableError, "overloaded"),
    (DeadlineExceededError, "timeout"),  # ours: TEI has no deadlines
    (RequestReadTimeoutError, "timeout"),
    (StreamIdleError, "timeout"),
    (NotReadyError, "unhealthy"),
    (EngineError, "inference"),
)
_REASON_BY_STATUS = {
    400: "validation",
    413: "batch_size",
    422: "validation",
    429: "overloaded",
    503: "overloaded",  # refused for load (NotReadyError, listed above, is "unhealthy")
    504: "timeout",  # ours: TEI has no deadlines
}
# te_request_failure's label for a client that went away before its answer (TEI: a queue entry
# whose receiver was dropped, core/src/queue.rs).
DROPPED = "dropped"


def failure_reason(exc: BaseException) -> str:
    """The `err` label TEI gives this failure in te_request_failure."""
    if isinstance(exc, RerankerError):
        for kind, reason in FAILURE_REASONS:
            if isinstance(exc, kind):
                return reason
        status = http_error(exc).status
        return _REASON_BY_STATUS.get(status, "validation" if status < 500 else "inference")
    return "inference"


def http_error(exc: RerankerError) -> HttpError:
    for kind, mapped in ERROR_TABLE:
        if isinstance(exc, kind):
            return mapped
    return _FALLBACK


# Jina's API answers errors as `{"detail": ...}` and its clients read that field (LlamaIndex's
# JinaRerank raises KeyError('detail') otherwise): the Jina route's errors carry it too.
JINA_ROUTE = "/v1/rerank"


def error_body(message: str, error_type: str, *, path: str = "") -> dict[str, str]:
    # A message that quotes the client's string may carry a lone surrogate (JSON's "\ud800"),
    # which cannot be written as UTF-8: it is written as its escape instead of failing with 500.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    body = {"error": message, "error_type": error_type}
    if path == JINA_ROUTE:
        body["detail"] = message
    return body


def client_message(exc: RerankerError) -> str:
    """The message a client reads: the domain message plus the HTTP layer's advice."""
    return exc.message + http_error(exc).advice


def error_response(exc: RerankerError, *, path: str = "") -> JSONResponse:
    """`path`: the request's, so the Jina route's errors carry Jina's `detail` too."""
    mapped = http_error(exc)
    return JSONResponse(
        error_body(client_message(exc), mapped.error_type, path=path),
        status_code=mapped.status,
        headers=mapped.headers or None,
    )


def plain_error_response(
    status: int,
    message: str,
    error_type: str,
    headers: Mapping[str, str] | None = None,
    *,
    path: str = "",
) -> JSONResponse:
    """For errors that are not domain errors (request validation, routing)."""
    return JSONResponse(
        error_body(message, error_type, path=path), status_code=status, headers=headers
    )
