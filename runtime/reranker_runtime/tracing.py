"""OpenTelemetry traces, sent over OTLP/gRPC to `--otlp-endpoint` as TEI does (off by default).

Each traced HTTP request is one server span (`POST /rerank`), a child of the caller's W3C
`traceparent` when it sends one. Inside it, three child spans show where the time went:
`tokenize`, `queue` (waiting for a forward pass) and `inference` (from the first forward pass to
the last). TEI's trace has no queue or inference span, only their times as attributes.

The exporter runs in the SDK's batch processor thread: a collector that is down costs dropped
spans and a logged warning, never a slower or failed request. The sampler is the SDK's default
(the caller's decision, else every trace) and follows `OTEL_TRACES_SAMPLER`;
`OTEL_RESOURCE_ATTRIBUTES` adds resource attributes (pod name, namespace).

The tracer is held here, not in opentelemetry's process-global provider, so tests and embedders
can start and stop tracing more than once in one process.
"""

from __future__ import annotations

import logging
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
# Bounds how long the server's exit waits for the last spans when the collector is slow or gone.
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
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            "expected a URL with http:// (plain gRPC) or https:// (TLS) and a host, "
            "e.g. http://otel-collector:4317"
        )
    return value.strip()


def start(endpoint: str, service_name: str = DEFAULT_SERVICE_NAME) -> None:
    """Export spans to `endpoint` from now on (stops an earlier export first)."""
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
    # insecure is derived from the scheme: http:// is plain gRPC, https:// is TLS.
    exporter = OTLPSpanExporter(endpoint=endpoint)
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _active = _Active(provider, provider.get_tracer("reranker_runtime"), endpoint)
    log.info(
        "tracing: spans go to the OTLP collector",
        extra=log_fields(otlp_endpoint=endpoint, otlp_service_name=service_name),
    )


def stop() -> None:
    """Send the spans still buffered (waiting at most FLUSH_TIMEOUT_MS) and stop exporting."""
    global _active
    active, _active = _active, None
    if active is None:
        return
    if not active.provider.force_flush(FLUSH_TIMEOUT_MS):
        log.warning(
            "tracing: spans not sent before exit (the OTLP collector did not answer in time)",
            extra=log_fields(otlp_endpoint=active.endpoint, waited_ms=FLUSH_TIMEOUT_MS),
        )
    active.provider.shutdown()


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
    items: int,
    tokens: int,
) -> None:
    """The `tokenize`, `queue` and `inference` child spans of the current request span, laid end
    to end from `started` (a `time.perf_counter()` reading) to now. `compute_s`: the forward
    passes' own time, less than the inference span when the request's pairs went through passes
    with waits between them."""
    if not trace.get_current_span().is_recording():
        return
    now_ns = time.time_ns()
    start_ns = now_ns - round((time.perf_counter() - started) * 1e9)
    tokenized_ns = min(now_ns, start_ns + round(tokenization_s * 1e9))
    first_pass_ns = min(now_ns, tokenized_ns + round(queue_s * 1e9))
    _span("tokenize", start_ns, tokenized_ns, {"inputs": items, "tokens": tokens})
    _span("queue", tokenized_ns, first_pass_ns, {})
    _span(
        "inference",
        first_pass_ns,
        now_ns,
        {"forward_passes": batches, "compute_time_ms": round(compute_s * 1000, 3), "pairs": items},
    )


def _span(name: str, start_ns: int, end_ns: int, attributes: dict[str, Any]) -> None:
    span = tracer().start_span(name, start_time=start_ns, attributes=attributes)
    span.end(end_time=end_ns)
