"""Operational behaviour over HTTP against the real app: /health, /live, /info, /metrics, the
OpenAPI docs, API keys, overload (429), not ready (503), engine failures, client disconnects,
draining, and a model that fails to load."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import torch
from fastapi import APIRouter, Request
from prometheus_client.parser import text_string_to_metric_families

from reranker_runtime import __version__
from reranker_runtime.api import create_app
from reranker_runtime.api.deps import InferenceRoute, admitted_service
from reranker_runtime.engines.torch_engine import TorchEngine
from reranker_runtime.service import RerankService
from runtime.api_support import QUERY, TEXTS, running_app, serving, settings_for, wait_until
from runtime.fakes import ControlledEngine

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = "s3cret-key"


async def _until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Wait (bounded) for a condition the test needs before its next step; fail if it never
    comes (not a timing assertion: the bound is far above any normal wait)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition never became true")
        await asyncio.sleep(0.005)


RERANK = {"query": QUERY, "texts": TEXTS[:2]}
# Requests the model cannot help: their 400/422 comes before any 429 or 503.
NEVER_SUCCEED = [
    ("/rerank", {"query": "", "texts": ["a"]}, 400),
    ("/rerank", {"query": QUERY, "texts": []}, 400),
    ("/rerank", {"query": QUERY, "texts": ["a", " "]}, 400),
    ("/rerank", {"query": QUERY, "texts": ["a"] * 17}, 422),
    ("/predict", {"inputs": [""]}, 400),
    ("/predict", {"inputs": [["a"]] * 17}, 422),
    ("/v2/rerank", {"query": QUERY, "documents": []}, 400),
    ("/v1/rerank", {"query": QUERY, "documents": ["a"] * 17}, 422),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(xlmr_reranker: Path, xlmr_engine: TorchEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(
        settings_for(xlmr_reranker, served_model_name="tiny-bge", revision="abc123"), xlmr_engine
    ) as c:
        yield c


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secured(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(settings_for(xlmr_reranker, api_key=KEY), xlmr_engine) as c:
        yield c


# ---------------------------------------------------------------------------------------------
# /health, /live, /info, /metrics, docs


async def test_health_and_live(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/live")).json() == {"status": "alive"}


async def test_an_access_log_line_keeps_a_requested_path_in_one_token(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The path is logged decoded; its whitespace is encoded again, so `%20status=200` cannot
    pass for a field of the line in a text log."""
    with caplog.at_level(logging.INFO, logger="reranker_runtime.access"):
        resp = await client.get("/x%20status=200%09route=/rerank")
    assert resp.status_code == 404
    [line] = [r.getMessage() for r in caplog.records if r.name == "reranker_runtime.access"]
    assert line == "GET /x%20status=200%09route=/rerank 404"


async def test_info(client: httpx.AsyncClient, xlmr_reranker: Path) -> None:
    resp = await client.get("/info")
    assert resp.status_code == 200
    info = resp.json()
    assert info["model_id"] == str(xlmr_reranker)
    assert info["served_model_name"] == "tiny-bge"
    assert info["model_sha"] == "abc123"
    assert info["model_type"] == {
        "reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    }
    assert info["architecture"] == "XLMRobertaForSequenceClassification"
    assert (info["engine"], info["device"], info["model_dtype"]) == ("pytorch", "cpu", "float32")
    assert info["num_labels"] == 1
    assert info["max_input_length"] == 128
    assert info["max_batch_tokens"] == 2048
    assert info["max_batch_requests"] is None
    assert info["max_client_batch_size"] == 16
    assert info["max_concurrent_requests"] == 512
    assert info["auto_truncate"] is True
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["cpu_kernels"] is None  # the padded engine has no choice of CPU kernels
    assert info["ready"] is True
    assert info["version"] == __version__


async def test_model_list_names_the_served_model(
    client: httpx.AsyncClient, xlmr_reranker: Path
) -> None:
    """GET /v1/models (OpenAI, vLLM) and /models (Infinity): clients that discover a model
    before they call it (LiteLLM, Open WebUI) find the one this server serves."""
    for path in ("/v1/models", "/models"):
        resp = await client.get(path)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["object"] == "list"
        [card] = body["data"]
        assert card["id"] == "tiny-bge" and card["object"] == "model"
        assert card["root"] == str(xlmr_reranker)
        assert card["max_model_len"] == 128 and card["capabilities"] == ["rerank"]
        assert 0 < time.time() - card["created"] < 3600
        assert card["owned_by"] == "reranker-runtime"


async def test_info_reports_the_limits_in_force(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    """An engine's own caps (a TensorRT profile) lower the configured limits; /info shows what
    the batcher uses."""
    engine = ControlledEngine(xlmr_engine, max_batch_tokens=512, max_batch_size=4)
    settings = settings_for(xlmr_reranker, max_batch_tokens=2048, max_batch_requests=8)
    async with serving(settings, engine) as c:
        info = (await c.get("/info")).json()
    assert (info["max_batch_tokens"], info["max_batch_requests"]) == (512, 4)
    assert engine.warmups == [512]


def _samples(text: str) -> dict[str, float]:
    """`name{labels} value` lines of a Prometheus text page, by `name{labels}`."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


async def test_metrics_count_what_a_request_did(client: httpx.AsyncClient) -> None:
    """Every value below moves only because of the requests this test sends."""
    before = _samples((await client.get("/metrics")).text)
    ok = await client.post("/rerank", json=RERANK)
    assert ok.status_code == 200
    tokens = int(ok.headers["x-compute-tokens"])
    assert (await client.post("/rerank", json={"query": QUERY, "texts": []})).status_code == 400
    await client.get("/nope")
    resp = await client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    after = _samples(resp.text)

    def moved(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved('reranker_http_requests_total{route="/rerank",status="200"}') == 1
    assert moved('reranker_http_requests_total{route="/rerank",status="400"}') == 1
    # unknown paths: one label
    assert moved('reranker_http_requests_total{route="other",status="404"}') == 1
    assert moved('reranker_http_request_duration_seconds_count{route="/rerank"}') == 2
    assert moved("te_request_duration_count") == 1  # TEI's: answered requests only
    # Only the request that reached the model is in the per-request and per-batch histograms.
    for name in (
        "te_request_queue_duration_count",
        "te_request_inference_duration_count",
        "te_request_tokenization_duration_count",
        "te_request_input_length_count",
    ):
        assert moved(name) == (len(RERANK["texts"]) if "input_length" in name else 1), name
    assert moved("te_request_input_length_sum") == tokens  # one observation per pair
    assert moved("te_batch_next_size_sum") == len(RERANK["texts"])  # both pairs in one batch
    assert moved("te_batch_next_tokens_count") == 1
    assert after["te_queue_size"] == 0 and after["reranker_requests_in_flight"] == 0


async def test_openapi_and_docs(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    for path in (
        "/rerank",
        "/predict",
        "/tokenize",
        "/v2/rerank",
        "/v1/rerank",
        "/info",
        "/health",
        "/live",
        "/metrics",
    ):
        assert path in spec["paths"], path
    rerank = spec["components"]["schemas"]["RerankRequest"]["properties"]
    assert set(rerank) >= {
        "query",
        "texts",
        "raw_scores",
        "return_text",
        "truncate",
        "truncation_direction",
    }
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


async def test_unknown_route_and_method_are_json_errors(client: httpx.AsyncClient) -> None:
    missing = await client.get("/nope")
    assert missing.status_code == 404 and missing.json()["error_type"] == "NotFound"
    wrong = await client.get("/rerank")
    assert wrong.status_code == 405 and set(wrong.json()) == {"error", "error_type"}


# ---------------------------------------------------------------------------------------------
# API key


INFERENCE = [
    ("/rerank", RERANK),
    ("/predict", {"inputs": "paris"}),
    ("/tokenize", {"inputs": "paris"}),
    ("/v2/rerank", {"query": QUERY, "documents": ["a"]}),
    ("/v1/rerank", {"query": QUERY, "documents": ["a"]}),
]


@pytest.mark.parametrize(("path", "body"), INFERENCE)
async def test_api_key_required_on_inference_routes(
    secured: httpx.AsyncClient, path: str, body: Any
) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer"},
    ):
        resp = await secured.post(path, json=body, headers=headers)
        assert resp.status_code == 401, (path, headers)
        assert resp.json()["error_type"] == "Unauthorized"
        assert resp.headers["www-authenticate"] == "Bearer"
    for auth in (f"Bearer {KEY}", f"Api-Key {KEY}", f"bearer {KEY}"):
        resp = await secured.post(path, json=body, headers={"Authorization": auth})
        assert resp.status_code == 200, (path, auth, resp.text)


async def test_api_key_checked_before_the_body(secured: httpx.AsyncClient) -> None:
    resp = await secured.post(
        "/rerank", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 401


async def test_api_key_scope(secured: httpx.AsyncClient) -> None:
    for path in ("/info", "/v1/models", "/models"):
        assert (await secured.get(path)).status_code == 401, path
        assert (
            await secured.get(path, headers={"Authorization": f"Api-Key {KEY}"})
        ).status_code == 200, path
    for path in ("/health", "/live", "/metrics", "/openapi.json", "/docs"):
        assert (await secured.get(path)).status_code == 200, path


async def test_api_key_declared_in_openapi(
    secured: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    schema = (await secured.get("/openapi.json")).json()
    assert set(schema["components"]["securitySchemes"]) == {"Bearer", "ApiKey"}
    for path in ("/rerank", "/predict", "/v1/rerank", "/v2/rerank", "/tokenize", "/info"):
        [operation] = schema["paths"][path].values()
        assert operation["security"] == [{"Bearer": []}, {"ApiKey": []}], path
    for path in ("/health", "/live", "/metrics"):
        assert "security" not in schema["paths"][path]["get"], path
    open_schema = (await client.get("/openapi.json")).json()
    assert "securitySchemes" not in open_schema.get("components", {})


async def test_a_new_inference_route_is_protected_and_admitted(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    """A route added to any router built with InferenceRoute gets the API key check, the
    lifecycle's admission and the OpenAPI security declaration without listing it anywhere."""
    router = APIRouter(route_class=InferenceRoute)

    @router.post("/v9/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"max_input_length": admitted_service(request).info.max_input_length}

    engine = ControlledEngine(xlmr_engine)
    engine.hold_warmup()
    app = create_app(settings_for(xlmr_reranker, api_key=KEY), engine=engine)
    app.include_router(router)
    auth = {"Authorization": f"Bearer {KEY}"}
    async with running_app(app) as c:
        try:
            assert (await c.post("/v9/echo")).status_code == 401
            warming = await c.post("/v9/echo", headers=auth)
            assert warming.status_code == 503 and "retry shortly" in warming.json()["error"]
        finally:
            engine.release_warmup()
        await wait_until(c)
        assert (await c.post("/v9/echo")).status_code == 401
        resp = await c.post("/v9/echo", headers=auth)
        assert resp.status_code == 200 and resp.json() == {"max_input_length": 128}
        [operation] = (await c.get("/openapi.json")).json()["paths"]["/v9/echo"].values()
        assert operation["security"] == [{"Bearer": []}, {"ApiKey": []}]


async def test_no_api_key_means_open(client: httpx.AsyncClient) -> None:
    resp = await client.post("/rerank", json=RERANK, headers={"Authorization": "Bearer anything"})
    assert resp.status_code == 200


# ---------------------------------------------------------------------------------------------
# Not ready, overload, engine failure, disconnect, drain, load failure


async def test_503_until_warmed_up(xlmr_reranker: Path, xlmr_engine: TorchEngine) -> None:
    engine = ControlledEngine(xlmr_engine)
    engine.hold_warmup()
    app = create_app(settings_for(xlmr_reranker), engine=engine)
    async with running_app(app) as c:
        try:
            assert (await c.get("/live")).status_code == 200  # alive while warming up
            health = await c.get("/health")
            assert health.status_code == 503
            assert health.json()["error_type"] == "Unhealthy"
            assert int(health.headers["retry-after"]) > 0
            for path, body in INFERENCE:
                resp = await c.post(path, json=body)
                assert resp.status_code == 503, path
                assert "retry-after" in resp.headers
            # A request that can never succeed is refused for what it is, not 503 to retry.
            for path, body, status in NEVER_SUCCEED:
                resp = await c.post(path, json=body)
                assert resp.status_code == status, (path, resp.text)
        finally:
            engine.release_warmup()
        await wait_until(c, "/health", 200)
        assert (await c.post("/rerank", json=RERANK)).status_code == 200


async def test_429_at_once_when_max_concurrent_requests_in_flight(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    engine = ControlledEngine(xlmr_engine)
    app = create_app(settings_for(xlmr_reranker, max_concurrent_requests=2), engine=engine)
    lifecycle = app.state.lifecycle
    async with running_app(app) as c:
        await wait_until(c)
        engine.hold()
        big = asyncio.create_task(
            c.post("/rerank", json={"query": QUERY, "texts": TEXTS})
        )  # counts once
        small = asyncio.create_task(c.post("/predict", json={"inputs": "paris"}))
        await engine.wait_for_calls(1)
        await _until(lambda: lifecycle.in_flight == 2)  # both admitted
        refused = await c.post("/rerank", json=RERANK)
        assert refused.status_code == 429
        assert refused.json()["error_type"] == "Overloaded"
        assert "2" in refused.json()["error"]
        assert int(refused.headers["retry-after"]) >= 1
        for path, body, status in NEVER_SUCCEED:  # not 429: retrying cannot help them
            resp = await c.post(path, json=body)
            assert resp.status_code == status, (path, resp.text)
        # As in TEI, /tokenize and /decode take no slot: they answer while the slots are full.
        assert (await c.post("/tokenize", json={"inputs": "paris"})).status_code == 200
        assert (await c.post("/decode", json={"ids": [0, 5, 2]})).status_code == 200
        engine.release()
        assert (await big).status_code == 200
        assert (await small).status_code == 200
        assert (await c.post("/rerank", json=RERANK)).status_code == 200  # capacity is back


async def test_engine_failure_is_a_424_and_the_server_keeps_serving(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    engine = ControlledEngine(xlmr_engine)
    async with serving(settings_for(xlmr_reranker), engine) as c:
        engine.fail_next(RuntimeError("CUDA error: device-side assert"))
        failed = await c.post("/rerank", json=RERANK)
        assert failed.status_code == 424  # TEI's status for ErrorType::Backend
        assert failed.json()["error_type"] == "Backend"
        assert (await c.post("/rerank", json=RERANK)).status_code == 200
        assert (await c.get("/health")).status_code == 200


async def test_client_disconnect_cancels_the_work(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    """Drive the ASGI app directly: the client disconnects while its pairs wait in the queue."""
    engine = ControlledEngine(xlmr_engine)
    settings = settings_for(xlmr_reranker, max_batch_requests=1)  # one pair per forward pass
    app = create_app(settings, engine=engine)
    async with running_app(app) as c:
        await wait_until(c)
        engine.hold()
        gone = asyncio.Event()
        sent: list[dict[str, Any]] = []
        body = json.dumps({"query": QUERY, "texts": TEXTS}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/rerank",
            "raw_path": b"/rerank",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
            "client": ("127.0.0.1", 1234),
            "server": ("test", 80),
            "state": {},
        }
        call = asyncio.create_task(app(scope, receive, send))
        await engine.wait_for_calls(1)  # the first pair is in the engine, the rest queued
        gone.set()
        await asyncio.wait_for(call, 30)
        assert sent[0]["status"] == 499
        engine.release()
        # Only pairs already handed to the worker ran; the request's queued ones were dropped.
        assert (await c.post("/rerank", json={"query": QUERY, "texts": ["x"]})).status_code == 200
        assert len(engine.seen_input_ids) < len(TEXTS) + 1
        assert "te_queue_size 0.0" in (await c.get("/metrics")).text


async def test_drain_turns_health_503_and_finishes_in_flight(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    engine = ControlledEngine(xlmr_engine)
    app = create_app(settings_for(xlmr_reranker), engine=engine)
    async with running_app(app) as c:
        await wait_until(c)
        engine.hold()
        in_flight = asyncio.create_task(c.post("/rerank", json=RERANK))
        await engine.wait_for_calls(1)
        drain = app.state.lifecycle.drain()
        health = await c.get("/health")
        assert health.status_code == 503 and "shutting down" in health.json()["error"]
        assert (await c.post("/rerank", json=RERANK)).status_code == 503  # no new work
        assert (await c.get("/live")).status_code == 200
        engine.release()
        resp = await in_flight
        assert resp.status_code == 200 and len(resp.json()) == 2  # in-flight work finished
        await drain


async def test_model_load_failure_is_reported(tmp_path: Path) -> None:
    app = create_app(settings_for(tmp_path / "no-such-model"))
    async with running_app(app) as c:
        await wait_until(c, "/live", 503)
        live = (await c.get("/live")).json()
        assert "model failed to load" in live["error"] and "no-such-model" in live["error"]
        health = await c.get("/health")
        assert health.status_code == 503 and "no-such-model" in health.json()["error"]
        assert (await c.post("/rerank", json=RERANK)).status_code == 503


class _BrokenService(RerankService):
    """A real service whose rerank has a bug (not a RerankerError)."""

    async def rerank(self, *args: Any, **kwargs: Any) -> Any:
        raise KeyError("bug")


async def test_unexpected_error_is_a_json_500_with_request_id(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    settings = settings_for(xlmr_reranker)
    service = _BrokenService(ControlledEngine(xlmr_engine), settings)
    app = create_app(settings, service=service)
    async with running_app(app) as c:
        await wait_until(c)
        resp = await c.post("/rerank", json=RERANK, headers={"x-request-id": "bug-1"})
        assert resp.status_code == 500
        assert resp.json() == {"error": "internal server error", "error_type": "Backend"}
        assert resp.headers["x-request-id"] == "bug-1"
        assert (await c.get("/live")).status_code == 200
