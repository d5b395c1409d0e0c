"""The server's log: one line per record, in the chosen format, whoever logs it."""

from __future__ import annotations

import json
import logging

import pytest

from reranker_runtime.logging import JsonFormatter, LibraryRepeatFilter, setup_logging


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


@pytest.mark.parametrize("name", ["huggingface_hub.utils._http", "transformers.modeling_utils"])
def test_library_warnings_are_printed_once_as_json(
    name: str, capfd: pytest.CaptureFixture[str]
) -> None:
    # A hub retry warning used to come out twice: plain text from the library's own handler, then
    # JSON from ours (transformers' lines came out only as plain text).
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    hub_logging.get_logger()
    transformers_logging.get_logger()  # the libraries' own handlers exist before setup
    setup_logging("json", "info")
    logging.getLogger(name).warning("Retrying in 1s [Retry 1/5].")
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    record = json.loads(lines[0])
    assert record["logger"] == name
    assert record["level"] == "warning"
    assert record["message"] == "Retrying in 1s [Retry 1/5]."


def test_repeated_hub_retry_warnings_are_printed_once(capfd: pytest.CaptureFixture[str]) -> None:
    # huggingface_hub's backoff logs the same error before each of its five retries.
    setup_logging("text", "info")
    hub = logging.getLogger("huggingface_hub.utils._http")
    thrown = "'[Errno -2] Name or service not known' thrown while requesting HEAD https://hub/x"
    for i, wait in enumerate([1, 2, 4, 8, 8], start=1):
        hub.warning(thrown)
        hub.warning(f"Retrying in {wait}s [Retry {i}/5].")
    hub.warning(thrown)
    hub.warning("HTTP Error 503 thrown while requesting HEAD https://hub/x")  # a new error
    ours = logging.getLogger("reranker_runtime.test")
    ours.warning("same")
    ours.warning("same")  # our own lines are never folded
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    messages = [line.split(": ", 1)[1] for line in lines]
    assert messages == [
        thrown,
        "Retrying in 1s [Retry 1/5].",
        "HTTP Error 503 thrown while requesting HEAD https://hub/x",
        "same",
        "same",
    ], lines


def _warning(name: str, message: str, created: float) -> logging.LogRecord:
    record = logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None)
    record.created = created
    return record


def test_a_warning_that_keeps_coming_is_printed_again_every_window() -> None:
    # A collector that stays down: the same warning every 5 s is printed at 0 s and 11 s with a
    # 10 s window, not only once.
    repeat = LibraryRepeatFilter(window_s=10)
    kept = [
        t
        for t in (0, 5, 11, 15, 22)
        if repeat.filter(_warning("opentelemetry.sdk", "Queue full, dropping span.", t))
    ]
    assert kept == [0, 11, 22]


def test_opentelemetry_retry_lines_differing_in_their_numbers_are_one_warning() -> None:
    repeat = LibraryRepeatFilter()
    name = "opentelemetry.exporter.otlp.proto.grpc.exporter"
    lines = [
        "Transient error StatusCode.UNAVAILABLE encountered while exporting traces to "
        f"10.0.0.9:4317, retrying in {delay}s."
        for delay in ("1.07", "2.31", "4.80")
    ]
    kept = [line for i, line in enumerate(lines) if repeat.filter(_warning(name, line, i))]
    assert kept == lines[:1]
    # Our own loggers and other libraries' numbers are left alone.
    hub = "huggingface_hub.utils._http"
    assert repeat.filter(_warning(hub, "HTTP Error 503 thrown", 0))
    assert repeat.filter(_warning(hub, "HTTP Error 404 thrown", 0))


@pytest.mark.parametrize(
    ("sampled", "with_ids", "expected"),
    [(True, True, True), (True, False, False), (False, True, False)],
)
def test_json_lines_written_in_a_span_carry_its_ids(
    sampled: bool, with_ids: bool, expected: bool
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

    tracer = TracerProvider(sampler=ALWAYS_ON if sampled else ALWAYS_OFF).get_tracer("test")
    record = logging.LogRecord("reranker_runtime.x", logging.INFO, __file__, 1, "hi", None, None)
    with tracer.start_as_current_span("request") as span:
        line = json.loads(JsonFormatter(with_trace_ids=with_ids).format(record))
    context = span.get_span_context()
    if expected:
        assert line["trace_id"] == format(context.trace_id, "032x")
        assert line["span_id"] == format(context.span_id, "016x")
    else:
        assert "trace_id" not in line and "span_id" not in line
    outside = json.loads(JsonFormatter().format(record))
    assert "trace_id" not in outside
