"""The real app under uvicorn on 127.0.0.1, configured exactly as `serve` configures it
(`server.uvicorn_config`: the guarded h11 protocol, keep-alive), in a background thread."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from reranker_runtime.api import create_app
from reranker_runtime.config import ServeSettings
from reranker_runtime.server import uvicorn_config

START_S = 120.0  # upper bound for the model to load and warm up (a failure, not a timing check)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_server(settings: ServeSettings, engine: Any) -> Iterator[str]:
    """Serve `engine` with `settings` until the block ends; yields the base URL once /health
    answers 200."""
    port = free_port()
    settings = dataclasses.replace(settings, host="127.0.0.1", port=port)
    server = uvicorn.Server(uvicorn_config(create_app(settings, engine=engine), settings))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if not thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError("the test server never became ready")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=60)
