"""What the routes share: the inference route class (admission, cancellation on disconnect,
release), the lifecycle accessor, TEI's timing headers and the access-log annotations.

Every route of an inference router (`APIRouter(route_class=InferenceRoute)`) runs as:

    API key checked (ProtectedRoute, before the body is read)
    -> JSON media type, encoding and UTF-8 checked (JsonBodyRoute: 415/400)
    -> body parsed and validated (FastAPI: 400/422)
    -> the body's checks that need no model (check_before_admission: 424/400/413/422)
    -> admitted by the lifecycle (503 unless ready, 429 over --max-concurrent-requests)
    -> the handler runs, cancelled if the client disconnects first (499, its queued pairs dropped)
    -> the permit is released, however the handler ended.

so a route only parses, calls the service (`admitted_service(request)`) and formats. The same
wrapper keeps TEI's request counters (metrics.py): te_request_count{method} once the body is
parsed, then te_request_success{method} or te_request_failure{err}.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import suppress
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from reranker_runtime import metrics
from reranker_runtime.api.auth import ProtectedRoute
from reranker_runtime.api.errors import DROPPED, failure_reason
from reranker_runtime.api.schemas import (
    CohereRerankRequest,
    DecodeRequest,
    JinaRerankRequest,
    PredictRequest,
    RerankRequest,
    TokenizeRequest,
)
from reranker_runtime.errors import ValidationError
from reranker_runtime.service import check_predict_inputs, check_rerank_input

if TYPE_CHECKING:
    from reranker_runtime.lifecycle import Lifecycle
    from reranker_runtime.service import RerankService

T = TypeVar("T")

# Per-request fields for the access log (pairs, tokens), kept in the ASGI scope so the
# outer middleware can read what the route wrote.
LOG_SCOPE_KEY = "reranker.access"
REQUEST_ID_SCOPE_KEY = "reranker.request_id"
# Event-loop time at which the request's headers arrived (AccessMiddleware): a deadline counts
# from there, so reading and parsing a large body is part of it.
ARRIVED_AT_SCOPE_KEY = "reranker.arrived_at"
_SERVICE_SCOPE_KEY = "reranker.service"
_TEI_METHOD_SCOPE_KEY = "reranker.tei_method"
# Handlers already wrapped by `admitted`.
_ADMITTED: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; the work was cancelled."""


def tei_method(body: object) -> str | None:
    """TEI's `method` label for a parsed request body: "single" for /predict with one input,
    "batch" for every other scoring request; None for /tokenize and /decode, which TEI does not
    count, and for a body the route parses itself (POST /: it calls count_request)."""
    if body is None or isinstance(body, (TokenizeRequest, DecodeRequest)):
        return None
    if isinstance(body, PredictRequest):
        return "single" if body.single else "batch"
    return "batch"


def check_before_admission(body: object, lifecycle: Lifecycle) -> None:
    """The checks that need no model (empty inputs, too many, too many characters), made before
    the request is admitted: one that can never succeed gets its 400/413/422 at once, not a 429
    or 503 that a client would retry. A rerank route on a loaded classifier is its 424 first,
    as in the service. The service makes them again (other callers)."""
    settings, service = lifecycle.settings, lifecycle.service
    if isinstance(body, (RerankRequest, CohereRerankRequest, JinaRerankRequest)):
        if service is not None:
            service.check_reranker()
        if isinstance(body, RerankRequest):
            check_rerank_input(body.query, body.texts, settings)
        else:
            check_rerank_input(body.query, body.documents, settings, "documents")
    elif isinstance(body, PredictRequest):
        check_predict_inputs(body.items, settings, single_name=body.single_name)


def count_request(request: Request, method: str) -> None:
    """te_request_count{method}; the wrapper counts the success under the same method."""
    request.scope[_TEI_METHOD_SCOPE_KEY] = method
    metrics.REQUEST_COUNT.inc(method=method)


def get_lifecycle(request: Request) -> Lifecycle:
    lifecycle: Lifecycle = request.app.state.lifecycle
    return lifecycle


def admitted_service(request: Request) -> RerankService:
    """The service, inside a handler of an InferenceRoute (which admitted the request)."""
    service: RerankService = request.scope[_SERVICE_SCOPE_KEY]
    return service


_NOT_LIMITED: set[Callable[..., Awaitable[Any]]] = set()


def not_limited(endpoint: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Mark an inference route whose requests do not count towards --max-concurrent-requests
    (TEI takes no permit for /tokenize and /decode). Put it below the router's decorator."""
    _NOT_LIMITED.add(endpoint)
    return endpoint


def admitted(endpoint: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Wrap a route handler: admit, run cancelling on disconnect, release. FastAPI reads the
    handler's own signature through `__wrapped__`; it must take `request: Request`.
    Idempotent, so a route copied into another router is still admitted once."""
    if endpoint in _ADMITTED:
        return endpoint
    if "request" not in inspect.signature(endpoint).parameters:
        raise TypeError(f"inference route {endpoint.__name__} must take `request: Request`")
    limited = endpoint not in _NOT_LIMITED
    # POST / parses its own body and counts the request (te_request_count) only once it knows
    # the method, after admission: a refusal before that (429, 503) is not a failure of a
    # counted request either, or te_request_failure would outgrow te_request_count.
    parses_own_body = "body" not in inspect.signature(endpoint).parameters

    @functools.wraps(endpoint)
    async def run(**kwargs: Any) -> Any:
        request: Request = kwargs["request"]
        started = time.perf_counter()
        method = tei_method(kwargs.get("body"))
        if method is not None:
            count_request(request, method)
        try:
            lifecycle = get_lifecycle(request)
            check_before_admission(kwargs.get("body"), lifecycle)
            if limited:
                request_timeout(request)  # a bad X-Request-Timeout: 422 now, not a 429 or 503
            async with lifecycle.admit(limited=limited) as service:
                request.scope[_SERVICE_SCOPE_KEY] = service
                result = await cancel_on_disconnect(request, endpoint(**kwargs))
        except (RequestValidationError, HTTPException):
            raise  # a body the route parses itself (POST /): TEI does not count these either
        except Exception as exc:
            if not parses_own_body or _TEI_METHOD_SCOPE_KEY in request.scope:
                reason = DROPPED if isinstance(exc, ClientDisconnected) else failure_reason(exc)
                metrics.REQUEST_FAILURE.inc(err=reason)
            raise
        method = request.scope.get(_TEI_METHOD_SCOPE_KEY)
        if method is not None:
            metrics.REQUEST_SUCCESS.inc(method=method)
            metrics.REQUEST_DURATION.observe(time.perf_counter() - started)
        return result

    _ADMITTED.add(run)
    return run


def _is_json(content_type: str) -> bool:
    """`application/json` or `application/<x>+json`, any parameters (axum's Json accepts these)."""
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (
        mime.startswith("application/") and mime.endswith("+json")
    )


def check_json_body_headers(request: Request) -> None:
    """415 for a body that is not declared as JSON (TEI: axum's Json extractor) or that is
    compressed (nothing here decodes a Content-Encoding)."""
    content_type = request.headers.get("content-type")
    if content_type is None or not _is_json(content_type):
        got = "no Content-Type" if content_type is None else f"Content-Type {content_type!r}"
        raise HTTPException(
            415,
            f"expected a JSON body sent with 'Content-Type: application/json', got {got}; send "
            "that header (curl: -H 'Content-Type: application/json')",
        )
    encoding = request.headers.get("content-encoding")
    if encoding is not None:
        unsupported = [e.strip() for e in encoding.split(",") if e.strip().lower() != "identity"]
        if unsupported:
            raise HTTPException(
                415,
                f"Content-Encoding {', '.join(unsupported)!r} is not supported: send the body "
                "uncompressed",
            )


def check_utf8(body: bytes) -> None:
    """400 for a body that is not UTF-8 (JSON's encoding, and TEI's: serde_json), naming where
    (FastAPI would answer a vague "There was an error parsing the body")."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPException(
            400, f"body is not valid UTF-8 (byte {exc.start}); send the JSON encoded as UTF-8"
        ) from None


class JsonBodyRoute(APIRoute):
    """A route that reads a JSON body: its media type, encoding and UTF-8 are checked before
    FastAPI parses it. One that takes no body is left alone; POST / parses its body itself and
    declares it in `openapi_extra`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None and "requestBody" not in (self.openapi_extra or {}):
            return handler

        async def checked(request: Request) -> Response:
            check_json_body_headers(request)
            # Read here (Starlette keeps it for FastAPI's parsing); a body over --payload-limit
            # raises its 413 here.
            try:
                body = await request.body()
            except ClientDisconnect:
                raise ClientDisconnected() from None  # left while sending its body: 499
            check_utf8(body)
            if not body.strip():
                # Malformed JSON (400, as TEI's axum answers), on every route alike: FastAPI
                # would call a missing body 422 "Field required".
                raise HTTPException(
                    400, "malformed JSON body: the body is empty; send the request as a JSON object"
                )
            return await handler(request)

        return checked


class InferenceRoute(ProtectedRoute, JsonBodyRoute):
    """Route class of the inference routers: API key, admission, cancellation, release.
    By the method resolution order the API key is checked (ProtectedRoute) before the body's
    media type (JsonBodyRoute), and both before FastAPI reads the body."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, admitted(endpoint), **kwargs)


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read by the time a route runs, so the next ASGI message is the
    # disconnect (uvicorn sends it when the connection closes).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first, so its pairs leave the
    batcher's queue instead of being scored for nobody."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


def request_id(request: Request) -> str | None:
    """The id AccessMiddleware gave this request (the client's x-request-id, or generated)."""
    value = request.scope.get(REQUEST_ID_SCOPE_KEY)
    return value if isinstance(value, str) else None


def request_arrival(request: Request) -> float | None:
    """Event-loop time at which the request arrived (AccessMiddleware), the start of its
    deadline; None outside that middleware (the deadline then counts from the service call)."""
    value = request.scope.get(ARRIVED_AT_SCOPE_KEY)
    return value if isinstance(value, float) else None


REQUEST_TIMEOUT_HEADER = "X-Request-Timeout"
# `openapi_extra` of the routes that honour the header, so /docs and generated clients show it.
REQUEST_TIMEOUT_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": REQUEST_TIMEOUT_HEADER,
            "in": "header",
            "required": False,
            "schema": {"type": "number", "exclusiveMinimum": 0},
            "description": "Deadline in seconds (e.g. 2.5); replaces the server's "
            "--request-timeout. Past it: 504 and the request's waiting pairs are dropped; a "
            "request that cannot make it is refused at once with 503.",
        }
    ]
}


# A plain decimal number, e.g. `2.5`, `.5`, `1e3`: not `1_0`, `+3`, `inf`, `0x10` or full-width
# digits, which Python's float() would take.
_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _header_text(value: str) -> str:
    """A header value as the client wrote it: Starlette decodes header bytes as latin-1, so
    UTF-8 text (e.g. a full-width digit) is re-read as UTF-8 where it is valid."""
    raw = value.encode("latin-1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return value


def request_timeout(request: Request) -> float | None:
    """The request's deadline in seconds from its `X-Request-Timeout` header (a finite decimal
    number > 0, e.g. `2.5`), or None when it sent none (the service then applies
    --request-timeout)."""
    raw = request.headers.get(REQUEST_TIMEOUT_HEADER)
    if raw is None:
        return None
    text = raw.strip(" \t")
    value = float(text) if _DECIMAL.fullmatch(text) else math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValidationError(
            f"header `{REQUEST_TIMEOUT_HEADER}` must be a finite decimal number of seconds "
            f"greater than 0 (e.g. 2.5), got {_header_text(raw)!r}"
        )
    return value


def annotate(request: Request, **fields: Any) -> None:
    """Add fields (pairs, tokens, ...) to this request's access-log line."""
    request.scope.setdefault(LOG_SCOPE_KEY, {}).update(fields)


def timing_headers(
    request: Request, result: Any, started: float, characters: int
) -> dict[str, str]:
    """TEI's headers for an HTTP answer: `response_timing_headers` on this request's device."""
    device = str(admitted_service(request).info.device)
    return response_timing_headers(device, result, started, characters)


def response_timing_headers(
    device: str, result: Any, started: float, characters: int
) -> dict[str, str]:
    """TEI's headers (router/src/lib.rs, `From<ResponseMetadata> for HeaderMap`), times in whole
    milliseconds like TEI; the gRPC API sends the same as response metadata. `characters`: the
    Unicode characters scored (x-compute-characters: for a rerank the query counts once per
    text). x-compute-type: TEI always says "gpu+optimized"; we say "cpu" on a CPU."""

    def ms(seconds: float) -> str:
        return str(round(seconds * 1000))

    total = ms(time.perf_counter() - started)
    return {
        "x-compute-type": "cpu" if device.startswith("cpu") else "gpu+optimized",
        "x-compute-time": total,
        "x-compute-characters": str(characters),
        "x-compute-tokens": str(int(result.total_tokens)),
        "x-total-time": total,
        "x-tokenization-time": ms(result.tokenization_time_s),
        "x-queue-time": ms(result.queue_time_s),
        "x-inference-time": ms(result.inference_time_s),
    }
