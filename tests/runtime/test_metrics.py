"""Metrics over HTTP after real requests on the real app: TEI's names, labels and buckets (so TEI's
dashboards and alerts work unchanged), ours under reranker_*, every response counted with the
status the client got, and the second metrics port (--prometheus-port).

Values are compared before/after the requests a test sends (the registry is process-wide).
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from reranker_runtime import metrics
from reranker_runtime.api import create_app
from reranker_runtime.engines.torch_engine import TorchEngine
from runtime.api_support import (
    MAX_TEXTS,
    QUERY,
    TEXTS,
    long_text,
    running_app,
    serving,
    settings_for,
    wait_until,
)
from runtime.fakes import ControlledEngine

pytestmark = pytest.mark.asyncio(loop_scope="module")

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")
# TEI's counters and the labels TEI gives them (router/src/http/server.rs, core/src/infer.rs).
TEI_COUNTERS = {
    "te_request_count": ("method",),
    "te_request_success": ("method",),
    "te_request_failure": ("err",),
    "te_predict_count": (),
    "te_predict_success": (),
}
TEI_HISTOGRAMS = (
    "te_request_duration",
    "te_request_tokenization_duration",
    "te_request_queue_duration",
    "te_request_inference_duration",
    "te_request_input_length",
    "te_predict_duration",
    "te_predict_tokenization_duration",
    "te_predict_queue_duration",
    "te_predict_inference_duration",
    "te_batch_next_size",
    "te_batch_next_tokens",
)


def samples(text: str) -> dict[str, float]:
    """Every sample line, keyed by `name{labels}` exactly as written."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            match = _LINE.match(line)
            assert match, f"not a Prometheus sample line: {line!r}"
            out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


class Scrape:
    """The metrics page before some requests; `moved(key)` after them."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}

    async def __aenter__(self) -> Scrape:
        self.before = samples((await self.client.get("/metrics")).text)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.after = samples((await self.client.get("/metrics")).text)

    def moved(self, key: str) -> float:
        return self.after.get(key, 0.0) - self.before.get(key, 0.0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(xlmr_reranker: Path, xlmr_engine: TorchEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(settings_for(xlmr_reranker), xlmr_engine) as c:
        yield c


async def test_exposition_uses_tei_names(client: httpx.AsyncClient) -> None:
    assert (await client.post("/predict", json={"inputs": "a"})).status_code == 200
    assert (await client.post("/rerank", json={"query": "q", "texts": []})).status_code == 400
    text = (await client.get("/metrics")).text
    for name, labels in TEI_COUNTERS.items():
        # TEI's exporter writes counters under their own name: no `_total`.
        assert f"# TYPE {name} counter" in text, name
        assert f"{name}_total" not in text, name
        lines = [
            line for line in text.splitlines() if line.startswith(name + ("{" if labels else " "))
        ]
        assert lines, name
        for line in lines:
            assert set(re.findall(r"(\w+)=", line)) == set(labels), line
    for name in TEI_HISTOGRAMS:
        assert f"# TYPE {name} histogram" in text, name
    assert "_created" not in text  # TEI has no *_created series
    assert "# TYPE te_queue_size gauge" in text
    # Ours: under other names.
    assert "# TYPE reranker_http_requests_total counter" in text
    assert "# TYPE reranker_http_request_duration_seconds histogram" in text


async def test_tei_buckets(client: httpx.AsyncClient) -> None:
    text = (await client.get("/metrics")).text

    def buckets(name: str) -> list[str]:
        return re.findall(rf'^{name}_bucket{{le="([^"]+)"}}', text, re.MULTILINE)

    # router/src/prometheus.rs: 1.5e-5 x 1.5^k, 35 buckets; powers of two for sizes.
    durations = buckets("te_request_duration")
    assert len(durations) == 36 and durations[-1] == "+Inf"
    assert float(durations[0]) == pytest.approx(1.5e-5) and float(durations[1]) == pytest.approx(
        2.25e-5
    )
    assert [float(b) for b in buckets("te_batch_next_size")[:-1]] == [2.0**k for k in range(13)]
    assert [float(b) for b in buckets("te_batch_next_tokens")[:-1]] == [2.0**k for k in range(21)]
    assert [float(b) for b in buckets("te_request_input_length")[:-1]] == [
        2.0**k for k in range(20)
    ]


async def test_success_counters_by_tei_method(client: httpx.AsyncClient) -> None:
    async with Scrape(client) as m:
        for path, body in (
            ("/predict", {"inputs": "paris"}),
            ("/predict", {"inputs": ["what is", "paris"]}),
            ("/predict", {"inputs": [["a"], ["b", "c"]]}),
            ("/rerank", {"query": QUERY, "texts": TEXTS}),
            ("/", {"query": QUERY, "texts": TEXTS[:2]}),
            ("/v2/rerank", {"query": QUERY, "documents": TEXTS[:3]}),
            ("/v1/rerank", {"query": QUERY, "documents": TEXTS[:1]}),
            ("/tokenize", {"inputs": "paris"}),  # TEI does not count these
            ("/decode", {"ids": [5, 6]}),
        ):
            assert (await client.post(path, json=body)).status_code == 200, path
    assert m.moved('te_request_count{method="single"}') == 2
    assert m.moved('te_request_success{method="single"}') == 2
    assert m.moved('te_request_count{method="batch"}') == 5
    assert m.moved('te_request_success{method="batch"}') == 5
    assert m.moved("te_request_duration_count") == 7
    pairs = 1 + 1 + 2 + len(TEXTS) + 2 + 3 + 1
    assert m.moved("te_predict_count") == pairs
    assert m.moved("te_predict_success") == pairs
    assert m.moved("te_request_input_length_count") == pairs  # one observation per input
    for name in (
        "te_predict_duration",
        "te_predict_tokenization_duration",
        "te_predict_queue_duration",
        "te_predict_inference_duration",
    ):  # TEI: one observation per input (core/src/infer.rs, `predict`)
        assert m.moved(f"{name}_count") == pairs, name
    assert not [k for k in m.after if k.startswith("te_request_failure") and m.moved(k)]


async def test_failures_by_tei_reason(client: httpx.AsyncClient) -> None:
    async with Scrape(client) as m:
        for path, body, status in (
            ("/rerank", {"query": QUERY, "texts": []}, 400),
            ("/predict", {"inputs": ""}, 400),
            ("/rerank", {"query": QUERY, "texts": ["x"] * (MAX_TEXTS + 1)}, 422),
            ("/rerank", {"query": QUERY, "texts": [long_text()], "truncate": False}, 422),
            ("/embed", {"inputs": "a"}, 424),
            ("/v1/embeddings", {"input": "a"}, 424),
            ("/predict", {"inputs": ["a", "b", "c"]}, 422),  # schema: not counted by TEI either
            ("/", {"inputs": "a"}, 422),  # /predict's body on a reranker: a schema error too
            # TEI's tokenizer refuses these (Infer::tokenize / decode): err="tokenization".
            ("/tokenize", {"inputs": ""}, 400),
            ("/decode", {"ids": []}, 400),
        ):
            resp = await client.post(path, json=body)
            assert resp.status_code == status, (path, resp.text)
    assert m.moved('te_request_failure{err="validation"}') == 2
    assert m.moved('te_request_failure{err="batch_size"}') == 1
    assert m.moved('te_request_failure{err="tokenization"}') == 3
    assert m.moved('te_request_failure{err="model_type"}') == 2
    assert m.moved('te_request_count{method="batch"}') == 3  # the three /rerank requests
    # /predict "", then the 424 routes, counted before they fail as TEI does
    assert m.moved('te_request_count{method="single"}') == 3
    assert m.moved('te_request_success{method="batch"}') == 0
    assert m.moved("te_request_duration_count") == 0  # TEI: answered requests only
    for route, status, n in (
        ("/rerank", 400, 1),
        ("/predict", 400, 1),
        ("/rerank", 422, 2),
        ("/predict", 422, 1),
        ("/embed", 424, 1),
        ("/v1/embeddings", 424, 1),
        ("/tokenize", 400, 1),
        ("/decode", 400, 1),
        ("/", 422, 1),
    ):
        assert m.moved(f'reranker_http_requests_total{{route="{route}",status="{status}"}}') == n


async def test_other_model_type_routes_count_the_request_by_inputs_shape(
    client: httpx.AsyncClient,
) -> None:
    # TEI increments te_request_count{method} before it fails with model_type.
    async with Scrape(client) as m:
        for path, content, method in (
            ("/embed", b'{"inputs": "a"}', "single"),
            ("/embed_all", b'{"inputs": ["a", "b"]}', "batch"),
            ("/embed_sparse", b'{"inputs": [["a"]]}', "batch"),
            ("/similarity", b'{"inputs": {"source_sentence": "a", "sentences": ["b"]}}', "batch"),
            ("/embeddings", b'{"input": "a"}', "single"),
            ("/v1/embeddings", b'{"input": ["a", "b"]}', "batch"),
            ("/embed", b"{not json", "single"),
            ("/v1/embeddings", b"", "single"),
        ):
            before = metrics.REQUEST_COUNT.value(method=method)
            resp = await client.post(
                path, content=content, headers={"content-type": "application/json"}
            )
            assert resp.status_code == 424, (path, resp.text)
            assert metrics.REQUEST_COUNT.value(method=method) == before + 1, (path, content)
    assert m.moved('te_request_count{method="single"}') == 4
    assert m.moved('te_request_count{method="batch"}') == 4
    assert m.moved('te_request_failure{err="model_type"}') == 8
    assert m.moved('te_request_success{method="single"}') == 0
    assert m.moved('te_request_success{method="batch"}') == 0


async def test_every_status_counted_as_the_client_got_it(client: httpx.AsyncClient) -> None:
    async with Scrape(client) as m:
        for method, path, content, status in (
            ("POST", "/rerank", b'{"query": ', 400),
            ("POST", "/rerank", b'{"texts": ["a"]}', 422),
            ("GET", "/rerank", b"", 405),
            ("POST", "/no/such/path", b"{}", 404),
            ("POST", "/rerank", b"x" * 2_000_001, 413),  # TEI's default --payload-limit
        ):
            headers = {"content-type": "application/json"}
            resp = await client.request(method, path, content=content, headers=headers)
            assert resp.status_code == status, (path, resp.text)
    for route, status in (
        ("/rerank", 400),
        ("/rerank", 422),
        ("/rerank", 405),
        ("other", 404),
        ("/rerank", 413),
    ):
        assert m.moved(f'reranker_http_requests_total{{route="{route}",status="{status}"}}') == 1
    assert not [k for k in m.after if 'status="500"' in k and m.moved(k)]
    assert not [k for k in m.after if k.startswith("te_request_failure") and m.moved(k)]


async def test_overloaded_unhealthy_and_dropped(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    engine = ControlledEngine(xlmr_engine)
    engine.hold_warmup()
    app = create_app(settings_for(xlmr_reranker, max_concurrent_requests=1), engine=engine)
    async with running_app(app) as c, Scrape(c) as m:
        loading = await c.post("/rerank", json={"query": QUERY, "texts": ["a"]})
        assert loading.status_code == 503
        engine.release_warmup()
        await wait_until(c)
        engine.hold()
        first = asyncio.create_task(c.post("/rerank", json={"query": QUERY, "texts": ["a"]}))
        await engine.wait_for_calls(1)
        refused = await c.post("/predict", json={"inputs": "a"})
        assert refused.status_code == 429
        # POST / counts its request once it knows the method, after admission: refused before
        # that, it counts no failure either (on the scoring routes failures never outnumber requests).
        for path in ("/", "/invocations"):
            assert (await c.post(path, json={"query": QUERY, "texts": ["a"]})).status_code == 429
        engine.release()
        assert (await first).status_code == 200
    assert m.moved('te_request_failure{err="unhealthy"}') == 1
    assert m.moved('te_request_failure{err="overloaded"}') == 1
    assert m.moved('reranker_http_requests_total{route="/rerank",status="503"}') == 1
    assert m.moved('reranker_http_requests_total{route="/predict",status="429"}') == 1
    assert m.moved('te_request_count{method="batch"}') == 2
    assert m.moved('te_request_count{method="single"}') == 1
    assert m.moved('te_request_success{method="batch"}') == 1


# ---------------------------------------------------------------------------------------------
# --prometheus-port


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_second_metrics_port_serves_the_same_page(client: httpx.AsyncClient) -> None:
    port = _free_port()
    server = metrics.start_metrics_server("127.0.0.1", port)
    assert server is not None
    try:
        assert (await client.post("/predict", json={"inputs": "a"})).status_code == 200

        def scrape(path: str) -> tuple[int, str, str]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
                return resp.status, resp.headers["content-type"], resp.read().decode()

        for path in ("/metrics", "/"):  # TEI's exporter answers on any path
            status, content_type, text = await asyncio.to_thread(scrape, path)
            assert status == 200 and content_type.startswith("text/plain")
            main = samples((await client.get("/metrics")).text)
            second = samples(text)
            assert (
                second['te_request_count{method="single"}']
                == main['te_request_count{method="single"}']
            )
            assert "te_request_duration_count" in second
    finally:
        server.shutdown()
        server.server_close()


async def test_idle_clients_cannot_pile_up_on_the_metrics_port(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The second port takes no key and sits outside uvicorn's connection cap: clients that
    connect and send nothing hold at most METRICS_MAX_CONNECTIONS threads, each only until its
    read times out; then scrapes are served again."""
    assert metrics._MetricsHandler.deadline_s == metrics.METRICS_CONNECTION_DEADLINE_S == 10.0
    monkeypatch.setattr(metrics._MetricsHandler, "deadline_s", 1.0)  # the test's shorter one
    port = _free_port()
    server = metrics.start_metrics_server("127.0.0.1", port)
    assert server is not None

    def scrape() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return int(resp.status)

    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(24)]
    for sock in idle[:8]:
        sock.sendall(b"G")  # a byte now and then, each read well inside any read timeout
    try:
        time.sleep(0.2)
        handlers = [t for t in threading.enumerate() if "process_request_thread" in t.name]
        assert len(handlers) <= metrics.METRICS_MAX_CONNECTIONS
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            scrape()  # every slot held: closed at once rather than queued behind them
        for sock in idle[:8]:
            sock.sendall(b"E")
        time.sleep(1.5)  # past every connection's deadline, trickling or not
        assert scrape() == 200
        # A client cut off halfway through its request is dropped quietly: no traceback on
        # stderr, outside the log format.
        assert "Traceback" not in capsys.readouterr().err
    finally:
        for sock in idle:
            sock.close()
        server.shutdown()
        server.server_close()


async def test_metrics_port_in_use_or_zero_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    assert metrics.start_metrics_server("127.0.0.1", 0) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.WARNING):
            assert metrics.start_metrics_server("127.0.0.1", port) is None
    assert any("--prometheus-port" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("value", [0.0, 1e-5, 0.01, 0.0123, 2.5, 1e9])
async def test_observe_many_equals_observing_one_by_one(value: float) -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from reranker_runtime.metrics import observe_many

    registry = CollectorRegistry()
    bounds = (0.001, 0.01, 0.1, 1.0, 10.0)
    many = Histogram("many_seconds", "m", buckets=bounds, registry=registry)
    single = Histogram("single_seconds", "s", buckets=bounds, registry=registry)
    observe_many(many, value, 7)
    for _ in range(7):
        single.observe(value)
    for le in [*map(str, bounds), "+Inf"]:
        assert registry.get_sample_value("many_seconds_bucket", {"le": le}) == (
            registry.get_sample_value("single_seconds_bucket", {"le": le})
        ), le
    assert registry.get_sample_value("many_seconds_count") == 7
    assert registry.get_sample_value("many_seconds_sum") == pytest.approx(
        registry.get_sample_value("single_seconds_sum")
    )
