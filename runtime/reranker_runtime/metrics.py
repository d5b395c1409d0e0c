"""Prometheus metrics.

TEI's metrics keep TEI's names, labels and buckets, so TEI's dashboards and alerts work unchanged
(sources in TEI: router/src/http/server.rs and router/src/lib.rs for te_request_*,
core/src/infer.rs for te_predict_* and most te_request_failure reasons, core/src/queue.rs for the
queue and batch metrics, router/src/prometheus.rs for the buckets). TEI's exporter writes a counter
under its plain name (`te_request_count`, no `_total`), so TEI's counters are kept here
(`TeiCounter`) and written by `render()` the same way; everything else is prometheus_client's.

Our own metrics carry other names, `reranker_*`, so no TEI dashboard misreads them:
`reranker_http_*` (every response by route and status, refusals included),
`reranker_requests_in_flight` (the operator's autoscaler reads it),
`reranker_batch_inference_duration_seconds` and `reranker_batch_failures` (the bench reads them),
and the deadline and chunking counters.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import socket
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

log = logging.getLogger(__name__)

# TEI's exporter has no `*_created` series; neither do we.
disable_created_metrics()

# router/src/prometheus.rs: durations 1.5e-5 x 1.5^k (35 buckets, 15 us to ~20 min); input
# lengths 2^0..2^19 (TEI also drops those above the model's max input length: Prometheus
# quantiles are the same); batch sizes 2^0..2^12; batch tokens 2^0..2^20.
_DURATION_BUCKETS = tuple(1e-5 * 1.5 ** (k + 1) for k in range(35))
_INPUT_LENGTH_BUCKETS = tuple(float(2**k) for k in range(20))
_BATCH_SIZE_BUCKETS = tuple(float(2**k) for k in range(13))
_BATCH_TOKENS_BUCKETS = tuple(float(2**k) for k in range(21))


class TeiCounter:
    """A counter written under its exact name with TEI's labels, as TEI's exporter writes it."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        _TEI_COUNTERS.append(self)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.documentation}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._values.items())
        for key, value in items:
            labels = ",".join(f'{n}="{v}"' for n, v in zip(self.labelnames, key, strict=True))
            lines.append(
                f"{self.name}{{{labels}}} {value:g}" if labels else f"{self.name} {value:g}"
            )
        return "\n".join(lines) + "\n"

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)


_TEI_COUNTERS: list[TeiCounter] = []

# --------------------------------------------------------------------------------------------
# TEI's metrics

# method: "single" (/predict with one input) or "batch" (/rerank, /v1|v2/rerank, /predict with a
# batch). Counted once the body is parsed, before admission, as TEI does; /tokenize and /decode
# are not counted (TEI does not count them either).
REQUEST_COUNT = TeiCounter("te_request_count", "Inference requests received", ["method"])
REQUEST_SUCCESS = TeiCounter("te_request_success", "Inference requests answered", ["method"])
# err: validation, batch_size, tokenization, model_type, overloaded, inference, dropped (TEI's),
# and ours: unhealthy (not ready or draining, 503), timeout (deadline passed, 504).
REQUEST_FAILURE = TeiCounter("te_request_failure", "Inference requests refused or failed", ["err"])
PREDICT_COUNT = TeiCounter("te_predict_count", "Inputs (pairs) submitted for scoring")
PREDICT_SUCCESS = TeiCounter("te_predict_success", "Inputs (pairs) scored")

REQUEST_DURATION = Histogram(
    "te_request_duration",
    "Duration of an answered inference request in seconds",
    buckets=_DURATION_BUCKETS,
)
TOKENIZATION_DURATION = Histogram(
    "te_request_tokenization_duration",
    "Tokenization time per request in seconds",
    buckets=_DURATION_BUCKETS,
)
QUEUE_DURATION = Histogram(
    "te_request_queue_duration",
    "Time a request's pairs waited in the queue, in seconds",
    buckets=_DURATION_BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "te_request_inference_duration",
    "Forward-pass time attributed to a request, in seconds",
    buckets=_DURATION_BUCKETS,
)
# te_predict_*_duration: one observation per input (pair), as TEI's (core/src/infer.rs); the
# inputs of one request share the request's times.
PREDICT_DURATION = Histogram(
    "te_predict_duration",
    "Tokenization + queue + inference time of a scored input (pair), in seconds",
    buckets=_DURATION_BUCKETS,
)
PREDICT_TOKENIZATION_DURATION = Histogram(
    "te_predict_tokenization_duration",
    "Tokenization time of a scored input (pair) in seconds",
    buckets=_DURATION_BUCKETS,
)
PREDICT_QUEUE_DURATION = Histogram(
    "te_predict_queue_duration",
    "Queue time of a scored input (pair) in seconds",
    buckets=_DURATION_BUCKETS,
)
PREDICT_INFERENCE_DURATION = Histogram(
    "te_predict_inference_duration",
    "Inference time of a scored input (pair) in seconds",
    buckets=_DURATION_BUCKETS,
)
REQUEST_INPUT_TOKENS = Histogram(
    "te_request_input_length",
    "Tokens of each input (pair) as scored",
    buckets=_INPUT_LENGTH_BUCKETS,
)


def observe_many(histogram: Histogram, value: float, count: int) -> None:
    """`count` observations of `value` at the cost of one. TEI records te_predict_* once per
    input, and 4 x 1000 observe() calls for a 1000-text request would hold the event loop ~10 ms.
    Uses prometheus_client's own fields as Histogram.observe does; falls back to a loop where
    they are missing (another version)."""
    upper: Sequence[float] | None = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if count <= 0:
        return
    if upper is None or buckets is None or total is None:
        for _ in range(count):
            histogram.observe(value)
        return
    total.inc(value * count)
    buckets[bisect.bisect_left(upper, value)].inc(count)  # first bound >= value, as observe()


QUEUE_SIZE = Gauge("te_queue_size", "Pairs waiting in the batcher's queue")
BATCH_SIZE = Histogram(
    "te_batch_next_size", "Sequences per forward pass", buckets=_BATCH_SIZE_BUCKETS
)
BATCH_TOKENS = Histogram(
    "te_batch_next_tokens",
    "Tokens per forward pass as budgeted (padded: longest x n)",
    buckets=_BATCH_TOKENS_BUCKETS,
)

# --------------------------------------------------------------------------------------------
# Ours

HTTP_REQUESTS = Counter(
    "reranker_http_requests",
    "HTTP responses by route and the status the client got (unknown paths: route=other)",
    ["route", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "reranker_http_request_duration_seconds",
    "HTTP request duration in seconds, by route, whatever the status",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BATCH_INFERENCE_DURATION = Histogram(
    "reranker_batch_inference_duration_seconds",
    "Duration of one forward pass in seconds",
    buckets=_DURATION_BUCKETS,
)
BATCH_FAILURES = Counter("reranker_batch_failures", "Forward passes that raised")
IN_FLIGHT = Gauge(
    "reranker_requests_in_flight",
    "Scoring requests being processed (those --max-concurrent-requests limits)",
)

# Deadlines (X-Request-Timeout / --request-timeout). Not TEI metrics: TEI has no deadlines.
REQUEST_TIMEOUTS = Counter(
    "reranker_request_timeouts",
    "Requests whose deadline passed before they were answered (504; waiting pairs dropped)",
)
REQUEST_DEADLINE_REFUSALS = Counter(
    "reranker_request_deadline_refusals",
    "Requests refused before queueing because they could not finish before their deadline (503)",
)
# Long texts scored as several windows (max_chunks_per_doc > 1).
CHUNKED_TEXTS = Counter(
    "reranker_chunked_texts", "Texts longer than the model's limit scored as several windows"
)


def render() -> bytes:
    """The Prometheus text page: prometheus_client's metrics, then TEI's counters."""
    return generate_latest(REGISTRY) + "".join(c.render() for c in _TEI_COUNTERS).encode()


CONTENT_TYPE = CONTENT_TYPE_LATEST


# The metrics port takes no API key and sits outside uvicorn's connection cap and read
# deadline: a client that connects and sends nothing (or a byte now and then) must not hold a
# thread for ever, nor may many of them pile up threads in the server's process. A scraper
# needs one connection, answered in milliseconds.
METRICS_CONNECTION_DEADLINE_S = 10.0
METRICS_MAX_CONNECTIONS = 16


class _MetricsHandler(BaseHTTPRequestHandler):
    timeout = METRICS_CONNECTION_DEADLINE_S  # each read; the deadline below bounds them all
    deadline_s = METRICS_CONNECTION_DEADLINE_S  # the whole connection, request and answer

    def setup(self) -> None:
        super().setup()
        self._open = threading.Lock()  # held by _cut and finish: never cut a closed socket
        self._finished = False
        self._deadline = threading.Timer(self.deadline_s, self._cut)
        self._deadline.daemon = True
        self._deadline.start()

    def finish(self) -> None:
        self._deadline.cancel()
        with self._open:
            self._finished = True
        super().finish()

    def _cut(self) -> None:
        with self._open, contextlib.suppress(OSError):
            if not self._finished:
                self.connection.shutdown(socket.SHUT_RDWR)

    def do_GET(self) -> None:
        body = render()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes every few seconds: not worth a log line


class _BoundedMetricsServer(ThreadingHTTPServer):
    """At most METRICS_MAX_CONNECTIONS handled at once; a connection beyond them is closed at
    once (its client retries at the next scrape)."""

    daemon_threads = True
    request_queue_size = 64  # the listen backlog: connections beyond the slots are closed fast

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(METRICS_MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # no thread was started to release it
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client cut off by the deadline (or gone) makes the answer's write fail: not worth
        # socketserver's traceback on stderr, outside the log format.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def start_metrics_server(host: str, port: int) -> ThreadingHTTPServer | None:
    """--prometheus-port: the metrics on every path of a second port, as TEI's exporter serves
    them. 0 turns it off; a port in use is logged and skipped (the main port's /metrics stays)."""
    if port == 0:
        return None
    try:
        server = _BoundedMetricsServer((host, port), _MetricsHandler)
    except OSError as exc:
        log.warning(
            "cannot serve metrics on port %d (%s); /metrics on the main port still works; "
            "set --prometheus-port to a free port or 0",
            port,
            exc,
        )
        return None
    threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True).start()
    log.info("serving metrics on port %d", port)
    return server
