"""Helpers shared by the API tests (test_api_*.py): the real app over HTTP, settings, references."""

from __future__ import annotations

import asyncio
import math
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import torch

from reranker_runtime.api import create_app
from reranker_runtime.config import ServeSettings
from runtime.fakes import ControlledEngine
from tiny_models import TINY_MAX_TOKENS, corpus

MAX_TEXTS = 16  # --max-client-batch-size of the test servers (small: the 413 case stays cheap)
TOL = 1e-5  # on sigmoid scores (the bar)
RAW = dict(abs=1e-5, rel=1e-5)  # raw logits of a few units: batching float noise scales with them
QUERY = "what is the capital of france"
TEXTS = [
    "paris is the capital city of france",
    "the river in the city",
    "apple banana orange fruit",
    "deep learning model inference on a gpu cluster",
    "music art science",
    "what who where when why how",
]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def settings_for(model_dir: Path, **overrides: Any) -> ServeSettings:
    values: dict[str, Any] = dict(
        model=str(model_dir),
        device="cpu",
        dtype="float32",
        max_batch_tokens=2048,
        max_client_batch_size=MAX_TEXTS,
        log_format="text",
    )
    values.update(overrides)
    return ServeSettings(**values)


def free_port() -> int:
    """A TCP port nothing listens on right now (for the gRPC API's --grpc-port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def wait_until(client: httpx.AsyncClient, path: str = "/health", status: int = 200) -> None:
    """Poll `path` until it answers `status` (bounded, not a timing assertion)."""
    for _ in range(6000):
        if (await client.get(path)).status_code == status:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{path} never answered {status}")


@asynccontextmanager
async def running_app(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and talk to it over httpx's ASGI transport."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@asynccontextmanager
async def serving(settings: ServeSettings, engine: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The real app once /health says ready. A bare engine is wrapped in ControlledEngine so the
    service's stop() leaves the shared session engine open; a ControlledEngine is used as is."""
    if not isinstance(engine, ControlledEngine):
        engine = ControlledEngine(engine)
    app = create_app(settings, engine=engine)
    async with running_app(app) as client:
        await wait_until(client)
        yield client


def truncated_reference(
    model_dir: Path, query: str, text: str, side: str, max_length: int = TINY_MAX_TOKENS
) -> float:
    """fp32 logit of (query, text) cut to `max_length` tokens on `side`, query kept whole."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.truncation_side = side
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, torch_dtype=torch.float32
    ).eval()
    enc = tok(query, text, truncation="only_second", max_length=max_length, return_tensors="pt")
    assert enc["input_ids"].shape[1] == max_length
    with torch.inference_mode():
        return float(model(**enc).logits[0, 0])


def long_text(n_sentences: int = 6) -> str:
    """Far longer than the tiny models' 128 tokens."""
    return " ".join(corpus(n_sentences, seed=7))
