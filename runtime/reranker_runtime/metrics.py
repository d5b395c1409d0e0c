"""Prometheus metrics. Names follow TEI's (`te_*`) so existing TEI dashboards and alerts work."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)

REQUEST_COUNT = Counter(
    "te_request_count", "HTTP requests received, by route and status code", ["method", "status"]
)
REQUEST_DURATION = Histogram(
    "te_request_duration",
    "End-to-end request duration in seconds",
    ["method"],
    buckets=_LATENCY_BUCKETS,
)
TOKENIZATION_DURATION = Histogram(
    "te_request_tokenization_duration",
    "Tokenization time per request in seconds",
    buckets=_LATENCY_BUCKETS,
)
QUEUE_DURATION = Histogram(
    "te_request_queue_duration",
    "Time a request's pairs waited in the queue, in seconds",
    buckets=_LATENCY_BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "te_request_inference_duration",
    "Forward-pass time attributed to a request, in seconds",
    buckets=_LATENCY_BUCKETS,
)
REQUEST_INPUT_TOKENS = Histogram(
    "te_request_input_length", "Tokens per request (all pairs)", buckets=_TOKEN_BUCKETS
)
QUEUE_SIZE = Gauge("te_queue_size", "Pairs waiting in the batcher's queue")
BATCH_SIZE = Histogram("te_batch_next_size", "Sequences per forward pass", buckets=_SIZE_BUCKETS)
BATCH_TOKENS = Histogram(
    "te_batch_next_tokens",
    "Tokens per forward pass as budgeted (padded: longest x n)",
    buckets=_TOKEN_BUCKETS,
)
BATCH_INFERENCE_DURATION = Histogram(
    "te_batch_inference_duration",
    "Duration of one forward pass in seconds",
    buckets=_LATENCY_BUCKETS,
)
BATCH_FAILURES = Counter("te_batch_failure", "Forward passes that raised")
IN_FLIGHT = Gauge("te_requests_in_flight", "Inference requests being processed")

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
