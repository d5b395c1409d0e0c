"""The lifecycle: loading -> warming_up -> ready -> draining -> stopped (or failed), admission
(503 unless ready, 429 over the limit, counted until the request ends) and draining."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from reranker_runtime.api import create_app
from reranker_runtime.api.errors import client_message, http_error
from reranker_runtime.config import ServeSettings
from reranker_runtime.errors import NotReadyError, OverloadedError
from reranker_runtime.lifecycle import Lifecycle, State, not_ready_error
from reranker_runtime.server import _DrainingServer, uvicorn_config
from runtime.api_support import settings_for
from runtime.fakes import ControlledEngine, GatedTokenizer
from runtime.live_server import free_port

WAIT_S = 30.0
QUERY = "what is the capital of france"
TEXTS = ["paris is the capital city of france", "apple banana orange fruit"]


def settings(**overrides: Any) -> ServeSettings:
    values: dict[str, Any] = dict(device="cpu", dtype="float32", max_batch_tokens=512)
    values.update(overrides)
    return ServeSettings(**values)


async def _until(condition: Any) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition never became true")
        await asyncio.sleep(0.005)


async def test_not_ready_until_warmed_up_then_drains(xlmr_engine) -> None:
    engine = ControlledEngine(xlmr_engine)
    engine.hold_warmup()
    lifecycle = Lifecycle(settings(), engine=engine)
    assert lifecycle.state is State.LOADING
    lifecycle.start()
    try:
        await _until(lambda: lifecycle.state is State.WARMING_UP)
        with pytest.raises(NotReadyError) as err:
            async with lifecycle.admit():
                pass
        assert "warming up" in err.value.message
        mapped = http_error(err.value)
        assert mapped.status == 503 and int(mapped.headers["Retry-After"]) > 0
    finally:
        engine.release_warmup()
    await _until(lambda: lifecycle.ready)
    assert engine.warmups == [512]

    # Draining: new requests refused at once, the one in flight finishes, then the engine closes.
    engine.hold()

    async def in_flight() -> list[float]:
        async with lifecycle.admit() as service:
            return (await service.rerank(QUERY, TEXTS, truncate=False)).scores

    request = asyncio.create_task(in_flight())
    await engine.wait_for_calls(1)
    drain = lifecycle.drain()
    assert lifecycle.drain() is drain  # idempotent: every caller awaits the same drain
    assert lifecycle.state is State.DRAINING and not lifecycle.ready
    with pytest.raises(NotReadyError, match="shutting down; retry on another replica"):
        async with lifecycle.admit():
            pass
    await asyncio.sleep(0)
    assert not drain.done()  # waits for the request in flight
    engine.release()
    scores = await asyncio.wait_for(request, WAIT_S)
    await asyncio.wait_for(drain, WAIT_S)
    assert len(scores) == len(TEXTS)
    assert lifecycle.state is State.STOPPED and engine.closed and lifecycle.in_flight == 0


async def test_on_warm_runs_once_after_warm_up_before_ready(xlmr_engine) -> None:
    """`serve` freezes the GC heap there: after the model's objects exist, before any request."""
    lifecycle = Lifecycle(settings(), engine=ControlledEngine(xlmr_engine))
    seen: list[State] = []
    lifecycle.on_warm = lambda: seen.append(lifecycle.state)
    lifecycle.start()
    await _until(lambda: lifecycle.ready)
    assert seen == [State.WARMING_UP]
    await asyncio.wait_for(lifecycle.drain(), WAIT_S)


async def test_admit_refuses_over_limit_and_releases(xlmr_engine) -> None:
    lifecycle = Lifecycle(settings(max_concurrent_requests=2), engine=ControlledEngine(xlmr_engine))
    lifecycle.start()
    await _until(lambda: lifecycle.ready)
    try:
        async with lifecycle.admit(), lifecycle.admit():
            assert lifecycle.in_flight == 2
            async with lifecycle.admit(limited=False):  # /tokenize, /decode: no slot taken
                assert lifecycle.in_flight == 3  # but a drain waits for it
            with pytest.raises(OverloadedError) as err:
                async with lifecycle.admit():
                    pass
            mapped = http_error(err.value)
            assert mapped.status == 429 and mapped.headers["Retry-After"] == "1"
            assert client_message(err.value) == (
                "2 requests are already in flight, the limit is 2 (--max-concurrent-requests); "
                "retry shortly"
            )
        assert lifecycle.in_flight == 0
        with pytest.raises(RuntimeError):  # a request that fails still gives its permit back
            async with lifecycle.admit():
                raise RuntimeError("handler failed")
        assert lifecycle.in_flight == 0
    finally:
        await lifecycle.close()


async def test_load_failure_is_the_failed_state(tmp_path: Path) -> None:
    reasons: list[str] = []
    lifecycle = Lifecycle(settings(model=str(tmp_path / "no-such-model")))
    lifecycle.on_fatal = reasons.append
    lifecycle.start()
    await _until(lambda: lifecycle.state is State.FAILED)
    assert reasons and "no-such-model" in reasons[0]
    message = lifecycle.not_ready_error().message
    assert message.startswith("model failed to load:") and "no-such-model" in message
    assert "check its log" in message  # says what to do next
    await lifecycle.close()
    assert lifecycle.state is State.FAILED  # closing keeps the reason


def test_every_not_ready_state_has_its_own_message() -> None:
    states = [s for s in State if s is not State.READY]
    messages = {not_ready_error(s, "boom").message for s in states}
    assert len(messages) == len(states)
    for state in states:
        error = not_ready_error(state, "boom")
        assert error.state == state.value
        assert "retry" in error.message or "restart" in error.message, error.message


# ---------------------------------------------------------------------------- exit signals


def test_exit_signals_drain_then_answer_503_then_exit_at_once(
    xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    """`serve`'s server, run for real on 127.0.0.1, signalled as uvicorn's handler would.
    First SIGTERM: drain (in-flight work goes on). Second (Ctrl-C twice): every request in
    flight is answered 503 with the error body, one whose forward pass still runs at once, one
    being tokenized at its next slice, and the server then stops in order. A third exits
    without waiting (exit code 1)."""
    engine = ControlledEngine(xlmr_engine)
    app_settings = dataclasses.replace(
        settings_for(xlmr_reranker, max_client_batch_size=1000), host="127.0.0.1", port=free_port()
    )
    app = create_app(app_settings, engine=engine)
    server = _DrainingServer(uvicorn_config(app, app_settings), app.state.lifecycle)
    runner = threading.Thread(target=server.run, daemon=True)
    runner.start()
    url = f"http://127.0.0.1:{app_settings.port}"
    result: dict[str, httpx.Response] = {}

    def in_flight(name: str, texts: list[str]) -> None:
        result[name] = httpx.post(
            f"{url}/rerank", json={"query": QUERY, "texts": texts}, timeout=WAIT_S
        )

    def until(what: str, check: Any) -> None:
        deadline = time.monotonic() + WAIT_S
        while not check():
            assert time.monotonic() < deadline, f"gave up waiting for {what}"
            time.sleep(0.01)

    def health() -> int | None:
        try:
            return httpx.get(f"{url}/health", timeout=WAIT_S).status_code
        except httpx.TransportError:
            return None

    try:
        until("ready", lambda: health() == 200)
        engine.hold()
        scoring = threading.Thread(target=in_flight, args=("scoring", TEXTS))
        scoring.start()
        until("a forward pass at the gate", lambda: engine._arrived >= 1)
        tokenizer = app.state.lifecycle.service._tokenizer
        gated = tokenizer._tok = GatedTokenizer(tokenizer._tok)
        gated.hold()
        # 120 texts of ~1,200 characters: 3 slices of text_bounds.SLICE_CHARS.
        many = [f"{i} " + "paris france capital river " * 45 for i in range(120)]
        tokenizing = threading.Thread(target=in_flight, args=("tokenizing", many))
        tokenizing.start()
        assert gated.arrived.wait(WAIT_S)
        server.handle_exit(signal.SIGTERM, None)
        until("draining", lambda: health() == 503)
        assert scoring.is_alive() and tokenizing.is_alive()  # a drain waits for them
        server.handle_exit(signal.SIGINT, None)
        scoring.join(WAIT_S)  # answered while its forward pass is still held
        gated.release()  # the slice under way ends; the next one is not started
        tokenizing.join(WAIT_S)
        for name in ("scoring", "tokenizing"):
            response = result[name]
            assert response.status_code == 503, (name, response.text)
            assert response.json()["error_type"] == "Unhealthy"
            assert "shutting down" in response.json()["error"]
        assert gated.slices == 1
        assert runner.is_alive() and not server.forced  # stopping in order: the pass runs
        exits: list[int] = []
        server._hard_exit = exits.append  # the real one is os._exit
        server.handle_exit(signal.SIGINT, None)
        assert server.forced and exits == [1]
    finally:
        engine.release()
        runner.join(WAIT_S)
    assert not runner.is_alive()
