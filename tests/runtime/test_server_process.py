"""`reranker-runtime serve` as a real process on 127.0.0.1: start-up (/live while loading,
/health 503 -> 200), env-var configuration, access log, client disconnect, SIGTERM drain, and a
model that fails to load.

The server process runs the real CLI; a small launcher only gates the engine's warm-up and
forward passes on marker files, so each step is observed in order without timing assumptions.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runtime.api_support import QUERY, TEXTS, TOL, sigmoid
from tiny_models import reference_logits

WAIT_S = 120.0  # upper bound for any wait (a failure, not a timing assertion)

LAUNCHER = """
import os, sys, time
from reranker_runtime.engines.base import Engine
from reranker_runtime.engines.packed_engine import PackedEngine
from reranker_runtime.engines.torch_engine import TorchEngine

HOLD = os.environ["TEST_HOLD_FILE"]
WARMUP_HOLD = os.environ["TEST_WARMUP_HOLD_FILE"]
_warmup = Engine.warmup

def held(original):
    def score(self, batch):
        while os.path.exists(HOLD):  # forward passes wait while the marker file exists
            time.sleep(0.01)
        return original(self, batch)
    return score

def warmup(self, max_batch_tokens):
    while os.path.exists(WARMUP_HOLD):
        time.sleep(0.01)
    return _warmup(self, max_batch_tokens)

# Whichever engine `serve` picks (auto: the packed one on CPU).
TorchEngine.score, PackedEngine.score = held(TorchEngine.score), held(PackedEngine.score)
Engine.warmup = warmup
from reranker_runtime.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    what: str, check: Callable[[], bool], proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.02)
    raise AssertionError(f"gave up waiting for {what}")


def status_of(client: httpx.Client, path: str) -> int | None:
    try:
        return client.get(path).status_code
    except httpx.TransportError:
        return None


def metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


class Server:
    def __init__(
        self, proc: subprocess.Popen[bytes], url: str, log: Path, hold: Path, warmup_hold: Path
    ) -> None:
        self.proc, self.url, self.log, self.hold, self.warmup_hold = (
            proc,
            url,
            log,
            hold,
            warmup_hold,
        )

    def ready(self) -> None:
        """Release the held warm-up (the first test checks what comes before) and wait for
        /health, so each test also runs alone (`pytest -k`)."""
        self.warmup_hold.unlink(missing_ok=True)
        with httpx.Client(base_url=self.url, timeout=30) as client:
            wait_for("/health 200", lambda: status_of(client, "/health") == 200, self.proc)

    def access_line(self, request_id: str) -> dict[str, Any] | None:
        lines = [
            r
            for r in self.log_records()
            if r.get("logger") == "reranker_runtime.access" and r.get("request_id") == request_id
        ]
        assert len(lines) <= 1, lines
        return lines[0] if lines else None

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))
        return records


@pytest.fixture(scope="module")
def server(xlmr_reranker: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("server")
    hold, warmup_hold, log = tmp / "hold", tmp / "warmup-hold", tmp / "server.log"
    warmup_hold.touch()
    port = free_port()
    env = {
        **os.environ,
        "TEST_HOLD_FILE": str(hold),
        "TEST_WARMUP_HOLD_FILE": str(warmup_hold),
        # Configured through RERANKER_* variables only, as the operator does.
        "RERANKER_MODEL": str(xlmr_reranker),
        "RERANKER_HOST": "127.0.0.1",
        "RERANKER_PORT": str(port),
        "RERANKER_DEVICE": "cpu",
        "RERANKER_DTYPE": "float32",
        "RERANKER_MAX_BATCH_TOKENS": "1024",
        "RERANKER_MAX_BATCH_REQUESTS": "1",  # one pair per forward pass: queues form
        "RERANKER_SERVED_MODEL_NAME": "tiny-bge",
        "RERANKER_LOG_FORMAT": "json",
        "RERANKER_AUTO_TRUNCATE": "false",
    }
    launcher = tmp / "launch.py"
    launcher.write_text(LAUNCHER)
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(launcher), "serve"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Server(proc, f"http://127.0.0.1:{port}", log, hold, warmup_hold)
    finally:
        hold.unlink(missing_ok=True)
        warmup_hold.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_startup_live_first_then_ready(server: Server, xlmr_reranker: Path) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        wait_for("/live", lambda: status_of(client, "/live") == 200, server.proc)
        health = client.get("/health")  # warm-up is held: loaded or loading, not ready
        assert health.status_code == 503 and health.json()["error_type"] == "Unhealthy"
        assert client.post("/rerank", json={"query": QUERY, "texts": TEXTS}).status_code == 503
        server.warmup_hold.unlink()
        wait_for("/health 200", lambda: status_of(client, "/health") == 200, server.proc)

        resp = client.post(
            "/rerank", json={"query": QUERY, "texts": TEXTS}, headers={"x-request-id": "req-1"}
        )
        assert resp.status_code == 200
        ref = reference_logits(xlmr_reranker, [(QUERY, t) for t in TEXTS])
        for item in resp.json():
            assert item["score"] == pytest.approx(sigmoid(ref[item["index"]][0]), abs=TOL)
        info = client.get("/info").json()
        assert info["served_model_name"] == "tiny-bge"  # from RERANKER_SERVED_MODEL_NAME
        assert info["max_batch_requests"] == 1 and info["max_batch_tokens"] == 1024

    wait_for("access log line", lambda: server.access_line("req-1") is not None)
    line = server.access_line("req-1")
    assert line is not None
    assert (line["route"], line["status"], line["pairs"]) == ("/rerank", 200, len(TEXTS))
    assert line["tokens"] > 0 and line["duration_ms"] >= 0


def test_client_disconnect_drops_queued_pairs(server: Server) -> None:
    server.ready()
    body = json.dumps({"query": QUERY, "texts": TEXTS}).encode()
    request = (
        f"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"X-Request-Id: gone-1\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with httpx.Client(base_url=server.url, timeout=30) as client:
        server.hold.touch()
        try:
            sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
            sock.sendall(request)
            wait_for("pairs queued", lambda: metric(client, "te_queue_size") > 0, server.proc)
            sock.close()  # the client goes away while its pairs wait
            # The queue empties while the engine is still held: the pairs were dropped, not run.
            wait_for("queue drained", lambda: metric(client, "te_queue_size") == 0, server.proc)
        finally:
            server.hold.unlink(missing_ok=True)
        wait_for("499 logged", lambda: server.access_line("gone-1") is not None)
        assert server.access_line("gone-1")["status"] == 499  # type: ignore[index]
        assert client.post("/rerank", json={"query": QUERY, "texts": ["a"]}).status_code == 200


def test_sigterm_drains_in_flight_requests_then_exits_zero(server: Server) -> None:
    server.ready()
    result: dict[str, Any] = {}

    def in_flight_request() -> None:
        with httpx.Client(base_url=server.url, timeout=WAIT_S) as c:
            result["response"] = c.post("/rerank", json={"query": QUERY, "texts": TEXTS})

    with httpx.Client(base_url=server.url, timeout=30) as client:
        server.hold.touch()
        try:
            thread = threading.Thread(target=in_flight_request)
            thread.start()
            wait_for(
                "request in flight",
                lambda: metric(client, "reranker_requests_in_flight") == 1,
                server.proc,
            )
            server.proc.send_signal(signal.SIGTERM)
            # Still listening while draining: readiness fails, new work is refused, in-flight work runs.
            wait_for("/health 503", lambda: status_of(client, "/health") == 503, server.proc)
            assert "shutting down" in client.get("/health").json()["error"]
            assert client.post("/rerank", json={"query": QUERY, "texts": ["a"]}).status_code == 503
            assert client.get("/live").status_code == 200
        finally:
            server.hold.unlink(missing_ok=True)
    thread.join(WAIT_S)
    assert result["response"].status_code == 200
    assert len(result["response"].json()) == len(TEXTS)
    assert server.proc.wait(timeout=WAIT_S) == 0
    assert any("draining" in r.get("message", "") for r in server.log_records())
    # --log-format json: every line the process wrote is JSON (no loading progress bar).
    lines = [line for line in server.log.read_text().splitlines() if line.strip()]
    assert [line for line in lines if not line.startswith("{")] == []


def test_model_load_failure_exits_non_zero_with_a_clear_message(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("reranker-runtime")
    env = {
        **os.environ,
        "RERANKER_PORT": str(free_port()),
        "RERANKER_HOST": "127.0.0.1",
        "RERANKER_LOG_FORMAT": "text",
    }
    empty = tmp_path / "not-a-model"  # exists, so the load (in the background) is what fails
    empty.mkdir()
    proc = subprocess.run(
        [str(exe), "serve", "--model", str(empty)],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert proc.returncode == 1
    assert "reranker-runtime serve: error: model failed to load" in proc.stderr
    assert str(empty) in proc.stderr
    assert "Traceback" not in proc.stderr
