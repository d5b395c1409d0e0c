"""Per-request deadlines over HTTP (X-Request-Timeout, --request-timeout): 504 at the deadline
with the waiting pairs dropped, the early 503 when the work ahead cannot finish in time, the
metrics, and no effect on other requests.

Forward passes are held at ControlledEngine's gate, so "answered before the batch finished" is
checked by the gate still being closed when the answer arrives, not by timing."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from reranker_runtime.api import create_app
from reranker_runtime.engines.torch_engine import TorchEngine
from runtime.api_support import (
    QUERY,
    TEXTS,
    TOL,
    long_text,
    running_app,
    serving,
    settings_for,
    sigmoid,
    wait_until,
)
from runtime.fakes import ControlledEngine, GatedTokenizer
from tiny_models import TINY_MAX_TOKENS, reference_logits

WAIT_S = 30.0
TIMEOUTS = "reranker_request_timeouts_total"
REFUSALS = "reranker_request_deadline_refusals_total"
RERANK_504 = 'reranker_http_requests_total{route="/rerank",status="504"}'


async def samples(client: httpx.AsyncClient) -> dict[str, float]:
    out: dict[str, float] = {}
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def moved(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def timeout(seconds: float | str) -> dict[str, str]:
    return {"X-Request-Timeout": str(seconds)}


async def test_504_at_the_deadline_and_waiting_pairs_dropped(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    engine = ControlledEngine(xlmr_engine, max_batch_size=1)  # one pair per forward pass
    async with serving(settings_for(xlmr_reranker), engine) as client:
        before = await samples(client)
        engine.hold()
        other = asyncio.create_task(client.post("/rerank", json={"query": QUERY, "texts": TEXTS}))
        await engine.wait_for_calls(1)  # its first pair is in a forward pass, held at the gate
        victim = await client.post(
            "/rerank",
            json={"query": "zzz", "texts": ["music art science"] * 3},
            headers=timeout(0.2),
        )
        # Answered while the forward pass ahead is still held: at the deadline, not after it.
        assert engine.arrived == 1 and not engine.calls
        assert victim.status_code == 504
        assert victim.json() == {
            "error": "the request was not answered within its deadline of 0.2 s; its pairs still "
            "waiting were dropped; send a longer X-Request-Timeout header (server default: "
            "--request-timeout) or fewer texts",
            "error_type": "Timeout",
        }
        after = await samples(client)
        assert moved(before, after, TIMEOUTS) == 1
        assert moved(before, after, RERANK_504) == 1
        assert after["te_queue_size"] == len(TEXTS) - 1  # only the other request's pairs wait
        engine.release()
        resp = await asyncio.wait_for(other, WAIT_S)
    # The other request is unaffected: every score right; the victim's pairs never computed.
    assert resp.status_code == 200
    reference = reference_logits(xlmr_reranker, [(QUERY, t) for t in TEXTS])
    for item in resp.json():
        assert item["score"] == pytest.approx(sigmoid(reference[item["index"]][0]), abs=TOL)
    victim_ids = xlmr_engine.tokenizer("zzz", "music art science")["input_ids"]
    assert victim_ids not in engine.seen_input_ids


async def test_504_while_its_own_pairs_are_in_the_running_batch(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    engine = ControlledEngine(xlmr_engine)
    async with serving(settings_for(xlmr_reranker), engine) as client:
        engine.hold()
        resp = await client.post(
            "/predict", json={"inputs": [["zzz", "music"], ["art"]]}, headers=timeout(0.1)
        )
        assert resp.status_code == 504 and resp.json()["error_type"] == "Timeout"
        assert engine.arrived == 1 and not engine.calls  # its batch still held
        engine.release()  # the batch finishes for nobody; the server keeps serving
        ok = await client.post("/rerank", json={"query": QUERY, "texts": TEXTS})
        assert ok.status_code == 200


async def test_the_deadline_counts_from_arrival_so_a_slow_body_spends_it(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    """The clock starts with the headers: a body that takes longer than the deadline to arrive
    gets the 504 as soon as it is parsed, and nothing of it is tokenized or scored."""
    import json

    engine = ControlledEngine(xlmr_engine)
    body = json.dumps({"query": "zzz", "texts": ["music art science"]}).encode()

    async def slowly() -> AsyncIterator[bytes]:
        yield body[:10]
        await asyncio.sleep(0.4)
        yield body[10:]

    async with serving(settings_for(xlmr_reranker), engine) as client:
        before = await samples(client)
        resp = await client.post(
            "/rerank",
            content=slowly(),
            headers={**timeout(0.2), "content-type": "application/json"},
        )
        assert resp.status_code == 504, resp.text
        assert resp.json()["error_type"] == "Timeout"
        after = await samples(client)
    assert moved(before, after, TIMEOUTS) == 1
    assert engine.arrived == 0  # no forward pass was asked for


async def test_server_default_applies_and_the_header_replaces_it(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    engine = ControlledEngine(xlmr_engine)
    async with serving(settings_for(xlmr_reranker, request_timeout=0.2), engine) as client:
        engine.hold()
        patient = asyncio.create_task(
            client.post(
                "/v2/rerank", json={"query": QUERY, "documents": TEXTS}, headers=timeout(60)
            )
        )
        await engine.wait_for_calls(1)
        hasty = await client.post("/v1/rerank", json={"query": QUERY, "documents": TEXTS})
        assert hasty.status_code == 504  # --request-timeout 0.2 without a header
        assert "0.2 s" in hasty.json()["error"]
        engine.release()
        resp = await asyncio.wait_for(patient, WAIT_S)
        assert resp.status_code == 200, resp.text  # its header gave it 60 s


# (header bytes sent, the value the message shows). Only a plain decimal number is a deadline:
# Python's float() would take `1_0`, `+3`, `inf` or a full-width digit.
_BAD_TIMEOUTS = [
    (b"abc", "abc"),
    (b"0", "0"),
    (b"0.0", "0.0"),
    (b"-1", "-1"),
    (b"+3", "+3"),
    (b"1_0", "1_0"),
    (b"nan", "nan"),
    (b"inf", "inf"),
    (b"1e999", "1e999"),  # not finite
    (b"0x10", "0x10"),
    (b"2.5.1", "2.5.1"),
    (b"", ""),
    (b"1s", "1s"),
    ("\uff11".encode(), "\uff11"),  # a full-width 1, sent as UTF-8: shown as the client wrote it
    (b"\xff", "\xff"),  # not UTF-8: shown as latin-1, as the bytes read
]


async def test_bad_header_is_422_naming_it(xlmr_reranker: Path, xlmr_engine: TorchEngine) -> None:
    async with serving(settings_for(xlmr_reranker), xlmr_engine) as client:
        for sent, shown in _BAD_TIMEOUTS:
            for path, body in (
                ("/rerank", {"query": QUERY, "texts": TEXTS}),
                ("/v2/rerank", {"query": QUERY, "documents": TEXTS}),
                ("/predict", {"inputs": "hello"}),
            ):
                resp = await client.post(path, json=body, headers={"X-Request-Timeout": sent})
                assert resp.status_code == 422, (path, sent, resp.text)
                assert resp.json() == {
                    "error": "header `X-Request-Timeout` must be a finite decimal number of "
                    f"seconds greater than 0 (e.g. 2.5), got {shown!r}",
                    "error_type": "Validation",
                }
        for good in (" 2.5 ", "3", ".5", "1.", "1e1", "2E-1"):
            resp = await client.post("/predict", json={"inputs": "hello"}, headers=timeout(good))
            assert resp.status_code == 200, (good, resp.text)


async def test_bad_header_is_422_even_when_the_server_is_full(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    """A request that can never succeed gets its 422 at once, not the 429 a client retries."""
    engine = ControlledEngine(xlmr_engine, max_batch_size=1)
    settings = dataclasses.replace(settings_for(xlmr_reranker), max_concurrent_requests=1)
    async with serving(settings, engine) as client:
        engine.hold()
        busy = asyncio.create_task(client.post("/rerank", json={"query": QUERY, "texts": TEXTS}))
        await engine.wait_for_calls(1)
        full = await client.post("/rerank", json={"query": QUERY, "texts": TEXTS})
        bad = await client.post(
            "/rerank", json={"query": QUERY, "texts": TEXTS}, headers=timeout("soon")
        )
        engine.release()
        assert (await asyncio.wait_for(busy, WAIT_S)).status_code == 200
    assert full.status_code == 429
    assert bad.status_code == 422 and "X-Request-Timeout" in bad.json()["error"]


async def test_refused_early_when_the_work_ahead_cannot_finish_in_time(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    """Throughput is measured on a forward pass that takes at least 1 s for 1024 tokens (the
    engine sleeps first), so the server knows it scores at most 1024 tokens/s."""
    engine = ControlledEngine(xlmr_engine)
    settings = settings_for(xlmr_reranker, max_batch_tokens=8 * TINY_MAX_TOKENS)
    full = {"query": QUERY, "texts": [long_text()] * 8, "truncate": True}  # 8 x 128 tokens
    async with serving(settings, engine) as client:
        engine.delay_s = 1.0
        assert (await client.post("/rerank", json=full)).status_code == 200  # measured: <= 1024/s
        before = await samples(client)
        calls = engine.arrived

        # Its own 2048 tokens need at least 2 s: refused at once, nothing computed.
        big = {**full, "texts": [long_text()] * 16}
        resp = await client.post("/rerank", json=big, headers=timeout(1.5))
        assert resp.status_code == 503, resp.text
        assert resp.headers["retry-after"] == "1"
        body = resp.json()
        assert body["error_type"] == "Overloaded"
        assert body["error"].startswith("this request cannot be answered within its deadline")
        assert "2048 tokens" in body["error"] and "nothing was computed" in body["error"]
        assert body["error"].endswith(
            "retry with a longer X-Request-Timeout, fewer or shorter texts, or on a less busy "
            "replica"
        )
        assert engine.arrived == calls

        # A full forward pass (>= 1 s) is running, held, and another one's worth waits behind
        # it: a 1-text request cannot finish in 0.3 s.
        engine.hold()
        running = asyncio.create_task(client.post("/rerank", json=big))
        await engine.wait_for_calls(calls + 1)
        small = await client.post(
            "/rerank", json={"query": QUERY, "texts": ["paris"]}, headers=timeout(0.3)
        )
        assert small.status_code == 503, small.text
        assert "for the forward passes already running" in small.json()["error"]
        # 1.8 s is enough once the running pass is done: the waiting pairs are not counted (a
        # first-come estimate, >= 2 s, would refuse it), since fairness lets it ride in the next
        # batch. Taken, and answered.
        patient = asyncio.create_task(
            client.post("/rerank", json={"query": QUERY, "texts": ["paris"]}, headers=timeout(1.8))
        )
        for _ in range(2000):
            if (await samples(client))["te_queue_size"] == 8 + 1:
                break
            await asyncio.sleep(0.005)
        assert (await samples(client))["te_queue_size"] == 8 + 1  # queued behind the held pass
        engine.delay_s = 0.0
        engine.release()
        assert (await asyncio.wait_for(running, WAIT_S)).status_code == 200
        assert (await asyncio.wait_for(patient, WAIT_S)).status_code == 200
        after = await samples(client)
    assert moved(before, after, REFUSALS) == 2
    assert moved(before, after, TIMEOUTS) == 0
    assert moved(before, after, 'reranker_http_requests_total{route="/rerank",status="503"}') == 2


async def test_no_deadline_by_default(xlmr_reranker: Path, xlmr_engine: TorchEngine) -> None:
    """Without --request-timeout or the header a request waits as long as the work takes."""
    engine = ControlledEngine(xlmr_engine)
    async with serving(settings_for(xlmr_reranker), engine) as client:
        engine.hold()
        waiting = asyncio.create_task(client.post("/rerank", json={"query": QUERY, "texts": TEXTS}))
        await engine.wait_for_calls(1)
        await asyncio.sleep(0.3)
        assert not waiting.done()
        engine.release()
        assert (await asyncio.wait_for(waiting, WAIT_S)).status_code == 200


async def test_header_declared_in_openapi(xlmr_reranker: Path, xlmr_engine: TorchEngine) -> None:
    async with serving(settings_for(xlmr_reranker), xlmr_engine) as client:
        spec = (await client.get("/openapi.json")).json()
    for path in ("/rerank", "/predict", "/v2/rerank", "/v1/rerank"):
        params = spec["paths"][path]["post"].get("parameters", [])
        assert [p["name"] for p in params if p["in"] == "header"] == ["X-Request-Timeout"], path


async def test_two_cpu_workers_count_twice_the_throughput(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    """With two forward passes at once (--cpu-workers 2), 2048 tokens at <= 1024 tokens/s per
    pass need 1 s, not 2: a 1.9 s deadline is taken (one worker would refuse it), and met."""
    engine = ControlledEngine(xlmr_engine)
    engine.max_concurrent_scores = 2
    settings = settings_for(xlmr_reranker, max_batch_tokens=8 * TINY_MAX_TOKENS)
    full = {"query": QUERY, "texts": [long_text()] * 8, "truncate": True}  # 8 x 128 tokens
    async with serving(settings, engine) as client:
        engine.delay_s = 1.0
        assert (await client.post("/rerank", json=full)).status_code == 200  # measured: <= 1024/s
        big = {**full, "texts": [long_text()] * 16}
        resp = await client.post("/rerank", json=big, headers=timeout(1.9))
        assert resp.status_code == 200, resp.text
        assert len(engine.calls) == 1 + 2  # its two passes, side by side


async def test_tokenization_stops_when_the_deadline_passes(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    """A deadline that passes while a large request is being tokenized: 504 at once, and the
    tokenizer stops at its next slice of text instead of tokenizing the rest for nobody."""
    settings = settings_for(xlmr_reranker, max_client_batch_size=1000)
    app = create_app(settings, engine=ControlledEngine(xlmr_engine))
    async with running_app(app) as client:
        await wait_until(client)
        tokenizer = app.state.lifecycle.service._tokenizer
        gated = GatedTokenizer(tokenizer._tok)
        tokenizer._tok = gated
        finished = threading.Event()
        encode_chunked = tokenizer.encode_chunked

        def watched(*args: Any, **kwargs: Any) -> Any:
            try:
                return encode_chunked(*args, **kwargs)
            finally:
                finished.set()

        tokenizer.encode_chunked = watched
        text = " ".join(["paris france capital river"] * 45)  # ~1,200 characters, kept whole
        texts = [f"{i} {text}" for i in range(200)]  # 4 slices of text_bounds.SLICE_CHARS
        gated.hold()
        response = await client.post(
            "/rerank", json={"query": QUERY, "texts": texts}, headers=timeout(1.0)
        )
        assert response.status_code == 504
        assert gated.arrived.is_set()  # the deadline passed during tokenization, not before
        gated.release()
        assert await asyncio.to_thread(finished.wait, WAIT_S)
        assert gated.slices == 1
        # The server tokenizes and scores normally afterwards.
        tokenizer._tok = gated._inner
        assert (await client.post("/rerank", json={"query": QUERY, "texts": TEXTS})).is_success
