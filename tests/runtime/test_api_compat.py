"""Cohere v2 (`POST /v2/rerank`) and Jina (`POST /v1/rerank`) routes over HTTP, real engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from reranker_runtime.engines.torch_engine import TorchEngine
from runtime.api_support import (
    MAX_TEXTS,
    QUERY,
    TEXTS,
    TOL,
    long_text,
    serving,
    settings_for,
    sigmoid,
    truncated_reference,
)
from tiny_models import reference_logits

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROUTES = ("/v2/rerank", "/v1/rerank")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(xlmr_reranker: Path, xlmr_engine: TorchEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(settings_for(xlmr_reranker, served_model_name="tiny-bge"), xlmr_engine) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(xlmr_reranker: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(xlmr_reranker)


@pytest.fixture(scope="module")
def reference(xlmr_reranker: Path) -> list[float]:
    return [sigmoid(row[0]) for row in reference_logits(xlmr_reranker, [(QUERY, t) for t in TEXTS])]


def check_ranked(results: list[dict[str, Any]], reference: list[float]) -> None:
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    for r in results:
        assert r["relevance_score"] == pytest.approx(reference[r["index"]], abs=TOL)


async def test_cohere_v2_response(
    client: httpx.AsyncClient, tokenizer: Any, reference: list[float]
) -> None:
    # Strings and {text} objects mix; Cohere v1's rank_fields ["text"] (its default) is accepted.
    docs: list[Any] = [TEXTS[0], {"text": TEXTS[1], "id": "x"}, *TEXTS[2:]]
    resp = await client.post(
        "/v2/rerank",
        json={"model": "whatever", "query": QUERY, "documents": docs, "rank_fields": ["text"]},
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"id", "results", "meta"}
    assert isinstance(body["id"], str) and body["id"]
    assert len(body["results"]) == len(TEXTS)
    assert sorted(r["index"] for r in body["results"]) == list(range(len(TEXTS)))
    assert all("document" not in r for r in body["results"])  # Cohere default: no documents
    assert all(r["truncated"] is False for r in body["results"])
    check_ranked(body["results"], reference)
    tokens = sum(len(tokenizer(QUERY, t)["input_ids"]) for t in TEXTS)
    assert body["meta"]["billed_units"] == {"search_units": 1}
    assert body["meta"]["tokens"]["input_tokens"] == tokens
    assert body["meta"]["api_version"]["version"] == "2"
    assert int(resp.headers["x-compute-tokens"]) == tokens


async def test_jina_response(
    client: httpx.AsyncClient, tokenizer: Any, reference: list[float]
) -> None:
    resp = await client.post(
        "/v1/rerank", json={"model": "jina-reranker-v2", "query": QUERY, "documents": TEXTS}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "jina-reranker-v2"
    assert body["usage"] == {
        "total_tokens": sum(len(tokenizer(QUERY, t)["input_ids"]) for t in TEXTS)
    }
    for r in body["results"]:
        assert r["document"] == {"text": TEXTS[r["index"]]}  # Jina default: documents returned
    check_ranked(body["results"], reference)
    # Cohere's v1 SDK posts to this path too and reads Cohere v1's `meta`.
    assert body["meta"]["api_version"] == {"version": "1"}
    assert body["meta"]["billed_units"] == {"search_units": 1}
    assert body["meta"]["tokens"]["input_tokens"] == body["usage"]["total_tokens"]
    unnamed = (await client.post("/v1/rerank", json={"query": QUERY, "documents": ["a"]})).json()
    assert unnamed["model"] == "tiny-bge"  # --served-model-name when the request names none


@pytest.mark.parametrize("route", ROUTES)
async def test_top_n_and_return_documents(
    client: httpx.AsyncClient, route: str, reference: list[float]
) -> None:
    resp = await client.post(
        route,
        json={
            "query": QUERY,
            "documents": TEXTS,
            "top_n": 2,
            "return_documents": route == "/v2/rerank",
        },
    )
    assert resp.status_code == 200
    results = resp.json()["results"]
    best = sorted(range(len(TEXTS)), key=lambda i: -reference[i])[:2]
    assert [r["index"] for r in results] == best
    if route == "/v2/rerank":
        assert [r["document"]["text"] for r in results] == [TEXTS[i] for i in best]
    else:
        assert all("document" not in r for r in results)
    everything = (
        await client.post(route, json={"query": QUERY, "documents": TEXTS, "top_n": 100})
    ).json()
    assert len(everything["results"]) == len(TEXTS)


@pytest.mark.parametrize("route", ROUTES)
async def test_long_documents_are_truncated_not_refused(
    client: httpx.AsyncClient, route: str, xlmr_reranker: Path
) -> None:
    text = long_text()
    resp = await client.post(route, json={"query": QUERY, "documents": ["short one", text]})
    assert resp.status_code == 200, resp.text
    by_index = {r["index"]: r for r in resp.json()["results"]}
    assert by_index[0]["truncated"] is False and by_index[1]["truncated"] is True
    expected = sigmoid(truncated_reference(xlmr_reranker, QUERY, text, "right"))
    assert by_index[1]["relevance_score"] == pytest.approx(expected, abs=TOL)


async def test_max_tokens_per_doc(
    client: httpx.AsyncClient, tokenizer: Any, xlmr_reranker: Path
) -> None:
    doc = TEXTS[3]  # "deep learning model inference on a gpu cluster"
    n = 4
    assert len(tokenizer(doc, add_special_tokens=False)["input_ids"]) > n
    resp = await client.post(
        "/v2/rerank", json={"query": QUERY, "documents": [doc, "gpu"], "max_tokens_per_doc": n}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    by_index = {r["index"]: r for r in body["results"]}
    assert by_index[0]["truncated"] is True and by_index[1]["truncated"] is False
    # The expected score: the pair with only the document's first n tokens.
    enc = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
    cut = doc[: enc["offset_mapping"][n - 1][1]]
    [[logit]] = reference_logits(xlmr_reranker, [(QUERY, cut)])
    assert by_index[0]["relevance_score"] == pytest.approx(sigmoid(logit), abs=TOL)
    expected_tokens = len(tokenizer(QUERY, cut)["input_ids"]) + len(
        tokenizer(QUERY, "gpu")["input_ids"]
    )
    assert body["meta"]["tokens"]["input_tokens"] == expected_tokens


async def test_jina_route_errors_also_carry_jinas_detail(client: httpx.AsyncClient) -> None:
    """Jina's clients read `detail` (LlamaIndex's JinaRerank raises KeyError without it)."""
    jina = await client.post("/v1/rerank", json={"query": "", "documents": ["a"]})
    assert jina.status_code == 400
    body = jina.json()
    assert body["detail"] == body["error"] and body["error_type"] == "Empty"
    schema = await client.post("/v1/rerank", json={"query": QUERY})
    assert schema.status_code == 422 and schema.json()["detail"] == schema.json()["error"]
    cohere = await client.post("/v2/rerank", json={"query": "", "documents": ["a"]})
    assert set(cohere.json()) == {"error", "error_type"}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (
            {"query": QUERY, "documents": ["a"], "top_n": 0},
            422,
            "top_n: Input should be greater than 0",
        ),
        ({"query": QUERY, "documents": ["a"], "top_n": -3}, 422, "top_n"),
        (
            {"query": QUERY, "documents": ["a"], "top_n": "2"},
            422,
            "top_n: Input should be a valid integer",
        ),
        ({"query": QUERY, "documents": ["a"], "top_n": 1.5}, 422, "top_n"),
        ({"query": QUERY, "documents": ["a"], "max_tokens_per_doc": 0}, 422, "max_tokens_per_doc"),
        (
            {"query": QUERY, "documents": ["a", 1]},
            422,
            "documents.1: Input should be a string or an object",
        ),
        ({"query": QUERY, "documents": [{"txt": "a"}]}, 422, "documents.0"),
        ({"query": QUERY, "documents": "a"}, 422, "documents: Input should be a valid list"),
        ({"query": QUERY, "documents": ["a"], "return_documents": "yes"}, 422, "return_documents"),
        ({"documents": ["a"]}, 422, "query: Field required"),
        (
            {"query": QUERY, "documents": [{"text": "a", "title": "b"}], "rank_fields": ["title"]},
            422,
            'rank_fields: only ["text"] is supported',
        ),
        ({"query": QUERY, "documents": []}, 400, "`documents` must not be empty"),
        ({"query": QUERY, "documents": ["a", "  "]}, 400, "`documents[1]` is empty"),
        ({"query": "", "documents": ["a"]}, 400, "query"),
        (
            {"query": QUERY, "documents": ["a"] * (MAX_TEXTS + 1)},
            422,
            f"`documents` has {MAX_TEXTS + 1} items",
        ),
        (
            {"query": QUERY, "documents": ["a"] * (MAX_TEXTS + 1), "max_tokens_per_doc": 2},
            422,
            str(MAX_TEXTS),
        ),
    ],
)
async def test_errors(
    client: httpx.AsyncClient, route: str, body: dict[str, Any], status: int, needle: str
) -> None:
    resp = await client.post(route, json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()
    # TEI's body; the Jina route adds Jina's own field, `detail`.
    jina = {"detail"} if route == "/v1/rerank" else set()
    assert set(err) == {"error", "error_type", *jina}
    assert needle in err["error"]
