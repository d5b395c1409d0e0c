"""OpenTelemetry traces, sent over OTLP/gRPC to `--otlp-endpoint` as TEI does (off by default).

Each traced HTTP request is one server span (`POST /rerank`), each gRPC call one too
(`tei.v1.Rerank/Rerank`, grpc_api/server.py), a child of the caller's W3C `traceparent` when it
sends one. Inside it, three child spans show where the time went:
`tokenize`, `queue` (waiting for a forward pass) and `inference` (from the first forward pass to
the last). TEI's trace has no queue or inference span, only their times as attributes. A
request that ends before its scores (deadline, client gone, shutdown) gets `tokenize` and
`scoring`, cut where it ended.

The exporter runs in the SDK's batch processor thread: a collector that is down costs dropped
spans and a logged warning, never a slower or failed request. The sampler is the SDK's default
(the caller's decision, else every trace) and follows `OTEL_TRACES_SAMPLER`;
`OTEL_RESOURCE_ATTRIBUTES` adds resource attributes (pod name, namespace).

The tracer is held here, not in opentelemetry's process-global provider, so tests and embedders
can start and stop tracing more than once in one process.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import NoOpTracer, Tracer

from reranker_runtime.logging import log_fields

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "reranker-runtime"
# Bounds how long the server's exit waits for the last spans when the collector is slow or gone
# (the SDK's own flush has no time limit: its exporter retries for up to 10 s per batch).
FLUSH_TIMEOUT_MS = 5_000

_NOOP = NoOpTracer()


@dataclass
class _Active:
    provider: TracerProvider
    tracer: Tracer
    endpoint: str


_active: _Active | None = None


def check_endpoint(value: str) -> str:
    """`--otlp-endpoint`: a gRPC URL with its scheme (`http://collector:4317`; https for TLS).
    Raises ValueError saying what to write instead."""
    text = value.strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            "expected a URL with http:// (plain gRPC) or https:// (TLS) and a host, "
            "e.g. http://otel-collector:4317"
        )
    if parts.username is not None or parts.path not in ("", "/") or parts.query:
        raise ValueError(
            "expected scheme, host and port only (gRPC has no user, path or query here), "
            "e.g. http://otel-collector:4317"
        )
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        raise ValueError(
            "expected a port (OTLP/gRPC listens on 4317; without one gRPC would dial 443), "
            "e.g. http://otel-collector:4317"
        )
    return text


def start(endpoint: str, service_name: str | None = None) -> None:
    """Export spans to `endpoint` from now on (stops an earlier export first). `service_name`:
    the resource's service.name; None: OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, else
    DEFAULT_SERVICE_NAME."""
    # Imported here: the SDK and gRPC load only when tracing is on.
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise RuntimeError(
            f"--otlp-endpoint needs the OpenTelemetry SDK and its OTLP/gRPC exporter ({exc}): "
            "pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc, or install "
            "this package with its `runtime` extra"
        ) from exc

    global _active
    stop()
    endpoint = check_endpoint(endpoint)
    resource = Resource.create({SERVICE_NAME: service_name} if service_name else {})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    # The scheme decides TLS, whatever OTEL_EXPORTER_OTLP_INSECURE says.
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=urlsplit(endpoint).scheme == "http")
    # Not at interpreter exit: stop() bounds the wait, the SDK's own exit hook would not.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _active = _Active(provider, provider.get_tracer("reranker_runtime"), endpoint)
    log.info(
        "tracing: spans go to the OTLP collector",
        extra=log_fields(
            otlp_endpoint=endpoint, otlp_service_name=resource.attributes.get(SERVICE_NAME)
        ),
    )


def stop() -> None:
    """Send the spans still buffered, waiting at most FLUSH_TIMEOUT_MS, and stop exporting. On
    timeout the rest is dropped with a warning; the export thread winds down in the background."""
    global _active
    active, _active = _active, None
    if active is None:
        return
    done = threading.Event()

    def flush_and_shut_down() -> None:
        active.provider.force_flush()
        active.provider.shutdown()
        done.set()

    threading.Thread(target=flush_and_shut_down, name="otlp-flush", daemon=True).start()
    if not done.wait(FLUSH_TIMEOUT_MS / 1000):
        log.warning(
            "tracing: the last spans were not sent (the OTLP collector did not answer in time)",
            extra=log_fields(otlp_endpoint=active.endpoint, waited_ms=FLUSH_TIMEOUT_MS),
        )


def enabled() -> bool:
    return _active is not None


def tracer() -> Tracer:
    """The active tracer; a no-op one while tracing is off."""
    return _active.tracer if _active is not None else _NOOP


def record_phases(
    *,
    started: float,
    tokenization_s: float,
    queue_s: float,
    compute_s: float,
    batches: int,
    pairs: int,
    tokens: int,
) -> None:
    """The `tokenize`, `queue` and `inference` child spans of the current request span, laid end
    to end from `started` (a `time.perf_counter()` reading) to now. `compute_s`: the forward
    passes' own time, less than the inference span when the request's pairs went through passes
    with waits between them."""
    if not trace.get_current_span().is_recording():
        return
    start_ns, now_ns = _since(started)
    tokenized_ns = min(now_ns, start_ns + round(tokenization_s * 1e9))
    first_pass_ns = min(now_ns, tokenized_ns + round(queue_s * 1e9))
    _span("tokenize", start_ns, tokenized_ns, {"pairs": pairs, "tokens": tokens})
    _span("queue", tokenized_ns, first_pass_ns, {})
    _span(
        "inference",
        first_pass_ns,
        now_ns,
        {"forward_passes": batches, "compute_time_ms": round(compute_s * 1000, 3), "pairs": pairs},
    )


def record_unfinished(*, started: float, tokenization_s: float | None, scoring: bool) -> None:
    """For a request that ended before its scores (deadline, disconnect, shutdown, a refusal
    after tokenization): `tokenize`, cut at the end if it was still tokenizing, and `scoring`
    from the hand-over to the batcher up to the end if it got that far. A span that was cut has
    `completed=false`."""
    if not trace.get_current_span().is_recording():
        return
    start_ns, now_ns = _since(started)
    if tokenization_s is None:
        _span("tokenize", start_ns, now_ns, {"completed": False})
        return
    tokenized_ns = min(now_ns, start_ns + round(tokenization_s * 1e9))
    _span("tokenize", start_ns, tokenized_ns, {"completed": True})
    if scoring:
        _span("scoring", tokenized_ns, now_ns, {"completed": False})


def _since(started: float) -> tuple[int, int]:
    """(`started`, a perf_counter() reading, and now) as wall-clock ns, as spans need them."""
    now_ns = time.time_ns()
    return now_ns - round((time.perf_counter() - started) * 1e9), now_ns


def _span(name: str, start_ns: int, end_ns: int, attributes: dict[str, Any]) -> None:
    span = tracer().start_span(name, start_time=start_ns, attributes=attributes)
    span.end(end_time=end_ns)
