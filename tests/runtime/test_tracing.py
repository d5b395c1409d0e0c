"""OpenTelemetry traces (--otlp-endpoint): what a collector receives from the real app, over real
OTLP/gRPC, from an in-process collector (opentelemetry-proto's TraceService)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceServicer,
    add_TraceServiceServicer_to_server,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from reranker_runtime import tracing
from reranker_runtime.grpc_api import messages as tei
from reranker_runtime.logging import ACCESS_LOGGER, setup_logging
from runtime.api_support import QUERY, TEXTS, free_port, serving, settings_for
from runtime.fakes import ControlledEngine

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


class Collector(TraceServiceServicer):
    """Keeps every span it is sent, with its resource's attributes."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.resources: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def Export(
        self, request: ExportTraceServiceRequest, context: Any
    ) -> ExportTraceServiceResponse:  # the method name is gRPC's
        with self._lock:
            for resource_spans in request.resource_spans:
                self.resources.append(attributes(resource_spans.resource.attributes))
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(scope_spans.spans)
        return ExportTraceServiceResponse()

    def named(self, name: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.name == name]


def value(v: AnyValue) -> Any:
    return getattr(v, v.WhichOneof("value"))


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in kvs}


@pytest.fixture(autouse=True)
def _no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's shell may set these; each would change what the collector receives.
    for name in (
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG",
        "OTEL_EXPORTER_OTLP_INSECURE",
        "OTEL_EXPORTER_OTLP_TRACES_INSECURE",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def collector() -> Iterator[tuple[Collector, str]]:
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"http://127.0.0.1:{port}"
    server.stop(grace=None)


async def test_a_request_is_one_trace_with_its_phases_under_the_callers_span(
    xlmr_reranker: Path, xlmr_engine: Any, collector: tuple[Collector, str]
) -> None:
    sink, endpoint = collector
    settings = settings_for(xlmr_reranker, otlp_endpoint=endpoint, otlp_service_name="rerank-a")
    async with serving(settings, xlmr_engine) as client:
        resp = await client.post(
            "/rerank",
            json={"query": QUERY, "texts": TEXTS},
            headers={"traceparent": TRACEPARENT, "x-request-id": "req-1"},
        )
        assert resp.status_code == 200
        untraced = await client.post("/rerank", json={"query": QUERY, "texts": TEXTS[:2]})
        assert untraced.status_code == 200
        assert (await client.get("/")).status_code == 200  # TEI's health alias: a probe
    # Leaving the app flushes the spans.

    (request_span,) = [s for s in sink.named("POST /rerank") if s.trace_id.hex() == TRACE_ID]
    assert request_span.parent_span_id.hex() == PARENT_ID
    assert request_span.kind == Span.SPAN_KIND_SERVER
    attrs = attributes(request_span.attributes)
    assert attrs["http.request.method"] == "POST"
    assert attrs["http.route"] == "/rerank"
    assert attrs["http.response.status_code"] == 200
    assert attrs["request_id"] == "req-1"
    assert attrs["compute_tokens"] == int(resp.headers["x-compute-tokens"])
    assert attrs["compute_chars"] == int(resp.headers["x-compute-characters"])
    for name in ("total_time", "tokenization_time", "queue_time", "inference_time"):
        assert attrs[name] == int(resp.headers[f"x-{name.replace('_', '-')}"])
    assert request_span.status.code != Status.STATUS_CODE_ERROR

    # tokenize -> queue -> inference, end to end inside the request span.
    phases = {
        name: next(s for s in sink.named(name) if s.trace_id == request_span.trace_id)
        for name in ("tokenize", "queue", "inference")
    }
    for span in phases.values():
        assert span.parent_span_id == request_span.span_id
        assert request_span.start_time_unix_nano <= span.start_time_unix_nano
        assert span.start_time_unix_nano <= span.end_time_unix_nano
        assert span.end_time_unix_nano <= request_span.end_time_unix_nano
    assert phases["tokenize"].end_time_unix_nano == phases["queue"].start_time_unix_nano
    assert phases["queue"].end_time_unix_nano == phases["inference"].start_time_unix_nano
    tokenize = attributes(phases["tokenize"].attributes)
    assert tokenize == {"pairs": len(TEXTS), "tokens": int(resp.headers["x-compute-tokens"])}
    inference = attributes(phases["inference"].attributes)
    assert inference["pairs"] == len(TEXTS)
    assert inference["forward_passes"] >= 1

    # A request without traceparent starts its own trace; probes are not traced.
    roots = [s for s in sink.named("POST /rerank") if s.trace_id.hex() != TRACE_ID]
    assert len(roots) == 1 and roots[0].parent_span_id == b""
    assert not sink.named("GET /health") and not sink.named("GET /")
    assert {"service.name": "rerank-a"}.items() <= sink.resources[0].items()


async def test_a_request_past_its_deadline_is_a_failed_span_showing_where_it_waited(
    xlmr_reranker: Path, xlmr_engine: Any, collector: tuple[Collector, str]
) -> None:
    sink, endpoint = collector
    engine = ControlledEngine(xlmr_engine)
    async with serving(settings_for(xlmr_reranker, otlp_endpoint=endpoint), engine) as client:
        engine.hold()
        try:
            resp = await client.post(
                "/v2/rerank",
                json={"model": "m", "query": QUERY, "documents": TEXTS},
                headers={"X-Request-Timeout": "0.2"},
            )
        finally:
            engine.release()
        assert resp.status_code == 504
    (span,) = sink.named("POST /v2/rerank")
    assert attributes(span.attributes)["http.response.status_code"] == 504
    assert span.status.code == Status.STATUS_CODE_ERROR
    # Tokenized, then held in the batcher until the deadline: `scoring` is cut there.
    (tokenize,) = sink.named("tokenize")
    (scoring,) = sink.named("scoring")
    assert attributes(tokenize.attributes) == {"completed": True}
    assert attributes(scoring.attributes) == {"completed": False}
    assert tokenize.parent_span_id == scoring.parent_span_id == span.span_id
    assert tokenize.end_time_unix_nano == scoring.start_time_unix_nano
    assert scoring.end_time_unix_nano <= span.end_time_unix_nano
    assert not sink.named("queue") and not sink.named("inference")


@pytest.fixture
def json_logs() -> Iterator[None]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


async def _rerank_once(settings: Any, engine: Any, traceparent: str) -> None:
    async with serving(settings, engine) as client:
        resp = await client.post(
            "/rerank",
            json={"query": QUERY, "texts": TEXTS[:2]},
            headers={"traceparent": traceparent},
        )
        assert resp.status_code == 200


def _access_line(err: str, path: str) -> dict[str, Any]:
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    (line,) = [x for x in lines if x["logger"] == ACCESS_LOGGER and x["route"] == path]
    return line


@pytest.mark.usefixtures("json_logs")
async def test_json_log_lines_carry_the_trace_id_unless_spans_are_disabled(
    xlmr_reranker: Path,
    xlmr_engine: Any,
    collector: tuple[Collector, str],
    capfd: pytest.CaptureFixture[str],
) -> None:
    sink, endpoint = collector
    for disable_spans in (False, True):
        setup_logging("json", "info", trace_ids_in_json=not disable_spans)
        settings = settings_for(xlmr_reranker, otlp_endpoint=endpoint, disable_spans=disable_spans)
        await _rerank_once(settings, xlmr_engine, TRACEPARENT)
        line = _access_line(capfd.readouterr().err, "/rerank")
        if disable_spans:
            assert "trace_id" not in line and "span_id" not in line
        else:
            (span,) = sink.named("POST /rerank")
            assert line["trace_id"] == TRACE_ID
            assert line["span_id"] == span.span_id.hex()


@pytest.mark.usefixtures("json_logs")
async def test_a_trace_the_caller_did_not_sample_is_neither_sent_nor_logged(
    xlmr_reranker: Path,
    xlmr_engine: Any,
    collector: tuple[Collector, str],
    capfd: pytest.CaptureFixture[str],
) -> None:
    sink, endpoint = collector
    setup_logging("json", "info")
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"  # flags 00: the caller did not sample it
    await _rerank_once(settings_for(xlmr_reranker, otlp_endpoint=endpoint), xlmr_engine, unsampled)
    assert "trace_id" not in _access_line(capfd.readouterr().err, "/rerank")
    assert not sink.spans


async def test_the_service_name_comes_from_otel_service_name_unless_set(
    xlmr_reranker: Path,
    xlmr_engine: Any,
    collector: tuple[Collector, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sink, endpoint = collector
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-otel-env")
    for name, expected in ((None, "from-otel-env"), ("flag-name", "flag-name")):
        settings = settings_for(xlmr_reranker, otlp_endpoint=endpoint, otlp_service_name=name)
        async with serving(settings, xlmr_engine) as client:
            await client.post("/rerank", json={"query": QUERY, "texts": TEXTS[:1]})
        assert sink.resources[-1]["service.name"] == expected


async def test_requests_are_answered_when_the_collector_is_down(
    xlmr_reranker: Path,
    xlmr_engine: Any,
    unused_tcp_port: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Nothing listens there: the spans are dropped, requests are not hurt, and the exit waits
    # for the collector no longer than FLUSH_TIMEOUT_MS (the exporter alone retries for 10 s).
    monkeypatch.setattr(tracing, "FLUSH_TIMEOUT_MS", 200)
    settings = settings_for(xlmr_reranker, otlp_endpoint=f"http://127.0.0.1:{unused_tcp_port}")
    with caplog.at_level(logging.WARNING, logger=tracing.__name__):
        async with serving(settings, xlmr_engine) as client:
            resp = await client.post("/rerank", json={"query": QUERY, "texts": TEXTS})
            assert resp.status_code == 200
    assert not tracing.enabled()  # stopped with the app
    assert any("the last spans were not sent" in r.getMessage() for r in caplog.records)


async def test_a_grpc_call_is_a_server_span_under_the_callers_traceparent(
    xlmr_reranker: Path, xlmr_engine: Any, collector: tuple[Collector, str]
) -> None:
    sink, endpoint = collector
    settings = settings_for(
        xlmr_reranker, host="127.0.0.1", grpc_port=free_port(), otlp_endpoint=endpoint
    )
    async with (
        serving(settings, xlmr_engine),
        grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel,
    ):
        rerank = channel.unary_unary(
            "/tei.v1.Rerank/Rerank",
            request_serializer=tei.RerankRequest.SerializeToString,
            response_deserializer=tei.RerankResponse.FromString,
        )
        await rerank(
            tei.RerankRequest(query=QUERY, texts=TEXTS), metadata=(("traceparent", TRACEPARENT),)
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await rerank(tei.RerankRequest(query=QUERY))  # no texts: INVALID_ARGUMENT
    ok, refused = sink.named("tei.v1.Rerank/Rerank")
    if ok.trace_id.hex() != TRACE_ID:
        ok, refused = refused, ok
    assert ok.parent_span_id.hex() == PARENT_ID and ok.kind == Span.SPAN_KIND_SERVER
    assert attributes(ok.attributes) == {
        "rpc.system": "grpc",
        "rpc.service": "tei.v1.Rerank",
        "rpc.method": "Rerank",
        "rpc.grpc.status_code": 0,
    }
    children = {s.name for s in sink.spans if s.parent_span_id == ok.span_id}
    assert children == {"tokenize", "queue", "inference"}
    # A client error is not a server error (OpenTelemetry's RPC conventions).
    assert attributes(refused.attributes)["rpc.grpc.status_code"] == 3  # INVALID_ARGUMENT
    assert refused.status.code != Status.STATUS_CODE_ERROR


@pytest.mark.parametrize(
    "endpoint",
    [
        "localhost:4317",
        "otel-collector",
        "grpc://collector:4317",
        "http://",
        "http://user:secret@collector:4317",
        "http://collector:4317/v1/traces",
        "http://collector:4317?x=1",
        "http://otel-collector",
    ],
)
def test_an_endpoint_that_is_not_scheme_host_and_port_is_refused(endpoint: str) -> None:
    with pytest.raises(ValueError, match=r"e\.g\. http://otel-collector:4317"):
        tracing.check_endpoint(endpoint)


@pytest.mark.parametrize("endpoint", ["http://collector:4317", "https://collector.example:4317/"])
def test_a_scheme_host_and_port_endpoint_is_taken(endpoint: str) -> None:
    assert tracing.check_endpoint(f" {endpoint} ") == endpoint
