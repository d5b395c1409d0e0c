"""The FastAPI application: routers, error handlers (mapped by api/errors.py), access log +
metrics, and the lifespan that starts and drains the lifecycle.

`create_app(settings)` loads the model itself (in the background, from the lifespan);
`create_app(settings, engine=...)` or `create_app(settings, service=...)` serve what the caller
built (tests, other embedders). Either way the service is started (warm-up) in the background so
`/live` answers at once and `/health` says 503 until the model is ready (lifecycle.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reranker_runtime import __version__, metrics, tracing
from reranker_runtime.api import cohere, docs_ui, ops, other_models, tei, vllm
from reranker_runtime.api.auth import (
    all_routes,
    check_authorization,
    document_api_key,
    protected_operations,
)
from reranker_runtime.api.deps import (
    ARRIVED_AT_SCOPE_KEY,
    LOG_SCOPE_KEY,
    REQUEST_ID_SCOPE_KEY,
    ClientDisconnected,
    annotate,
)
from reranker_runtime.api.errors import (
    BODY_UNPARSABLE,
    CLIENT_CLOSED_REQUEST,
    FASTAPI_BODY_PARSE_ERROR,
    HTTP_ERROR_TYPES,
    INTERNAL_ERROR_BODY,
    error_body,
    error_response,
    plain_error_response,
)
from reranker_runtime.api.schema_limits import apply_client_batch_limit
from reranker_runtime.api.schemas import INPUT_ERROR, ErrorBody
from reranker_runtime.config import ServeSettings
from reranker_runtime.connections import CLIENT_STATUS_SCOPE_KEY
from reranker_runtime.errors import RerankerError
from reranker_runtime.lifecycle import Lifecycle
from reranker_runtime.logging import ACCESS_LOGGER, log_fields, trace_ids

if TYPE_CHECKING:
    from reranker_runtime.engines.base import Engine
    from reranker_runtime.service import RerankService

log = logging.getLogger(__name__)
access_log = logging.getLogger(ACCESS_LOGGER)
_WHITESPACE = re.compile(r"\s")

# Probes and scrapes arrive every few seconds; their access lines go to debug.
_QUIET_PATHS = frozenset({"/health", "/live", "/metrics", "/ping"})
# Set by AccessMiddleware when the client left before its answer started.
CLIENT_LEFT_SCOPE_KEY = "reranker.client_left"


def _is_probe(scope: Scope) -> bool:
    """A probe or scrape: the quiet paths, and `GET /` (TEI's health alias; `POST /` scores)."""
    path = scope.get("path", "")
    return path in _QUIET_PATHS or (path == "/" and scope.get("method") in ("GET", "HEAD"))


# A client-supplied request id is echoed only if it is short and plain.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


class _App(FastAPI):
    """FastAPI whose OpenAPI schema declares the API key on the protected routes when one is
    set, so /docs offers "Authorize" and generated clients send the header, and publishes the
    server's --max-client-batch-size as `maxItems` (api/schema_limits.py)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = super().openapi()
            apply_client_batch_limit(schema, self.state.max_client_batch_size)
            if self.state.api_key:
                document_api_key(schema, protected_operations(self.routes))
            # POST / and /invocations take /rerank's body on a reranker and /predict's on a
            # classifier: once the model is loaded the schema says which; until then, either
            # (and the schema is built again on the next call).
            kind = _default_route_body(self.state.lifecycle)
            if kind is not None:
                for path in tei.DEFAULT_ROUTE_PATHS:
                    body = schema["paths"][path]["post"]["requestBody"]["content"]
                    body["application/json"]["schema"] = {"$ref": f"#/components/schemas/{kind}"}
            self.openapi_schema = schema if kind is not None else None
            return schema
        return self.openapi_schema


def _default_route_body(lifecycle: Lifecycle) -> str | None:
    service = lifecycle.service
    if service is None:
        return None
    return "RerankRequest" if service.info.num_labels == 1 else "PredictRequest"


def create_app(
    settings: ServeSettings,
    engine: Engine | None = None,
    service: RerankService | None = None,
) -> FastAPI:
    lifecycle = Lifecycle(settings, engine=engine, service=service)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        grpc_api = None
        if settings.otlp_endpoint:  # before anything starts: a failure here has nothing to undo
            tracing.start(settings.otlp_endpoint, settings.otlp_service_name)
        try:
            lifecycle.start()
            if settings.grpc_port:
                from reranker_runtime.grpc_api.server import GrpcApi

                grpc_api = GrpcApi(lifecycle, settings)
                app.state.grpc_port = await grpc_api.start()
            yield
        finally:
            try:
                if grpc_api is not None:
                    try:
                        await grpc_api.stop()
                    finally:
                        await lifecycle.close()
                else:
                    await lifecycle.close()
            finally:
                if settings.otlp_endpoint:
                    # Flushing waits on the network: not on the event loop.
                    await asyncio.to_thread(tracing.stop)

    app = _App(
        title="reranker-runtime",
        version=__version__,
        description=(
            "BEI/TEI-compatible cross-encoder reranker server, with Cohere v2 and Jina rerank "
            'routes. Errors are `{"error", "error_type"}` with TEI\'s status codes.'
        ),
        lifespan=lifespan,
        # No 307 to the slash-less path: its absolute Location would echo the client's Host.
        redirect_slashes=False,
        # FastAPI's /docs and /redoc load their assets from a CDN; api/docs_ui.py serves both
        # from this process.
        docs_url=None,
        redoc_url=None,
        responses={
            "default": {
                "model": ErrorBody,
                "description": "Error: {error, error_type} (TEI error model)",
            },
        },
    )
    app.state.lifecycle = lifecycle
    # Read by ProtectedRoute (api/auth.py) on every protected route.
    app.state.api_key = settings.api_key
    app.state.max_client_batch_size = settings.max_client_batch_size
    app.include_router(tei.router)
    app.include_router(cohere.router)
    app.include_router(vllm.router)
    app.include_router(ops.router)
    app.include_router(ops.info_router)
    app.include_router(other_models.router)
    app.include_router(docs_ui.router)

    # TEI serves its schema at /api-doc/openapi.json; ours is at /openapi.json too.
    @app.get("/api-doc/openapi.json", include_in_schema=False)
    async def tei_openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    _install_error_handlers(app)

    # Metric labels: known paths only, so scanners hitting random URLs cannot blow up the
    # label cardinality.
    routes = frozenset(
        path for path in (getattr(r, "path", None) for r in all_routes(app.routes)) if path
    )
    get_routes = frozenset(
        r.path
        for r in all_routes(app.routes)
        if isinstance(r, Route) and "GET" in (r.methods or ())
    )
    # Innermost first; AccessMiddleware is outermost, so it sees every response, a refused body
    # and a CORS preflight included.
    app.add_middleware(HeadAsGetMiddleware, get_routes=get_routes)
    app.add_middleware(BodyLimitMiddleware, limit=settings.payload_limit, api_key=settings.api_key)
    origins = settings.cors_allow_origin
    app.add_middleware(
        CORSMiddleware,
        # TEI (router/src/http/server.rs): any origin unless --cors-allow-origin, GET and POST,
        # the Content-Type header; we also allow Authorization, which --api-key needs.
        allow_origins=["*"] if origins is None or "*" in origins else list(origins),
        allow_methods=["GET", "POST"],
        allow_headers=["content-type", "authorization"],
    )
    if settings.otlp_endpoint:
        # Inside AccessMiddleware, so the access-log line can carry the request's trace id.
        app.add_middleware(
            TraceMiddleware, routes=routes, trace_ids_in_log=not settings.disable_spans
        )
    app.add_middleware(AccessMiddleware, routes=routes)
    return app


# ---------------------------------------------------------------------------------------------
# Error handlers: each answers through api/errors.py's mapping.


_NOT_AN_OBJECT = frozenset({"model_attributes_type", "model_type", "dict_type"})
_JSON_TYPE_NAMES: dict[type, str] = {
    list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
    type(None): "null",
}  # fmt: skip


def _validation_message(errors: Sequence[Any]) -> tuple[int, str]:
    """(status, message) for pydantic/JSON errors: 400 for malformed JSON, else 422 with
    `field.path: problem` for each error (TEI's router names the field the same way)."""
    parts: list[str] = []
    for err in errors:
        kind = err.get("type", "")
        if kind == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "invalid JSON")
            pos = err.get("loc", ("body", 0))[-1]
            return 400, f"malformed JSON body: {detail} (at character {pos})"
        loc = list(err.get("loc", ()))
        if loc and loc[0] == "body":
            loc = loc[1:]
        if kind == INPUT_ERROR:
            # The message names the field already; a body nested in another (a /vertex
            # instance) adds where that body is.
            outer = "".join(f"{x}." for x in loc[:-1])
            parts.append(outer + str(err.get("msg")))
            continue
        # A body that is not JSON never gets here: JsonBodyRoute answers it 415 (api/deps.py).
        field = ".".join(str(x) for x in loc) or "body"
        if not loc and kind in _NOT_AN_OBJECT:
            # pydantic's "valid dictionary or object to extract fields from" says it obscurely.
            got = _JSON_TYPE_NAMES.get(type(err.get("input")), "something else")
            parts.append(f"body: must be a JSON object with the request's fields, got {got}")
            continue
        parts.append(f"{field}: {err.get('msg')}")
    shown = parts[:5]
    more = f" (and {len(parts) - 5} more errors)" if len(parts) > 5 else ""
    return 422, "; ".join(shown) + more


def _install_error_handlers(app: FastAPI) -> None:
    # Each handler also puts the message on the request's access-log line (one line, no
    # traceback: these are the client's errors).
    @app.exception_handler(RerankerError)
    async def _domain(request: Request, exc: RerankerError) -> JSONResponse:
        annotate(request, error=exc.message)
        return error_response(exc, path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(exc.errors())
        annotate(request, error=message)
        return plain_error_response(status, message, "Validation", path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if detail == FASTAPI_BODY_PARSE_ERROR:
            # UTF-8 and syntax errors are reported before this (JsonBodyRoute, json_invalid):
            # what is left is JSON the parser gave up on: nesting too deep, a number too long.
            detail = BODY_UNPARSABLE
        annotate(request, error=detail)
        headers = exc.headers
        if exc.status_code == 405:
            # Starlette lists the methods of the first route on the path; `/` has two routes.
            headers = {**(headers or {}), "Allow": _allowed_methods(app, request.url.path)}
        return plain_error_response(
            exc.status_code,
            detail,
            HTTP_ERROR_TYPES.get(exc.status_code, "Validation"),
            headers,
            path=request.url.path,
        )

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)


# ---------------------------------------------------------------------------------------------
# Request body limit (--payload-limit).


class PayloadTooLarge(StarletteHTTPException):
    """A request body over --payload-limit. An HTTPException, so FastAPI's body reading lets it
    through (it turns other errors into 400) and the HTTP handler answers it like any 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"request body is larger than the {limit}-byte limit; send fewer or shorter texts, "
            "or raise --payload-limit (RERANKER_PAYLOAD_LIMIT)",
        )


class HeadAsGetMiddleware:
    """HEAD on a GET route is answered as GET without the body: the same status and headers
    (Content-Length included), as RFC 9110 asks and TEI's router (axum) does. FastAPI answers
    405 otherwise, which breaks monitors that probe with HEAD."""

    def __init__(self, app: ASGIApp, get_routes: frozenset[str]) -> None:
        self.app = app
        self.get_routes = get_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "HEAD"
            or scope["path"] not in self.get_routes
        ):
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)


class BodyLimitMiddleware:
    """413 for a body over `limit` bytes: at once when Content-Length says so (the body is
    never read), else as soon as the bytes received pass it (chunked uploads), so no more than
    `limit` bytes are ever buffered. TEI: axum's DefaultBodyLimit. With an API key, a caller
    without it gets the route's 401 first (the body is not read then either): an
    unauthenticated caller learns nothing, the limit included."""

    def __init__(self, app: ASGIApp, limit: int, api_key: str | None = None) -> None:
        self.app = app
        self.limit = limit
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        authorized = not self.api_key or (
            check_authorization(headers.get("authorization"), self.api_key) is None
        )
        if (
            authorized
            and declared is not None
            and declared.isdigit()
            and int(declared) > self.limit
        ):
            error = PayloadTooLarge(self.limit)
            scope.setdefault(LOG_SCOPE_KEY, {})["error"] = error.detail
            await plain_error_response(413, error.detail, "Validation", path=scope["path"])(
                scope, receive, send
            )
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise PayloadTooLarge(self.limit)
            return message

        await self.app(scope, counted_receive, send)


# ---------------------------------------------------------------------------------------------
# Access log, request id, request metrics.


class AccessMiddleware:
    """Outermost layer: request id (echoed or generated), `reranker_http_requests_total` by route
    and the status the client got, and `reranker_http_request_duration_seconds`, one access-log
    line per request (with the error message of a refusal), and a JSON 500 for anything
    unexpected (never a bare traceback page). TEI's own counters are kept by the inference
    routes (deps.py).

    The status is the one the client got, whatever the application then tried to send: 408 when
    the connection layer gave up waiting for the body (`connections.CLIENT_STATUS_SCOPE_KEY`),
    499 when the client left before its answer."""

    def __init__(self, app: ASGIApp, routes: frozenset[str]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        fields: dict[str, Any] = {}
        scope[LOG_SCOPE_KEY] = fields
        scope[REQUEST_ID_SCOPE_KEY] = request_id
        scope[ARRIVED_AT_SCOPE_KEY] = asyncio.get_running_loop().time()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        async def receive_watching() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not response_started:
                scope[CLIENT_LEFT_SCOPE_KEY] = True  # whatever is sent from now reaches nobody
            return message

        try:
            await self.app(scope, receive_watching, send_with_id)
        except PayloadTooLarge as exc:
            # Raised while a body was read outside FastAPI's handling (e.g. a body sent to an
            # unknown path): still the client's 413, not a server error.
            fields["error"] = exc.detail
            if not response_started:
                status = 413
                await plain_error_response(413, exc.detail, "Validation", path=scope["path"])(
                    scope, receive, send_with_id
                )
        except Exception:
            if response_started:
                # The client already has its status: that is the one counted.
                log.exception(
                    "error after the response started",
                    extra=log_fields(request_id=request_id, **_trace_fields(fields)),
                )
            else:
                log.exception(
                    "unhandled error",
                    extra=log_fields(request_id=request_id, **_trace_fields(fields)),
                )
                status = 500
                body = json.dumps(
                    error_body(
                        INTERNAL_ERROR_BODY["error"],
                        INTERNAL_ERROR_BODY["error_type"],
                        path=scope["path"],
                    )
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"x-request-id", request_id.encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
        finally:
            duration = time.perf_counter() - started
            status = _client_side_status(scope) or status
            path: str = scope["path"]
            route = path if path in self.routes else "other"
            metrics.HTTP_REQUESTS.labels(route=route, status=str(status)).inc()
            metrics.HTTP_REQUEST_DURATION.labels(route=route).observe(duration)
            level = logging.DEBUG if _is_probe(scope) else logging.INFO
            if access_log.isEnabledFor(level):
                client = scope.get("client")
                access_log.log(
                    level,
                    "%s %s %d",
                    scope["method"],
                    # Re-encoded whitespace: a decoded `%20status=200` must not read as a field.
                    _WHITESPACE.sub(lambda m: urllib.parse.quote(m.group()), path),
                    status,
                    extra=log_fields(
                        request_id=request_id,
                        method=scope["method"],
                        route=route,
                        status=status,
                        duration_ms=round(duration * 1000, 2),
                        client=f"{client[0]}:{client[1]}" if client else None,
                        **fields,
                    ),
                )


# TEI's timing headers -> attributes of the request span (milliseconds and counts, as numbers).
_SPAN_ATTRIBUTES_FROM_HEADERS = (
    ("x-total-time", "total_time"),
    ("x-tokenization-time", "tokenization_time"),
    ("x-queue-time", "queue_time"),
    ("x-inference-time", "inference_time"),
    ("x-compute-tokens", "compute_tokens"),
    ("x-compute-characters", "compute_chars"),
)
_TRACE_CONTEXT = TraceContextTextMapPropagator()


class TraceMiddleware:
    """One OpenTelemetry server span per request (probes and scrapes excepted), named
    `METHOD route` and continuing the caller's W3C `traceparent`. It carries OpenTelemetry's
    HTTP attributes, the request id, and TEI's times (`total_time`, `queue_time`, ... in ms,
    from the response's timing headers). Its status code is the one the client got (408 and
    499 included, as AccessMiddleware counts it); a 5xx marks it as an error. The service adds
    the `tokenize`, `queue` and `inference` children (tracing.record_phases)."""

    def __init__(self, app: ASGIApp, routes: frozenset[str], trace_ids_in_log: bool) -> None:
        self.app = app
        self.routes = routes
        self.trace_ids_in_log = trace_ids_in_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or _is_probe(scope) or not tracing.enabled():
            await self.app(scope, receive, send)
            return
        route = path if path in self.routes else "other"
        carrier = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }
        with tracing.tracer().start_as_current_span(
            f"{scope['method']} {route}",
            context=_TRACE_CONTEXT.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": scope["method"],
                "http.route": route,
                "url.path": path,
                "request_id": scope.get(REQUEST_ID_SCOPE_KEY, ""),
            },
            record_exception=False,  # done below, with the status the client gets
            set_status_on_exception=False,
        ) as span:
            if self.trace_ids_in_log:
                scope.setdefault(LOG_SCOPE_KEY, {}).update(trace_ids())
            status: int | None = None

            async def send_traced(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    headers = Headers(raw=message.get("headers", []))
                    for header, attribute in _SPAN_ATTRIBUTES_FROM_HEADERS:
                        value = headers.get(header)
                        if value is not None and value.isdigit():
                            span.set_attribute(attribute, int(value))
                await send(message)

            try:
                await self.app(scope, receive, send_traced)
            except PayloadTooLarge:
                status = 413  # AccessMiddleware answers it
                raise
            except Exception as exc:
                span.record_exception(exc)
                status = 500  # AccessMiddleware answers it
                raise
            finally:
                # The status the client got, as the access log counts it.
                status = _client_side_status(scope) or status
                if status is not None:
                    span.set_attribute("http.response.status_code", status)
                if status is not None and status >= 500:
                    span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))


def _client_side_status(scope: Scope) -> int | None:
    """The status the client got instead of the one sent, if any: 408 when the connection layer
    gave up waiting for the body, 499 when it left before its answer (AccessMiddleware marks
    that)."""
    if CLIENT_STATUS_SCOPE_KEY in scope:
        status: int = scope[CLIENT_STATUS_SCOPE_KEY]
        return status
    return CLIENT_CLOSED_REQUEST if scope.get(CLIENT_LEFT_SCOPE_KEY) else None


def _trace_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The trace ids TraceMiddleware put in the access fields, for AccessMiddleware's own
    lines (written after the request's span has ended)."""
    return {key: fields[key] for key in ("trace_id", "span_id") if key in fields}


def _allowed_methods(app: FastAPI, path: str) -> str:
    """Every method some route serves at `path` (HEAD with GET: HeadAsGetMiddleware)."""
    methods: set[str] = set()
    for route in all_routes(app.routes):
        if getattr(route, "path", None) == path:
            methods.update(getattr(route, "methods", None) or ())
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _REQUEST_ID.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex
