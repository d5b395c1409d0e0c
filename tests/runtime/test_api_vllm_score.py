"""vLLM's Score API (`POST /score`, `/v1/score`) over HTTP, real engine: vLLM's field names and
pairings, its response shape, and scores equal to the fp32 reference of each pair."""

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


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(xlmr_reranker: Path, xlmr_engine: TorchEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(settings_for(xlmr_reranker, served_model_name="tiny-bge"), xlmr_engine) as c:
        yield c


def logits(model: Path, pairs: list[tuple[str, str]]) -> list[float]:
    return [row[0] for row in reference_logits(model, pairs)]


@pytest.mark.parametrize("route", ["/score", "/v1/score"])
@pytest.mark.parametrize(
    "first, second",
    [("text_1", "text_2"), ("queries", "documents"), ("queries", "items"), ("data_1", "data_2")],
)
async def test_one_text_against_many_in_request_order(
    client: httpx.AsyncClient,
    xlmr_reranker: Path,
    tokenizer: Any,
    route: str,
    first: str,
    second: str,
) -> None:
    resp = await client.post(route, json={"model": "bge", first: QUERY, second: TEXTS})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["id"].startswith("score-") and body["object"] == "list"
    assert isinstance(body["created"], int) and body["model"] == "bge"
    reference = [sigmoid(x) for x in logits(xlmr_reranker, [(QUERY, t) for t in TEXTS])]
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))  # not ranked
    assert all(d["object"] == "score" for d in body["data"])
    assert [d["score"] for d in body["data"]] == pytest.approx(reference, abs=TOL)
    tokens = sum(len(tokenizer(QUERY, t)["input_ids"]) for t in TEXTS)
    assert body["usage"] == {
        "prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
        "prompt_tokens_details": None,
    }  # fmt: skip
    assert int(resp.headers["x-compute-tokens"]) == tokens


@pytest.fixture(scope="module")
def tokenizer(xlmr_reranker: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(xlmr_reranker)


async def test_pairs_element_by_element_and_single_pairs(
    client: httpx.AsyncClient, xlmr_reranker: Path
) -> None:
    queries = [QUERY, "who wrote hamlet", "how tall is everest"]
    texts = TEXTS[:3]
    resp = await client.post("/score", json={"queries": queries, "documents": texts})
    assert resp.status_code == 200, resp.text
    reference = [sigmoid(x) for x in logits(xlmr_reranker, list(zip(queries, texts, strict=True)))]
    assert [d["score"] for d in resp.json()["data"]] == pytest.approx(reference, abs=TOL)
    # 1:1 with two strings, and with lists of one; the model name falls back to the server's.
    for pair in ({"text_1": QUERY, "text_2": TEXTS[0]}, {"text_1": [QUERY], "text_2": [TEXTS[0]]}):
        body = (await client.post("/score", json=pair)).json()
        assert body["model"] == "tiny-bge"
        (only,) = body["data"]
        assert only["score"] == pytest.approx(reference[0], abs=TOL)


async def test_raw_logits_with_use_activation_false(
    client: httpx.AsyncClient, xlmr_reranker: Path
) -> None:
    reference = logits(xlmr_reranker, [(QUERY, t) for t in TEXTS[:2]])
    for flag in ("use_activation", "activation", "softmax"):  # vLLM's current and older names
        body = {"text_1": QUERY, "text_2": TEXTS[:2], flag: False}
        data = (await client.post("/score", json=body)).json()["data"]
        assert [d["score"] for d in data] == pytest.approx(reference, abs=1e-5, rel=1e-5)


async def test_long_pairs_follow_truncate_prompt_tokens(
    client: httpx.AsyncClient, xlmr_reranker: Path
) -> None:
    text = long_text()
    for budget in (-1, 128, 10_000):  # the model's maximum (128 tokens) or more: cut to it
        resp = await client.post(
            "/score", json={"text_1": QUERY, "text_2": [text], "truncate_prompt_tokens": budget}
        )
        assert resp.status_code == 200, resp.text
        expected = sigmoid(truncated_reference(xlmr_reranker, QUERY, text, "right"))
        assert resp.json()["data"][0]["score"] == pytest.approx(expected, abs=TOL)
    # A smaller budget would score another text than vLLM does: refused, naming the field.
    resp = await client.post(
        "/score", json={"text_1": QUERY, "text_2": [text], "truncate_prompt_tokens": 64}
    )
    assert resp.status_code == 422 and "truncate_prompt_tokens=64" in resp.json()["error"]


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, 422, "`text_1` has 2 texts and `text_2` 3"),
        ({"queries": "q"}, 422, "send exactly one pair of fields"),
        ({"queries": "q", "documents": ["d"], "items": ["i"]}, 422, "found: queries and documents, queries and items"),
        ({"queries": "q", "items": ["i"], "data_1": ""}, 422,
         "data_1: sent with queries and items, but belongs to another pair of fields"),
        ({"text_1": "q", "text_2": ["d"], "documents": ["x"]}, 422, "documents: sent with text_1"),
        ({"text_1": "q", "text_2": []}, 400, "`text_2` must not be empty"),
        ({"text_1": "q", "text_2": ["ok", "  "]}, 400, "`text_2[1]` is empty"),
        ({"text_1": " ", "text_2": ["ok"]}, 400, "`text_1[0]` is empty"),
        ({"text_1": "q", "text_2": [1]}, 422, "text_2: Input should be a string or a list of strings"),
        ({"text_1": "q", "text_2": ["d"], "truncate_prompt_tokens": -2}, 422, "truncate_prompt_tokens"),
        ({"text_1": "q", "text_2": ["d"] * (MAX_TEXTS + 1)}, 422, "text_2"),
    ],
)  # fmt: skip
async def test_bad_requests_name_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], status: int, fragment: str
) -> None:
    resp = await client.post("/score", json=body)
    assert resp.status_code == status, resp.text
    assert fragment in resp.json()["error"]


async def test_a_classifier_is_refused_as_on_rerank(
    xlmr_classifier: Path, classifier_engine: TorchEngine
) -> None:
    async with serving(settings_for(xlmr_classifier), classifier_engine) as clf:
        for body in (
            {"text_1": "q", "text_2": ["d"]},
            {"text_1": ["q", "r"], "text_2": ["d", "e"]},
        ):
            resp = await clf.post("/score", json=body)
            assert resp.status_code == 424 and "classifier" in resp.json()["error"]


async def test_a_pair_scores_the_same_through_either_path_whatever_the_chunking_default(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    # vLLM scores one sequence per pair: --max-chunks-per-doc (windows on /rerank) stays out.
    text = long_text()
    settings = settings_for(xlmr_reranker, max_chunks_per_doc=4, auto_truncate=False)
    async with serving(settings, xlmr_engine) as c:
        cut = {"truncate_prompt_tokens": -1}
        one_to_n = await c.post("/score", json={"text_1": QUERY, "text_2": [text], **cut})
        pairwise = await c.post("/score", json={"text_1": [QUERY] * 2, "text_2": [text] * 2, **cut})
        expected = sigmoid(truncated_reference(xlmr_reranker, QUERY, text, "right"))
        assert one_to_n.json()["data"][0]["score"] == pytest.approx(expected, abs=TOL)
        assert [d["score"] for d in pairwise.json()["data"]] == pytest.approx(
            [expected] * 2, abs=TOL
        )
        # Without truncation (the server's --auto-truncate is false here) both refuse it, and say
        # how to cut it on this API.
        for body in (
            {"text_1": QUERY, "text_2": [text]},
            {"text_1": [QUERY] * 2, "text_2": [text] * 2},
        ):
            resp = await c.post("/score", json=body)
            assert resp.status_code == 422, resp.text
            assert "send truncate_prompt_tokens: -1" in resp.json()["error"]


async def test_null_fields_count_as_absent_and_the_old_activation_names_come_first(
    client: httpx.AsyncClient, xlmr_reranker: Path
) -> None:
    body = {
        "queries": QUERY,
        "documents": TEXTS[:1],
        "text_1": None,
        "truncate_prompt_tokens": None,
    }
    resp = await client.post("/score", json=body)
    assert resp.status_code == 200, resp.text
    # vLLM's get_use_activation reads softmax, then activation, then use_activation.
    (raw,) = logits(xlmr_reranker, [(QUERY, TEXTS[0])])
    conflicting = {"text_1": QUERY, "text_2": TEXTS[:1], "softmax": False, "use_activation": True}
    (only,) = (await client.post("/score", json=conflicting)).json()["data"]
    assert only["score"] == pytest.approx(raw, abs=1e-5, rel=1e-5)
