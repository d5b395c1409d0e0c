"""TEI's gRPC API on `--grpc-port`, beside the HTTP API, in the same process and event loop.

What TEI's gRPC build serves for a reranker or classifier (router/src/grpc/server.rs), with the
same package, services, methods and messages (tei.proto), so TEI's gRPC clients work unchanged:

- `tei.v1.Info/Info`;
- `tei.v1.Rerank/Rerank`, and `RerankStream` (one (query, text) pair per message, one answer);
- `tei.v1.Predict/Predict`, `PredictPair` and their bidirectional streams;
- `tei.v1.Tokenize/Tokenize`, `Decode` and their streams;
- `tei.v1.Embed/*`, refused with FAILED_PRECONDITION as TEI refuses it for a cross-encoder;
- `grpc.health.v1.Health` (per service, as TEI sets it) and server reflection (v1alpha, as TEI).

Requests go through the same service, admission (`--max-concurrent-requests`), deadlines (the
call's gRPC deadline) and metrics as HTTP requests. Errors carry TEI's status codes; answers
carry TEI's timing headers as response metadata and the `Metadata` message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from reranker_runtime import metrics, tracing
from reranker_runtime.api.auth import check_authorization
from reranker_runtime.api.deps import response_timing_headers
from reranker_runtime.api.errors import DROPPED, client_message, failure_reason, http_error
from reranker_runtime.api.ops import build_info
from reranker_runtime.errors import (
    EmptyInputError,
    NotReadyError,
    RequestReadTimeoutError,
    RerankerError,
    StreamIdleError,
    TooManyCallsError,
    TooManyCharactersError,
    TooManyChunksPerRequestError,
    TooManyChunksPerTextError,
    ValidationError,
    WrongModelKindError,
)
from reranker_runtime.grpc_api import messages as m
from reranker_runtime.lifecycle import State, not_ready_error
from reranker_runtime.limits import count_characters
from reranker_runtime.logging import log_fields

if TYPE_CHECKING:
    from reranker_runtime.config import ServeSettings
    from reranker_runtime.lifecycle import Lifecycle
    from reranker_runtime.service import RerankService
    from reranker_runtime.tokenization import TokenInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

# Health and reflection describe themselves from the same pool as tei.v1 (reflection reads it).
for _file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
    m.POOL.AddSerializedFile(_file.serialized_pb)

# TEI's status for each of its error types (server.rs, `impl From<ErrorResponse> for Status`),
# keyed by the error_type our HTTP mapping gives the error; a deadline is DEADLINE_EXCEEDED.
_STATUS_BY_ERROR_TYPE = {
    "Validation": grpc.StatusCode.INVALID_ARGUMENT,
    "Empty": grpc.StatusCode.INVALID_ARGUMENT,
    "Overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "Unhealthy": grpc.StatusCode.UNAVAILABLE,
    "Backend": grpc.StatusCode.FAILED_PRECONDITION,
    "Timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    "Unauthorized": grpc.StatusCode.UNAUTHENTICATED,
}
NOT_EMBEDDING = (
    "Backend error: Model is not an embedding model (this server serves a cross-encoder: use "
    "tei.v1.Rerank, or tei.v1.Predict for a classifier)"
)
# Messages of one bidirectional stream scored at once; the answers still go out in order.
STREAM_PARALLELISM = 64
# How long a stream keeps its permit after its last message was answered: a client that sends,
# reads and sends again keeps it; one that goes quiet gives it back.
STREAM_PERMIT_LINGER_S = 1.0
# A stream quiet this long (every message answered, no new one) is ended (DEADLINE_EXCEEDED):
# open calls are bounded (--max-connections), and one that sends nothing must not hold its
# place for ever.
STREAM_IDLE_TIMEOUT_S = 300.0
# Calls beyond --max-connections that gRPC lets through for health checks and reflection.
UNCOUNTED_CALLS = 64
# A connection with no call for this long is closed.
GRPC_CONNECTION_IDLE_S = 300
# gRPC's usual limit, raised to --payload-limit where that is larger.
MIN_MESSAGE_BYTES = 4 * 1024 * 1024
HEALTH_POLL_S = 0.5
STOP_GRACE_S = 5.0


def grpc_status(exc: RerankerError) -> tuple[grpc.StatusCode, str]:
    """The status and message a gRPC client gets for a domain error: the HTTP answer's message
    and advice, except advice a gRPC client cannot follow: about the HTTP X-Request-Timeout
    header (a gRPC call has its own deadline), or the max_chunks_per_doc field (tei.v1 has none:
    the server's --max-chunks-per-doc applies)."""
    mapped = http_error(exc)
    code = _STATUS_BY_ERROR_TYPE.get(mapped.error_type, grpc.StatusCode.INTERNAL)
    if mapped.status >= 500 and mapped.error_type == "Backend":
        code = grpc.StatusCode.INTERNAL  # our own failure (InternalError), not the model's
    if isinstance(exc, TooManyChunksPerTextError):
        limit = "(the server's --max-chunks-per-doc)"
        message = exc.message.replace("(max_chunks_per_doc)", limit)
        message += "; set truncate=true to score only the first windows"
    elif isinstance(exc, TooManyChunksPerRequestError):
        message = f"{exc.message}; send fewer or shorter texts"
    elif "X-Request-Timeout" in mapped.advice:
        message = exc.message
    else:
        message = client_message(exc)
    return code, message


class GrpcApi:
    """The gRPC server: `await start()` binds `--grpc-port`, `await stop()` drains it."""

    def __init__(self, lifecycle: Lifecycle, settings: ServeSettings) -> None:
        self._lifecycle = lifecycle
        self._settings = settings
        message_bytes = max(MIN_MESSAGE_BYTES, settings.payload_limit)
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", message_bytes),
                # gRPC shares a port with another server by default: a second process (or a
                # stale one) would silently take half the calls. Binding must fail instead.
                ("grpc.so_reuseport", 0),
                # A connection with no call for this long is closed (abandoned clients'
                # sockets do not pile up; a client reconnects on its next call).
                ("grpc.max_connection_idle_ms", GRPC_CONNECTION_IDLE_S * 1000),
                # Pings find peers that vanished without closing (a node gone): their calls
                # and connections are dropped rather than held.
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
            ],
            # tei.v1 calls are bounded by --max-connections (GrpcApi.open_call); this cap, a
            # little above, leaves health checks and reflection room beside them.
            maximum_concurrent_rpcs=settings.max_connections + UNCOUNTED_CALLS,
        )
        self._health = health.aio.HealthServicer()
        self._health_task: asyncio.Task[None] | None = None
        self._health_seen: tuple[State, int] | None = None
        # Set once the server drains: open streams stop reading and end with UNAVAILABLE.
        self.closing = asyncio.Event()
        self.port = 0
        self._open_calls = 0

    @contextlib.contextmanager
    def open_call(self) -> Iterator[None]:
        """One tei.v1 call open, streams included: at most --max-connections at once, as HTTP
        connections are (health and reflection are not counted: a probe still gets through)."""
        limit = self._settings.max_connections
        if self._open_calls >= limit:
            raise TooManyCallsError(self._open_calls, limit)
        self._open_calls += 1
        try:
            yield
        finally:
            self._open_calls -= 1

    async def start(self) -> int:
        """Bind `--host`:`--grpc-port` and serve; returns the port. Raises RuntimeError naming
        the address when it cannot be bound (in use, or not an address of this machine)."""
        self._server.add_generic_rpc_handlers(_handlers(self))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = [*m.service_names(), health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self._server, pool=m.POOL)
        host = self._settings.host
        address = (
            f"[{host}]:{self._settings.grpc_port}"
            if ":" in host
            else f"{host}:{self._settings.grpc_port}"
        )
        try:
            self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise RuntimeError(
                f"cannot listen for gRPC on {address} ({exc}): another process may hold the "
                "port (choose another --grpc-port), or --host is not an address of this machine"
            ) from exc
        await self._update_health()  # NOT_SERVING until the model is ready, from the first call
        await self._server.start()
        self._health_task = asyncio.create_task(self._track_health(), name="grpc-health")
        log.info("gRPC API listening", extra=log_fields(address=address, port=self.port))
        return self.port

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        # Open streams stop reading now (the health poll may not come round again first).
        self.closing.set()
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace_s)

    # -- health ------------------------------------------------------------------------------

    async def _track_health(self) -> None:
        """grpc.health.v1 follows the lifecycle, checked every HEALTH_POLL_S."""
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            await self._update_health()

    async def _update_health(self) -> None:
        """Every service SERVING once the model is ready (Rerank only for a reranker, never
        Embed), NOT_SERVING while loading or draining. Info and Tokenize too: they need the
        model's tokenizer and config (TEI keeps them SERVING from the start)."""
        service = self._lifecycle.service
        now = (self._lifecycle.state, service.info.num_labels if service else 0)
        if now == self._health_seen:
            return
        self._health_seen = now
        if now[0] in (State.DRAINING, State.STOPPED, State.FAILED):
            self.closing.set()
        ready = self._lifecycle.ready
        reranker = ready and service is not None and service.info.num_labels == 1
        statuses = {
            "": ready,
            "tei.v1.Info": ready,
            "tei.v1.Tokenize": ready,
            "tei.v1.Predict": ready,
            "tei.v1.Rerank": reranker,
            "tei.v1.Embed": False,
        }
        for name, serving in statuses.items():
            await self._health.set(
                name,
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING,
            )

    # -- shared steps ------------------------------------------------------------------------

    def authorize(self, context: grpc.aio.ServicerContext) -> None:
        """With --api-key: the `authorization` metadata entry, `Bearer <key>` (TEI's) or
        `Api-Key <key>` (BEI's), checked as HTTP checks its header (constant-time)."""
        key = self._settings.api_key
        if key is None:
            return
        sent = dict(context.invocation_metadata() or ()).get("authorization")
        refusal = check_authorization(sent if isinstance(sent, str) else None, key)
        if refusal is not None:
            raise refusal

    async def admitted(
        self,
        work: Callable[[RerankService], Awaitable[T]],
        *,
        method: str | None,
        limited: bool = True,
        receive: Callable[[], Awaitable[None]] | None = None,
    ) -> T:
        """Run `work` on the service as one admitted request, counted in TEI's metrics under
        `method` (None: not counted, as TEI does not count tokenize and decode). `receive`, if
        given, reads the request first, counted but not admitted: a client that sends slowly
        holds no --max-concurrent-requests permit meanwhile."""
        started = time.perf_counter()
        if method is not None:
            metrics.REQUEST_COUNT.inc(method=method)
        try:
            if receive is not None:
                await receive()
            async with self._lifecycle.admit(limited=limited) as service:
                result = await work(service)
        except asyncio.CancelledError:
            if method is not None:
                metrics.REQUEST_FAILURE.inc(err=DROPPED)
            raise
        except Exception as exc:
            if method is not None:
                metrics.REQUEST_FAILURE.inc(err=failure_reason(exc))
            raise
        if method is not None:
            metrics.REQUEST_SUCCESS.inc(method=method)
            metrics.REQUEST_DURATION.observe(time.perf_counter() - started)
        return result

    def closed_error(self) -> NotReadyError:
        """Why an open call ends as the server stops: the lifecycle's state, or draining when
        it is still ready (stop() without a drain first, as when embedded)."""
        if self._lifecycle.ready:
            return not_ready_error(State.DRAINING)
        return self._lifecycle.not_ready_error()

    def device(self) -> str:
        service = self._lifecycle.service
        return str(service.info.device) if service is not None else "cpu"


# -- request handling ----------------------------------------------------------------------------


# gRPC codes that mark a server span as failed (OpenTelemetry's RPC conventions).
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_TRACE_CONTEXT = TraceContextTextMapPropagator()


def _server_span(
    context: grpc.aio.ServicerContext, path: str
) -> contextlib.AbstractContextManager[Span]:
    """The call's server span under the caller's `traceparent` metadata; with tracing off, no
    span and no look at the metadata (the caller's ids stay out of our logs)."""
    if not tracing.enabled():
        return contextlib.nullcontext(INVALID_SPAN)
    metadata = {
        key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)
    }
    service, _, method = path.rpartition("/")
    return tracing.tracer().start_as_current_span(
        path,
        context=_TRACE_CONTEXT.extract(metadata),
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        record_exception=False,
        set_status_on_exception=False,
    )


@contextlib.asynccontextmanager
async def _call(context: grpc.aio.ServicerContext, path: str) -> AsyncIterator[None]:
    """One gRPC call: its trace span (with --otlp-endpoint; `tei.v1.Rerank/Rerank`, a child of
    the caller's `traceparent` metadata), then the call ended with TEI's status for a domain
    error and with INTERNAL (logged with its traceback, no detail to the client) for anything
    unexpected."""
    code = grpc.StatusCode.OK
    with _server_span(context, path) as span:
        try:
            yield
        except RerankerError as exc:
            code, message = grpc_status(exc)
            await context.abort(code, message)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            span.record_exception(exc)
            log.exception("unhandled error in a gRPC call", extra=log_fields(method=path))
            await context.abort(code, "internal error (logged by the server)")
        finally:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code in _SERVER_ERRORS:
                span.set_status(Status(StatusCode.ERROR, code.name))


def _request_id(context: grpc.aio.ServicerContext) -> str:
    sent = dict(context.invocation_metadata() or ()).get("x-request-id")
    return sent if isinstance(sent, str) and 0 < len(sent) <= 128 else uuid.uuid4().hex


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(remaining, 1e-3)


def _metadata(result: Any, started: float, characters: int) -> Any:
    ns = 1_000_000_000
    return m.Metadata(
        compute_chars=characters,
        compute_tokens=int(result.total_tokens),
        total_time_ns=int((time.perf_counter() - started) * ns),
        tokenization_time_ns=int(result.tokenization_time_s * ns),
        queue_time_ns=int(result.queue_time_s * ns),
        inference_time_ns=int(result.inference_time_s * ns),
    )


async def _send_timing(
    api: GrpcApi, context: grpc.aio.ServicerContext, result: Any, started: float, characters: int
) -> None:
    headers = response_timing_headers(api.device(), result, started, characters)
    await context.send_initial_metadata(tuple(headers.items()))


def _direction(request: Any) -> str:
    return m.TRUNCATION_DIRECTIONS.get(request.truncation_direction, "right")


async def info(api: GrpcApi, request: Any, context: grpc.aio.ServicerContext) -> Any:
    body = build_info(api._lifecycle)
    kind = m.MODEL_TYPE_RERANKER if body.num_labels == 1 else m.MODEL_TYPE_CLASSIFIER
    answer = m.InfoResponse(
        version=body.version,
        model_id=body.model_id,
        model_dtype=body.model_dtype,
        model_type=kind,
        max_concurrent_requests=body.max_concurrent_requests,
        max_input_length=body.max_input_length,
        max_batch_tokens=body.max_batch_tokens,
        max_client_batch_size=body.max_client_batch_size,
        tokenization_workers=body.tokenization_workers,
    )
    for field, value in (
        ("sha", body.sha),
        ("docker_label", body.docker_label),
        ("model_sha", body.model_sha),
        ("max_batch_requests", body.max_batch_requests),
    ):
        if value is not None:
            setattr(answer, field, value)
    return answer


async def rerank(api: GrpcApi, request: Any, context: grpc.aio.ServicerContext) -> Any:
    started = time.perf_counter()
    texts = list(request.texts)
    if not texts:
        raise EmptyInputError("`texts` cannot be empty")
    result = await api.admitted(
        lambda service: service.rerank(
            request.query,
            texts,
            truncate=request.truncate,
            truncation_direction=_direction(request),
            raw_scores=request.raw_scores,
            timeout_s=_timeout(context),
            request_id=_request_id(context),
        ),
        method="batch",
    )
    characters = count_characters((request.query, text) for text in texts)
    await _send_timing(api, context, result, started, characters)
    ranks = [
        m.Rank(
            index=i, score=result.scores[i], **({"text": texts[i]} if request.return_text else {})
        )
        for i in result.ranking()
    ]
    return m.RerankResponse(ranks=ranks, metadata=_metadata(result, started, characters))


async def rerank_stream(
    api: GrpcApi, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
) -> Any:
    """One (query, text) per message, each message its own query; raw_scores, return_text,
    truncate and truncation_direction are the first message's (TEI reads the first two from
    it). The stream is read whole before the call is admitted, within --request-read-timeout,
    and refused as soon as it passes --max-client-batch-size messages or
    --max-request-characters (TEI takes any number, all held in memory)."""
    started = time.perf_counter()
    messages: list[Any] = []

    async def receive() -> None:
        if not api._lifecycle.ready:  # refused at once, as before reading
            raise api._lifecycle.not_ready_error()
        messages.extend(await _read_whole_stream(api, request_iterator))

    async def score(service: RerankService) -> Any:
        if not messages:
            raise EmptyInputError("`texts` cannot be empty: the stream sent no message")
        if service.info.num_labels != 1:
            raise WrongModelKindError("model is not a re-ranker model")
        first = messages[0]
        return await service.predict(
            [(msg.query, msg.text) for msg in messages],
            truncate=first.truncate,
            truncation_direction=_direction(first),
            raw_scores=first.raw_scores,
            timeout_s=_timeout(context),
            request_id=_request_id(context),
        )

    result = await api.admitted(score, method="batch", receive=receive)
    first = messages[0]
    scores = [prediction[0][1] for prediction in result.predictions]
    characters = count_characters((msg.query, msg.text) for msg in messages)
    await _send_timing(api, context, result, started, characters)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks = [
        m.Rank(
            index=i,
            score=scores[i],
            **({"text": messages[i].text} if first.return_text else {}),
        )
        for i in order
    ]
    return m.RerankResponse(ranks=ranks, metadata=_metadata(result, started, characters))


async def _read_whole_stream(api: GrpcApi, request_iterator: AsyncIterator[Any]) -> list[Any]:
    """A RerankStream's messages, within --request-read-timeout (a client that opens the
    stream and never ends it is dropped) and the request limits; a drain stops the reading."""
    settings = api._settings
    messages: list[Any] = []

    async def read() -> None:
        characters = 0
        async for message in request_iterator:
            messages.append(message)
            if len(messages) > settings.max_client_batch_size:
                limit = settings.max_client_batch_size
                raise ValidationError(
                    f"batch size {len(messages)} > maximum allowed batch size {limit}: the "
                    f"stream sent more than {limit} pairs (--max-client-batch-size); split it"
                )
            characters += count_characters([(message.query, message.text)])
            if characters > settings.max_request_characters:
                raise TooManyCharactersError(characters, settings.max_request_characters)

    reading = asyncio.ensure_future(read())
    closing = asyncio.ensure_future(api.closing.wait())
    try:
        done, _ = await asyncio.wait(
            {reading, closing},
            timeout=settings.request_read_timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if reading in done:
            reading.result()  # its error, if the stream broke a limit
            return messages
        if closing in done:
            raise api.closed_error()
        raise RequestReadTimeoutError(
            f"the request stream ({len(messages)} messages so far)", settings.request_read_timeout
        )
    finally:
        reading.cancel()
        closing.cancel()
        await asyncio.gather(reading, closing, return_exceptions=True)


@dataclass(frozen=True)
class _Predicted:
    """A Predict answer with what its response metadata needs."""

    answer: Any
    result: Any
    started: float
    characters: int


async def _predict_on(
    service: RerankService, request: Any, context: grpc.aio.ServicerContext, *, pair: bool
) -> _Predicted:
    started = time.perf_counter()
    item: str | tuple[str, str]
    if pair:
        inputs = list(request.inputs)
        if len(inputs) not in (1, 2):
            raise ValidationError(
                f"`inputs` must have a single or two elements. Given: {len(inputs)}"
            )
        item = inputs[0] if len(inputs) == 1 else (inputs[0], inputs[1])
    else:
        item = request.inputs
    result = await service.predict(
        [item],
        truncate=request.truncate,
        truncation_direction=_direction(request),
        raw_scores=request.raw_scores,
        timeout_s=_timeout(context),
        request_id=_request_id(context),
    )
    characters = count_characters([item])
    predictions = [m.Prediction(score=score, label=label) for label, score in result.predictions[0]]
    answer = m.PredictResponse(
        predictions=predictions, metadata=_metadata(result, started, characters)
    )
    return _Predicted(answer, result, started, characters)


async def _predict_unary(
    api: GrpcApi, request: Any, context: grpc.aio.ServicerContext, *, pair: bool
) -> Any:
    done = await api.admitted(
        lambda service: _predict_on(service, request, context, pair=pair), method="single"
    )
    await _send_timing(api, context, done.result, done.started, done.characters)
    return done.answer


async def predict(api: GrpcApi, request: Any, context: grpc.aio.ServicerContext) -> Any:
    return await _predict_unary(api, request, context, pair=False)


async def predict_pair(api: GrpcApi, request: Any, context: grpc.aio.ServicerContext) -> Any:
    return await _predict_unary(api, request, context, pair=True)


async def _tokenize_on(service: RerankService, request: Any) -> bytes:
    """The EncodeResponse, serialized off the event loop (as /tokenize's answer)."""
    return await service.tokenize_answer(
        [request.inputs], _encoded_response, add_special_tokens=request.add_special_tokens
    )


def _encoded_response(sequences: list[list[TokenInfo]]) -> bytes:
    return bytes(_encode_response(sequences).SerializeToString())


def _encode_response(sequences: list[list[TokenInfo]]) -> Any:
    tokens = [
        m.SimpleToken(
            id=t.id,
            text=t.text,
            special=t.special,
            **({"start": t.start, "stop": t.stop} if t.start is not None else {}),
        )
        for t in sequences[0]
    ]
    return m.EncodeResponse(tokens=tokens)


async def _decode_on(service: RerankService, request: Any) -> Any:
    texts = await service.decode(
        [list(request.ids)], skip_special_tokens=request.skip_special_tokens
    )
    return m.DecodeResponse(text=texts[0])


async def tokenize(api: GrpcApi, request: Any, context: grpc.aio.ServicerContext) -> Any:
    return await api.admitted(
        lambda service: _tokenize_on(service, request), method=None, limited=False
    )


async def decode(api: GrpcApi, request: Any, context: grpc.aio.ServicerContext) -> Any:
    return await api.admitted(
        lambda service: _decode_on(service, request), method=None, limited=False
    )


StreamStep = Callable[["RerankService", Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _ordered_stream(
    one: StreamStep, *, limited: bool
) -> Callable[[GrpcApi, AsyncIterator[Any], grpc.aio.ServicerContext], AsyncIterator[Any]]:
    """A bidirectional stream: one answer per message, in the order sent. The stream is
    admitted once, as one request (a drain waits for it), and scores up to STREAM_PARALLELISM
    of its messages at once; `limited`: it holds one --max-concurrent-requests permit while
    its messages keep coming (see _StreamPermit), none while it is quiet (open streams that
    send nothing cannot lock every caller out). Its messages are not counted in
    te_request_count, as in TEI. The first error ends the call with its status, after the
    answers before it (as TEI's streams do)."""

    async def stream(
        api: GrpcApi, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async with api._lifecycle.admit(limited=False) as service:
            permit = _StreamPermit(api._lifecycle)
            step = functools.partial(_holding, permit, one) if limited else one
            answers = _answers_in_order(api, service, step, request_iterator, context)
            try:
                async for answer in answers:
                    yield answer
            finally:
                try:
                    await answers.aclose()  # its messages cancelled and done first
                finally:
                    permit.close()

    return stream


class _StreamPermit:
    """A stream's one --max-concurrent-requests permit: taken when one of its messages starts
    being scored, kept while they keep coming (returned STREAM_PERMIT_LINGER_S after the last
    one is answered, so a client that sends, reads the answer and sends again keeps it), and
    returned when the stream ends."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle
        self._scoring = 0
        self._held = False
        self._linger: asyncio.TimerHandle | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if not self._held:
            self._lifecycle.take_scoring_permit()  # OverloadedError ends the stream
            self._held = True
        self._scoring += 1
        try:
            yield
        finally:
            self._scoring -= 1
            if self._scoring == 0 and self._held:
                loop = asyncio.get_running_loop()
                self._linger = loop.call_later(STREAM_PERMIT_LINGER_S, self._give_back)

    def _give_back(self) -> None:
        self._linger = None
        if self._held and self._scoring == 0:
            self._held = False
            self._lifecycle.return_scoring_permit()

    def close(self) -> None:
        """The stream ended: the permit goes back now."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._held:
            self._held = False
            self._lifecycle.return_scoring_permit()


async def _holding(
    permit: _StreamPermit, one: StreamStep, service: RerankService, message: Any, context: Any
) -> Any:
    with permit.held():
        return await one(service, message, context)


async def _answers_in_order(
    api: GrpcApi,
    service: RerankService,
    one: StreamStep,
    request_iterator: AsyncIterator[Any],
    context: grpc.aio.ServicerContext,
) -> AsyncGenerator[Any, None]:
    """Score each message as it arrives, answer in order. When the server drains, stop reading:
    the messages already read are answered, then the call ends with UNAVAILABLE (an open stream
    would otherwise hold the drain for its whole timeout)."""
    pending: asyncio.Queue[asyncio.Future[Any] | None] = asyncio.Queue()
    started: set[asyncio.Future[Any]] = set()  # not finished yet
    slots = asyncio.Semaphore(STREAM_PARALLELISM)  # messages scored but not yet answered
    loop = asyncio.get_running_loop()
    # The idle clock runs only while every message read has been answered: a client waiting
    # for a slow answer is not quiet.
    unanswered = 0
    quiet_since = loop.time()

    async def read() -> None:
        nonlocal unanswered, quiet_since
        messages = aiter(request_iterator)
        closing = asyncio.ensure_future(api.closing.wait())
        arrival: asyncio.Future[Any] | None = None
        try:
            while True:
                if arrival is None:
                    arrival = asyncio.ensure_future(anext(messages))
                left = quiet_since + STREAM_IDLE_TIMEOUT_S - loop.time()
                await asyncio.wait(
                    {arrival, closing},
                    timeout=STREAM_IDLE_TIMEOUT_S if unanswered else max(left, 0.0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not arrival.done():
                    if closing.done():
                        raise api.closed_error()
                    if unanswered or loop.time() < quiet_since + STREAM_IDLE_TIMEOUT_S:
                        continue
                    raise StreamIdleError(STREAM_IDLE_TIMEOUT_S)
                done, arrival = arrival, None
                try:
                    message = done.result()
                except StopAsyncIteration:
                    return
                await slots.acquire()
                future = asyncio.ensure_future(one(service, message, context))
                started.add(future)
                future.add_done_callback(started.discard)
                unanswered += 1
                pending.put_nowait(future)
        finally:
            closing.cancel()
            if arrival is not None:
                arrival.cancel()
            pending.put_nowait(None)  # the queue is unbounded: this never waits

    reader = asyncio.ensure_future(read())
    try:
        while (future := await pending.get()) is not None:
            try:
                yield await future
            finally:
                slots.release()
                unanswered -= 1
                quiet_since = loop.time()
        await reader  # a broken request stream, or the drain, ends the call with its error
    finally:
        # The call ended (done, failed, cancelled): nothing of it may run on.
        reader.cancel()
        left = list(started)
        for future in left:
            future.cancel()
        await asyncio.gather(reader, *left, return_exceptions=True)
        # Messages scored (or failed) but not answered, once an earlier one ended the call:
        # their errors are this call's, already reported (else asyncio logs each as "never
        # retrieved").
        while not pending.empty():
            future = pending.get_nowait()
            if future is not None and future.done() and not future.cancelled():
                future.exception()


async def _predict_stream_one(service: RerankService, request: Any, context: Any) -> Any:
    return (await _predict_on(service, request, context, pair=False)).answer


async def _predict_pair_stream_one(service: RerankService, request: Any, context: Any) -> Any:
    return (await _predict_on(service, request, context, pair=True)).answer


async def _tokenize_stream_one(service: RerankService, request: Any, context: Any) -> Any:
    return await _tokenize_on(service, request)


async def _decode_stream_one(service: RerankService, request: Any, context: Any) -> Any:
    return await _decode_on(service, request)


def _not_embedding() -> WrongModelKindError:
    """What an Embed call gets, counted as TEI counts it."""
    metrics.REQUEST_COUNT.inc(method="single")
    metrics.REQUEST_FAILURE.inc(err="model_type")
    return WrongModelKindError(NOT_EMBEDDING)


async def embed_refused(api: GrpcApi, request: Any, context: grpc.aio.ServicerContext) -> Any:
    raise _not_embedding()


async def embed_stream_refused(
    api: GrpcApi, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    raise _not_embedding()
    yield  # never reached: makes this an async generator, as a stream handler must be


@dataclass(frozen=True)
class _Undecodable:
    """A message that is not the method's protobuf (bad bytes, a string that is not UTF-8):
    handed to the handler, which answers INVALID_ARGUMENT, instead of gRPC's UNKNOWN with a
    traceback in the log for each one."""

    error: str


def _decoder(message_class: Any) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return _Undecodable(str(exc))

    return decode


def _serialized(response: Any) -> bytes:
    """A response message's bytes; bytes already serialized off the event loop (a large
    Tokenize answer) as they are."""
    return response if isinstance(response, bytes) else bytes(response.SerializeToString())


def _decoded(message: Any) -> Any:
    if isinstance(message, _Undecodable):
        raise ValidationError(f"the request message cannot be decoded: {message.error}")
    return message


async def _decoded_stream(messages: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for message in messages:
        yield _decoded(message)


def _handlers(api: GrpcApi) -> list[grpc.GenericRpcHandler]:
    """Every tei.v1 method: authorized, then run inside `_call` (trace span, errors)."""

    def answered(
        path: str, fn: Callable[..., Awaitable[Any]], *, client_stream: bool = False
    ) -> Callable[..., Awaitable[Any]]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _call(context, path):
                with api.open_call():
                    api.authorize(context)
                    request = _decoded_stream(request) if client_stream else _decoded(request)
                    return await fn(api, request, context)

        return handle

    def streamed(path: str, fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
        async def handle(
            request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            async with _call(context, path):
                with api.open_call():
                    api.authorize(context)
                    async for answer in fn(api, _decoded_stream(request_iterator), context):
                        yield answer

        return handle

    def service(name: str, methods: dict[str, tuple[str, Any, Any, Any]]) -> Any:
        """methods: name -> (kind, function, request class, response class)."""
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method, (kind, fn, request, _response) in methods.items():
            path = f"{name}/{method}"
            codecs: dict[str, Any] = {
                "request_deserializer": _decoder(request),
                "response_serializer": _serialized,
            }
            if kind == "unary":
                handler = grpc.unary_unary_rpc_method_handler(answered(path, fn), **codecs)
            elif kind == "client_stream":
                handler = grpc.stream_unary_rpc_method_handler(
                    answered(path, fn, client_stream=True), **codecs
                )
            else:
                handler = grpc.stream_stream_rpc_method_handler(streamed(path, fn), **codecs)
            handlers[method] = handler
        return grpc.method_handlers_generic_handler(name, handlers)

    embed, embed_stream = embed_refused, embed_stream_refused
    return [
        service("tei.v1.Info", {"Info": ("unary", info, m.InfoRequest, m.InfoResponse)}),
        service(
            "tei.v1.Rerank",
            {
                "Rerank": ("unary", rerank, m.RerankRequest, m.RerankResponse),
                "RerankStream": (
                    "client_stream",
                    rerank_stream,
                    m.RerankStreamRequest,
                    m.RerankResponse,
                ),
            },
        ),
        service(
            "tei.v1.Predict",
            {
                "Predict": ("unary", predict, m.PredictRequest, m.PredictResponse),
                "PredictPair": ("unary", predict_pair, m.PredictPairRequest, m.PredictResponse),
                "PredictStream": (
                    "stream",
                    _ordered_stream(_predict_stream_one, limited=True),
                    m.PredictRequest,
                    m.PredictResponse,
                ),
                "PredictPairStream": (
                    "stream",
                    _ordered_stream(_predict_pair_stream_one, limited=True),
                    m.PredictPairRequest,
                    m.PredictResponse,
                ),
            },
        ),
        service(
            "tei.v1.Tokenize",
            {
                "Tokenize": ("unary", tokenize, m.EncodeRequest, m.EncodeResponse),
                "TokenizeStream": (
                    "stream",
                    _ordered_stream(_tokenize_stream_one, limited=False),
                    m.EncodeRequest,
                    m.EncodeResponse,
                ),
                "Decode": ("unary", decode, m.DecodeRequest, m.DecodeResponse),
                "DecodeStream": (
                    "stream",
                    _ordered_stream(_decode_stream_one, limited=False),
                    m.DecodeRequest,
                    m.DecodeResponse,
                ),
            },
        ),
        service(
            "tei.v1.Embed",
            {
                "Embed": ("unary", embed, m.EmbedRequest, m.EmbedResponse),
                "EmbedStream": ("stream", embed_stream, m.EmbedRequest, m.EmbedResponse),
                "EmbedSparse": ("unary", embed, m.EmbedSparseRequest, m.EmbedSparseResponse),
                "EmbedSparseStream": (
                    "stream",
                    embed_stream,
                    m.EmbedSparseRequest,
                    m.EmbedSparseResponse,
                ),
                "EmbedAll": ("unary", embed, m.EmbedAllRequest, m.EmbedAllResponse),
                "EmbedAllStream": ("stream", embed_stream, m.EmbedAllRequest, m.EmbedAllResponse),
            },
        ),
    ]
