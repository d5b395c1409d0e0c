"""TEI's gRPC API (--grpc-port): the real app serving tei.v1 over a real gRPC channel, scores
checked against the fp32 reference, errors against TEI's status codes."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from reranker_runtime.api import create_app
from reranker_runtime.grpc_api import messages as m
from reranker_runtime.grpc_api import server as grpc_server_module
from reranker_runtime.grpc_api.server import STREAM_PERMIT_LINGER_S
from runtime.api_support import (
    QUERY,
    TEXTS,
    TOL,
    free_port,
    long_text,
    running_app,
    settings_for,
    sigmoid,
    wait_until,
)
from runtime.fakes import ControlledEngine, record_threads
from tiny_models import reference_logits

REPO = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def grpc_server(
    model_dir: Path, engine: Any, **overrides: Any
) -> AsyncIterator[tuple[grpc.aio.Channel, Any]]:
    """The app with --grpc-port on a free port, ready; a channel to it, and the HTTP client."""
    if not isinstance(engine, ControlledEngine):
        engine = ControlledEngine(engine)
    settings = settings_for(model_dir, host="127.0.0.1", grpc_port=free_port(), **overrides)
    app = create_app(settings, engine=engine)
    async with running_app(app) as client:
        await wait_until(client)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
            yield channel, client


def unary(channel: grpc.aio.Channel, path: str, request: Any, response: Any) -> Any:
    return channel.unary_unary(
        path,
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )


def stream(channel: grpc.aio.Channel, path: str, request: Any, response: Any) -> Any:
    return channel.stream_stream(
        path,
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )


async def _messages(*items: Any) -> AsyncIterator[Any]:
    for item in items:
        yield item


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_status(channel: grpc.aio.Channel, service: str, *, until: int) -> int:
    """grpc.health.v1's status of `service`, polled (bounded) until it is `until`: the server
    updates it from the lifecycle every HEALTH_POLL_S."""
    stub = health_pb2_grpc.HealthStub(channel)
    status = -1
    for _ in range(500):
        try:
            status = (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status
        except grpc.aio.AioRpcError:  # NOT_FOUND before the first update
            status = -1
        if status == until:
            break
        await asyncio.sleep(0.01)
    return status


@pytest.fixture(scope="module")
def reference(xlmr_reranker: Path) -> list[float]:
    return [sigmoid(row[0]) for row in reference_logits(xlmr_reranker, [(QUERY, t) for t in TEXTS])]


async def test_rerank_ranks_texts_with_the_reference_scores_and_teis_metadata(
    xlmr_reranker: Path, xlmr_engine: Any, reference: list[float]
) -> None:
    async with grpc_server(xlmr_reranker, xlmr_engine) as (channel, _):
        call = unary(channel, "/tei.v1.Rerank/Rerank", m.RerankRequest, m.RerankResponse)(
            m.RerankRequest(query=QUERY, texts=TEXTS, return_text=True)
        )
        answer = await call
        headers = dict(await call.initial_metadata())
    scores = [rank.score for rank in answer.ranks]
    assert scores == sorted(scores, reverse=True)
    assert sorted(rank.index for rank in answer.ranks) == list(range(len(TEXTS)))
    for rank in answer.ranks:
        assert rank.score == pytest.approx(reference[rank.index], abs=TOL)
        assert rank.text == TEXTS[rank.index]
    meta = answer.metadata
    assert meta.compute_tokens == int(headers["x-compute-tokens"]) > 0
    assert meta.compute_chars == len(QUERY) * len(TEXTS) + sum(len(t) for t in TEXTS)
    assert meta.total_time_ns >= meta.inference_time_ns > 0
    assert headers["x-compute-type"] == "cpu"
    assert {"x-total-time", "x-queue-time", "x-inference-time"} <= headers.keys()


async def test_rerank_without_return_text_leaves_text_unset_and_raw_scores_are_logits(
    xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    logits = [row[0] for row in reference_logits(xlmr_reranker, [(QUERY, t) for t in TEXTS[:3]])]
    async with grpc_server(xlmr_reranker, xlmr_engine) as (channel, _):
        answer = await unary(channel, "/tei.v1.Rerank/Rerank", m.RerankRequest, m.RerankResponse)(
            m.RerankRequest(query=QUERY, texts=TEXTS[:3], raw_scores=True)
        )
    for rank in answer.ranks:
        assert not rank.HasField("text")
        assert rank.score == pytest.approx(logits[rank.index], abs=1e-4)


async def test_rerank_stream_scores_each_message_as_its_own_pair(
    xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    pairs = [(QUERY, TEXTS[0]), ("fruit", TEXTS[2]), (QUERY, TEXTS[1])]
    expected = [sigmoid(row[0]) for row in reference_logits(xlmr_reranker, pairs)]
    async with grpc_server(xlmr_reranker, xlmr_engine) as (channel, _):
        call = channel.stream_unary(
            "/tei.v1.Rerank/RerankStream",
            request_serializer=m.RerankStreamRequest.SerializeToString,
            response_deserializer=m.RerankResponse.FromString,
        )
        answer = await call(
            _messages(*(m.RerankStreamRequest(query=q, text=t, return_text=True) for q, t in pairs))
        )
    scores = [rank.score for rank in answer.ranks]
    assert scores == pytest.approx(sorted(expected, reverse=True), abs=TOL)
    for rank in answer.ranks:
        assert rank.score == pytest.approx(expected[rank.index], abs=TOL)
        assert rank.text == pairs[rank.index][1]


async def test_predict_stream_answers_each_message_in_order_then_the_first_error_ends_it(
    xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    texts = ["a b", TEXTS[0], "x y z " * 5]
    expected = [
        sigmoid(row[0]) for row in reference_logits(xlmr_reranker, [(QUERY, t) for t in texts])
    ]
    async with grpc_server(xlmr_reranker, xlmr_engine) as (channel, _):
        call = stream(
            channel, "/tei.v1.Predict/PredictPairStream", m.PredictPairRequest, m.PredictResponse
        )
        sent = [m.PredictPairRequest(inputs=[QUERY, t]) for t in texts]
        answers = [answer async for answer in call(_messages(*sent))]
        assert [a.predictions[0].score for a in answers] == pytest.approx(expected, abs=TOL)

        broken = [*sent[:2], m.PredictPairRequest(inputs=["a", "b", "c"]), sent[0]]
        got: list[Any] = []
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async for answer in call(_messages(*broken)):
                got.append(answer)
    assert len(got) == 2  # the answers before the bad message came through
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.details() == "`inputs` must have a single or two elements. Given: 3"


async def test_predict_on_a_classifier_gives_every_label(
    xlmr_classifier: Path, classifier_engine: Any
) -> None:
    async with grpc_server(xlmr_classifier, classifier_engine) as (channel, client):
        answer = await unary(
            channel, "/tei.v1.Predict/Predict", m.PredictRequest, m.PredictResponse
        )(m.PredictRequest(inputs="great movie"))
        http = (await client.post("/predict", json={"inputs": "great movie"})).json()
        info = await unary(channel, "/tei.v1.Info/Info", m.InfoRequest, m.InfoResponse)(
            m.InfoRequest()
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await unary(channel, "/tei.v1.Rerank/Rerank", m.RerankRequest, m.RerankResponse)(
                m.RerankRequest(query="q", texts=["a"])
            )
    assert [(p.label, pytest.approx(p.score, abs=1e-6)) for p in answer.predictions] == [
        (p["label"], p["score"]) for p in http
    ]
    assert {p.label for p in answer.predictions} == {"negative", "neutral", "positive"}
    assert info.model_type == m.MODEL_TYPE_CLASSIFIER
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_info_tokenize_and_decode(xlmr_reranker: Path, xlmr_engine: Any) -> None:
    async with grpc_server(xlmr_reranker, xlmr_engine) as (channel, client):
        info = await unary(channel, "/tei.v1.Info/Info", m.InfoRequest, m.InfoResponse)(
            m.InfoRequest()
        )
        http_info = (await client.get("/info")).json()
        tokens = await unary(
            channel, "/tei.v1.Tokenize/Tokenize", m.EncodeRequest, m.EncodeResponse
        )(m.EncodeRequest(inputs="paris is a city", add_special_tokens=True))
        http_tokens = (await client.post("/tokenize", json={"inputs": "paris is a city"})).json()
        decoded = await unary(
            channel, "/tei.v1.Tokenize/Decode", m.DecodeRequest, m.DecodeResponse
        )(m.DecodeRequest(ids=[t.id for t in tokens.tokens], skip_special_tokens=True))
        decode_stream = stream(
            channel, "/tei.v1.Tokenize/DecodeStream", m.DecodeRequest, m.DecodeResponse
        )
        ids = [t.id for t in tokens.tokens]
        streamed = [
            a.text
            async for a in decode_stream(
                _messages(
                    m.DecodeRequest(ids=ids[:3]), m.DecodeRequest(ids=ids, skip_special_tokens=True)
                )
            )
        ]
    assert info.model_type == m.MODEL_TYPE_RERANKER
    for field in ("max_input_length", "max_batch_tokens", "max_client_batch_size", "version"):
        assert getattr(info, field) == http_info[field]
    assert [(t.id, t.text, t.special) for t in tokens.tokens] == [
        (t["id"], t["text"], t["special"]) for t in http_tokens[0]
    ]
    assert decoded.text == "paris is a city"
    assert streamed[1] == "paris is a city" and len(streamed) == 2


@pytest.mark.parametrize(
    ("path", "request_message", "response", "code", "details"),
    [
        (
            "/tei.v1.Rerank/Rerank",
            m.RerankRequest(query="q"),
            m.RerankResponse,
            grpc.StatusCode.INVALID_ARGUMENT,
            "`texts` cannot be empty",
        ),
        (
            "/tei.v1.Rerank/Rerank",
            m.RerankRequest(query="q", texts=["a"] * 17),
            m.RerankResponse,
            grpc.StatusCode.INVALID_ARGUMENT,
            "batch size 17 > maximum allowed batch size 16",
        ),
        (
            "/tei.v1.Rerank/Rerank",
            m.RerankRequest(query="q", texts=["word " * 400], truncate=False),
            m.RerankResponse,
            grpc.StatusCode.INVALID_ARGUMENT,
            "truncate",
        ),
        (
            "/tei.v1.Embed/Embed",
            m.EmbedRequest(inputs="x"),
            m.EmbedResponse,
            grpc.StatusCode.FAILED_PRECONDITION,
            "Model is not an embedding model",
        ),
    ],
)
async def test_errors_carry_teis_status_codes(
    xlmr_reranker: Path,
    xlmr_engine: Any,
    path: str,
    request_message: Any,
    response: Any,
    code: grpc.StatusCode,
    details: str,
) -> None:
    async with grpc_server(xlmr_reranker, xlmr_engine) as (channel, _):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await unary(channel, path, type(request_message), response)(request_message)
    assert failure.value.code() == code
    assert details in failure.value.details()


async def test_the_api_key_is_required_as_on_http_except_for_health(
    xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    async with grpc_server(xlmr_reranker, xlmr_engine, api_key="sekret") as (channel, _):
        rerank = unary(channel, "/tei.v1.Rerank/Rerank", m.RerankRequest, m.RerankResponse)
        body = m.RerankRequest(query=QUERY, texts=TEXTS[:2])
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "sekret"),)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await rerank(body, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert (
                "API key" in refused.value.details() or "Authorization" in refused.value.details()
            )
        answer = await rerank(body, metadata=(("authorization", "Bearer sekret"),))
        bei = await rerank(body, metadata=(("authorization", "Api-Key sekret"),))  # BEI's scheme
        serving = await health_status(channel, "tei.v1.Rerank", until=SERVING)  # no key needed
    assert len(answer.ranks) == len(bei.ranks) == 2
    assert serving == SERVING


async def test_health_follows_the_model_and_reflection_lists_the_services(
    xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    engine = ControlledEngine(xlmr_engine)
    engine.hold_warmup()
    settings = settings_for(xlmr_reranker, host="127.0.0.1", grpc_port=free_port())
    app = create_app(settings, engine=engine)
    async with (
        running_app(app) as client,
        grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel,
    ):
        # NOT_SERVING while warming up, SERVING once ready (Rerank: a reranker), Embed never.
        assert await health_status(channel, "tei.v1.Rerank", until=NOT_SERVING) == NOT_SERVING
        engine.release_warmup()
        await wait_until(client)
        for service in ("", "tei.v1.Rerank", "tei.v1.Predict", "tei.v1.Info"):
            assert await health_status(channel, service, until=SERVING) == SERVING
        assert await health_status(channel, "tei.v1.Embed", until=NOT_SERVING) == NOT_SERVING

        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            _messages(reflection_pb2.ServerReflectionRequest(list_services=""))
        )
        listed = [s.name async for answer in reflect for s in answer.list_services_response.service]
    assert {"tei.v1.Rerank", "tei.v1.Predict", "tei.v1.Info", "grpc.health.v1.Health"} <= set(
        listed
    )


async def test_a_grpc_deadline_ends_the_call_and_the_server_lets_go_of_it(
    xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    engine = ControlledEngine(xlmr_engine)
    async with grpc_server(xlmr_reranker, engine) as (channel, client):
        engine.hold()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await unary(channel, "/tei.v1.Rerank/Rerank", m.RerankRequest, m.RerankResponse)(
                    m.RerankRequest(query=QUERY, texts=TEXTS), timeout=0.3
                )
            # The server side ends too (its deadline, or the cancelled call), while the forward
            # pass is still held: the request leaves the in-flight count, counted as a failure.
            in_flight = failures = ""
            for _ in range(500):  # bounded wait
                metrics = (await client.get("/metrics")).text
                in_flight = next(
                    line
                    for line in metrics.splitlines()
                    if line.startswith("reranker_requests_in_flight ")
                )
                failures = " ".join(
                    line for line in metrics.splitlines() if line.startswith("te_request_failure{")
                )
                if in_flight.endswith(" 0.0") and failures:
                    break
                await asyncio.sleep(0.01)
        finally:
            engine.release()
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert in_flight.endswith(" 0.0")
    assert 'err="timeout"' in failures or 'err="dropped"' in failures


async def test_draining_ends_an_open_stream_with_unavailable(
    xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    settings = settings_for(xlmr_reranker, host="127.0.0.1", grpc_port=free_port())
    app = create_app(settings, engine=ControlledEngine(xlmr_engine))
    never = asyncio.Event()

    async def one_then_silence() -> AsyncIterator[Any]:
        yield m.EncodeRequest(inputs="paris", add_special_tokens=True)
        await never.wait()  # an idle client that keeps its stream open

    async with (
        running_app(app) as client,
        grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel,
    ):
        await wait_until(client)
        call = stream(
            channel, "/tei.v1.Tokenize/TokenizeStream", m.EncodeRequest, m.EncodeResponse
        )(one_then_silence())
        first = await call.read()
        drained = app.state.lifecycle.drain()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()
        await drained
        never.set()
    assert len(first.tokens) > 0
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in ended.value.details()


def test_the_committed_descriptor_is_generated_from_tei_proto() -> None:
    spec = importlib.util.spec_from_file_location(
        "gen_grpc_descriptor", REPO / "scripts" / "gen-grpc-descriptor.py"
    )
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    committed = (
        REPO / "runtime" / "reranker_runtime" / "grpc_api" / "tei_descriptor.py"
    ).read_text()
    assert generator.render() == committed, "run scripts/gen-grpc-descriptor.py"


async def test_a_long_stream_takes_one_slot_and_never_refuses_its_own_messages(
    xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    # More messages than --max-concurrent-requests and than the stream's parallelism (64).
    texts = [f"text number {i} about paris" for i in range(150)]
    async with grpc_server(xlmr_reranker, xlmr_engine, max_concurrent_requests=2) as (channel, _):
        call = stream(
            channel, "/tei.v1.Predict/PredictPairStream", m.PredictPairRequest, m.PredictResponse
        )
        answers = [
            a
            async for a in call(
                _messages(*(m.PredictPairRequest(inputs=[QUERY, t]) for t in texts))
            )
        ]
    assert len(answers) == len(texts)
    expected = [
        sigmoid(row[0]) for row in reference_logits(xlmr_reranker, [(QUERY, t) for t in texts[:5]])
    ]
    assert [a.predictions[0].score for a in answers[:5]] == pytest.approx(expected, abs=TOL)


async def test_rerank_stream_is_bounded_by_the_request_limits_while_it_is_read(
    xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    limits = {"max_request_characters": 1000}
    async with grpc_server(xlmr_reranker, xlmr_engine, **limits) as (channel, _):
        call = channel.stream_unary(
            "/tei.v1.Rerank/RerankStream",
            request_serializer=m.RerankStreamRequest.SerializeToString,
            response_deserializer=m.RerankResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(_messages(*(m.RerankStreamRequest(query="q", text="t") for _ in range(17))))
        with pytest.raises(grpc.aio.AioRpcError) as too_long:
            await call(
                _messages(*(m.RerankStreamRequest(query="q", text="t" * 400) for _ in range(3)))
            )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "batch size 17 > maximum allowed batch size 16" in refused.value.details()
    assert too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1,000 per request" in too_long.value.details()


async def test_open_streams_that_send_nothing_hold_no_permit(
    xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    """--max-concurrent-requests 1 and three streams opened that never send (or never end):
    scoring still gets through, over gRPC and HTTP. A RerankStream that never ends is dropped
    after --request-read-timeout, naming it; the idle PredictStream is answered once it sends."""
    settings = {"max_concurrent_requests": 1, "request_read_timeout": 1.0}
    async with grpc_server(xlmr_reranker, xlmr_engine, **settings) as (channel, client):
        rerank_stream = channel.stream_unary(
            "/tei.v1.Rerank/RerankStream",
            request_serializer=m.RerankStreamRequest.SerializeToString,
            response_deserializer=m.RerankResponse.FromString,
        )
        never_ends = asyncio.Event()
        release = asyncio.Event()

        async def one_then_nothing() -> AsyncIterator[Any]:
            yield m.RerankStreamRequest(query=QUERY, text=TEXTS[0])
            await never_ends.wait()

        async def nothing_yet() -> AsyncIterator[Any]:
            await release.wait()
            yield m.PredictPairRequest(inputs=[QUERY, TEXTS[1]])

        predict_stream = stream(
            channel, "/tei.v1.Predict/PredictPairStream", m.PredictPairRequest, m.PredictResponse
        )
        reading = [asyncio.ensure_future(rerank_stream(one_then_nothing())) for _ in range(2)]
        idle = predict_stream(nothing_yet())
        idle_answers = asyncio.ensure_future(_collect(idle))
        await asyncio.sleep(0.3)  # all three open on the server
        predict = unary(
            channel, "/tei.v1.Predict/PredictPair", m.PredictPairRequest, m.PredictResponse
        )
        answer = await predict(m.PredictPairRequest(inputs=[QUERY, TEXTS[0]]))
        assert answer.predictions
        resp = await client.post("/rerank", json={"query": QUERY, "texts": TEXTS[:2]})
        assert resp.status_code == 200, resp.text
        for call in reading:
            with pytest.raises(grpc.aio.AioRpcError) as dropped:
                await call
            assert dropped.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "did not end within 1 s (--request-read-timeout)" in dropped.value.details()
        release.set()
        [late] = await idle_answers
        assert late.predictions
        never_ends.set()


async def test_a_stream_keeps_its_permit_while_messages_keep_coming(
    xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    """--max-concurrent-requests 1 and a client that sends, reads the answer and sends again:
    its stream keeps the one permit between messages (an HTTP request meanwhile gets 429, the
    stream is never refused its own next message); quiet for a while, it gives it back."""
    async with grpc_server(xlmr_reranker, xlmr_engine, max_concurrent_requests=1) as (
        channel,
        client,
    ):
        outgoing, replies = _pair_stream_sent_from_a_queue(channel)
        body = {"query": QUERY, "texts": TEXTS[:2]}
        for text in TEXTS[:3]:
            await outgoing.put(m.PredictPairRequest(inputs=[QUERY, text]))
            assert (await anext(replies)).predictions
            assert (await client.post("/rerank", json=body)).status_code == 429
        await asyncio.sleep(STREAM_PERMIT_LINGER_S + 0.5)  # quiet: the permit goes back
        assert (await client.post("/rerank", json=body)).status_code == 200
        await outgoing.put(m.PredictPairRequest(inputs=[QUERY, TEXTS[0]]))
        assert (await anext(replies)).predictions  # taken again
        await outgoing.put(None)
        assert [a async for a in replies] == []
        assert (await client.post("/rerank", json=body)).status_code == 200  # ended: given back


async def test_a_stream_quiet_for_too_long_is_ended(
    xlmr_reranker: Path, xlmr_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Open calls are bounded: one that goes quiet is ended with DEADLINE_EXCEEDED after
    STREAM_IDLE_TIMEOUT_S (300 s; shortened here), its answers so far delivered."""
    monkeypatch.setattr(grpc_server_module, "STREAM_IDLE_TIMEOUT_S", 0.5)
    async with grpc_server(xlmr_reranker, xlmr_engine) as (channel, _):
        sent = asyncio.Event()

        async def one_then_quiet() -> AsyncIterator[Any]:
            yield m.PredictPairRequest(inputs=[QUERY, TEXTS[0]])
            sent.set()
            await asyncio.Event().wait()

        call = stream(
            channel, "/tei.v1.Predict/PredictPairStream", m.PredictPairRequest, m.PredictResponse
        )(one_then_quiet())
        answers = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for answer in call:
                answers.append(answer)
    assert len(answers) == 1 and sent.is_set()
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "sent no message for 0.5 s and was ended; open a new one" in ended.value.details()


async def test_a_client_waiting_for_a_slow_answer_is_not_quiet(
    xlmr_reranker: Path, xlmr_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idle clock runs only once every message read has been answered: a forward pass
    longer than the idle timeout does not end the stream of a client that waits for it."""
    monkeypatch.setattr(grpc_server_module, "STREAM_IDLE_TIMEOUT_S", 0.5)
    engine = ControlledEngine(xlmr_engine)
    async with grpc_server(xlmr_reranker, engine) as (channel, _):
        engine.delay_s = 1.2  # after warm-up: each forward pass of this test
        outgoing, replies = _pair_stream_sent_from_a_queue(channel)
        await outgoing.put(m.PredictPairRequest(inputs=[QUERY, TEXTS[0]]))
        assert (await anext(replies)).predictions  # 1.2 s of scoring: the stream lives on
        engine.delay_s = 0.0
        await outgoing.put(m.PredictPairRequest(inputs=[QUERY, TEXTS[1]]))
        assert (await anext(replies)).predictions
        with pytest.raises(grpc.aio.AioRpcError) as ended:  # now quiet: ended
            await anext(replies)
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_calls_open_at_once_are_bounded_by_max_connections(
    xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    """Idle streams cost the server memory even without a permit: at most --max-connections
    calls are open at once; the next is refused with RESOURCE_EXHAUSTED, not queued."""
    async with grpc_server(xlmr_reranker, xlmr_engine, max_connections=3) as (channel, _):
        release = asyncio.Event()

        async def nothing_yet() -> AsyncIterator[Any]:
            await release.wait()
            yield m.PredictPairRequest(inputs=[QUERY, TEXTS[1]])

        predict_stream = stream(
            channel, "/tei.v1.Predict/PredictPairStream", m.PredictPairRequest, m.PredictResponse
        )
        opened = [asyncio.ensure_future(_collect(predict_stream(nothing_yet()))) for _ in range(3)]
        await asyncio.sleep(0.3)
        predict = unary(
            channel, "/tei.v1.Predict/PredictPair", m.PredictPairRequest, m.PredictResponse
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await predict(m.PredictPairRequest(inputs=[QUERY, TEXTS[0]]))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details() == (
            "3 gRPC calls are already open, the limit is 3 (--max-connections); retry shortly"
        )
        # Health checks are not counted: a kubelet's gRPC probe still gets through.
        assert await health_status(channel, "", until=SERVING) == SERVING
        release.set()
        assert all(len(answers) == 1 for answers in await asyncio.gather(*opened))
        assert (await predict(m.PredictPairRequest(inputs=[QUERY, TEXTS[0]]))).predictions


async def test_a_message_that_cannot_be_decoded_is_invalid_argument(
    xlmr_reranker: Path, xlmr_engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Bytes that are not the method's message (a string that is not UTF-8, a broken varint):
    INVALID_ARGUMENT naming the problem, on unary calls and streams, and no traceback logged."""
    bad_utf8 = b"\x0a\x03q\xed\xa0\x80"  # field 1 (query): "q" + an encoded lone surrogate
    raw = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    async with grpc_server(xlmr_reranker, xlmr_engine) as (channel, _):
        calls = [
            channel.unary_unary("/tei.v1.Rerank/Rerank", **raw)(bad_utf8),
            channel.unary_unary("/tei.v1.Predict/Predict", **raw)(b"\xff\xff"),
            _collect(channel.stream_stream("/tei.v1.Tokenize/TokenizeStream", **raw)(
                _messages(b"\xff\xff"))),
            channel.stream_unary("/tei.v1.Rerank/RerankStream", **raw)(_messages(bad_utf8)),
        ]  # fmt: skip
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "the request message cannot be decoded" in refused.value.details()
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a client's bytes"


async def test_a_large_tokenize_answer_is_built_off_the_event_loop(
    xlmr_reranker: Path, xlmr_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Millions of tokens built and serialized on the event loop would hold every other call
    and the health probes for seconds: Tokenize builds its answer on a worker thread."""
    threads = record_threads(monkeypatch, grpc_server_module, "_encoded_response")
    async with grpc_server(xlmr_reranker, xlmr_engine) as (channel, _):
        tokenize = unary(channel, "/tei.v1.Tokenize/Tokenize", m.EncodeRequest, m.EncodeResponse)
        answer = await tokenize(m.EncodeRequest(inputs="paris is nice", add_special_tokens=True))
    assert [t.text for t in answer.tokens][1:-1] and threads
    assert threads[0] is not threading.main_thread()


def _pair_stream_sent_from_a_queue(
    channel: grpc.aio.Channel,
) -> tuple[asyncio.Queue[Any], AsyncIterator[Any]]:
    """A PredictPairStream whose messages are the ones put on the queue (None ends it), and
    its replies: a client that sends, reads the answer, then sends again."""
    outgoing: asyncio.Queue[Any] = asyncio.Queue()

    async def messages() -> AsyncIterator[Any]:
        while (message := await outgoing.get()) is not None:
            yield message

    call = stream(
        channel, "/tei.v1.Predict/PredictPairStream", m.PredictPairRequest, m.PredictResponse
    )(messages())
    return outgoing, aiter(call)


async def _collect(call: Any) -> list[Any]:
    return [answer async for answer in call]


async def test_a_grpc_port_already_served_stops_the_start_naming_it(
    xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    # Even by another gRPC server: gRPC would share the port (SO_REUSEPORT) unless told not to.
    port = free_port()

    def app() -> Any:
        settings = settings_for(xlmr_reranker, host="127.0.0.1", grpc_port=port)
        return create_app(settings, engine=ControlledEngine(xlmr_engine))

    async with running_app(app()):
        with pytest.raises(RuntimeError, match=rf"cannot listen for gRPC on 127\.0\.0\.1:{port}"):
            async with running_app(app()):
                pass


async def test_chunking_refusals_give_advice_a_grpc_client_can_follow(
    xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    """tei.v1.RerankRequest has no max_chunks_per_doc: the server's --max-chunks-per-doc applies,
    so the message names the flag, never a field the client cannot send."""
    async with grpc_server(
        xlmr_reranker, xlmr_engine, max_chunks_per_doc=2, chunk_overlap_tokens=0
    ) as (channel, _):
        rerank = unary(channel, "/tei.v1.Rerank/Rerank", m.RerankRequest, m.RerankResponse)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await rerank(m.RerankRequest(query=QUERY, texts=[long_text(12)], truncate=False))
    message = err.value.details() or ""
    assert "at most 2 windows per text are scored (the server's --max-chunks-per-doc)" in message
    assert "set truncate=true" in message and "send a larger max_chunks_per_doc" not in message
