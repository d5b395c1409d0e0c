"""TEI/BEI routes over HTTP against the real app and a real (tiny) PyTorch engine:
POST /rerank (the seed's API, exact), /predict, /tokenize; scores against the fp32 reference."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import torch
from pydantic import TypeAdapter

from reranker_runtime.api import tei
from reranker_runtime.api.schemas import SimpleToken
from reranker_runtime.engines.torch_engine import TorchEngine
from reranker_runtime.service import to_the_end_on_a_thread
from runtime.api_support import (
    MAX_TEXTS,
    QUERY,
    RAW,
    TEXTS,
    TOL,
    long_text,
    serving,
    settings_for,
    sigmoid,
    truncated_reference,
)
from runtime.fakes import record_threads
from tiny_models import TINY_MAX_TOKENS, corpus, reference_logits

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(xlmr_reranker: Path, xlmr_engine: TorchEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(settings_for(xlmr_reranker), xlmr_engine) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(xlmr_reranker: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(xlmr_reranker)


# ---------------------------------------------------------------------------------------------
# POST /rerank


async def test_rerank_matches_reference_sorted_by_score(
    client: httpx.AsyncClient, xlmr_reranker: Path
) -> None:
    resp = await client.post("/rerank", json={"query": QUERY, "texts": TEXTS})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert isinstance(body, list) and len(body) == len(TEXTS)
    assert sorted(item["index"] for item in body) == list(range(len(TEXTS)))
    assert all(set(item) == {"index", "score"} for item in body)  # no text unless asked
    scores = [item["score"] for item in body]
    assert scores == sorted(scores, reverse=True)
    ref = reference_logits(xlmr_reranker, [(QUERY, t) for t in TEXTS])
    for item in body:
        assert item["score"] == pytest.approx(sigmoid(ref[item["index"]][0]), abs=TOL)
        assert 0.0 <= item["score"] <= 1.0


async def test_rerank_headers(client: httpx.AsyncClient, tokenizer: Any) -> None:
    resp = await client.post(
        "/rerank", json={"query": QUERY, "texts": TEXTS[:2]}, headers={"x-request-id": "abc-123"}
    )
    assert resp.status_code == 200
    for name in (
        "x-compute-time",
        "x-compute-tokens",
        "x-queue-time",
        "x-inference-time",
        "x-tokenization-time",
    ):
        assert int(resp.headers[name]) >= 0, name
    expected_tokens = sum(len(tokenizer(QUERY, t)["input_ids"]) for t in TEXTS[:2])
    assert int(resp.headers["x-compute-tokens"]) == expected_tokens
    assert resp.headers["x-request-id"] == "abc-123"
    generated = (await client.post("/rerank", json={"query": QUERY, "texts": ["a"]})).headers[
        "x-request-id"
    ]
    assert len(generated) >= 16


async def test_rerank_return_text_and_raw_scores(
    client: httpx.AsyncClient, xlmr_reranker: Path
) -> None:
    resp = await client.post(
        "/rerank", json={"query": QUERY, "texts": TEXTS, "return_text": True, "raw_scores": True}
    )
    assert resp.status_code == 200
    ref = reference_logits(xlmr_reranker, [(QUERY, t) for t in TEXTS])
    body = resp.json()
    assert [item["score"] for item in body] == sorted(
        (item["score"] for item in body), reverse=True
    )
    for item in body:
        assert item["text"] == TEXTS[item["index"]]
        assert item["score"] == pytest.approx(ref[item["index"]][0], **RAW)


async def test_seed_example_request(client: httpx.AsyncClient) -> None:
    # The request body exactly as the seed README shows it.
    resp = await client.post(
        "/rerank",
        json={
            "query": "What is Baseten?",
            "raw_scores": False,
            "return_text": False,
            "texts": ["Deep Learning is ...", "Baseten is a fast inference provider"],
            "truncate": False,
            "truncation_direction": "right",
        },
    )
    assert resp.status_code == 200
    assert [set(item) for item in resp.json()] == [{"index", "score"}] * 2


async def test_truncation_both_directions_any_case(
    client: httpx.AsyncClient, xlmr_reranker: Path
) -> None:
    text = long_text()
    results = {}
    for direction in ("Right", "LEFT", "left", "right"):
        resp = await client.post(
            "/rerank",
            json={
                "query": QUERY,
                "texts": [text],
                "truncate": True,
                "truncation_direction": direction,
                "raw_scores": True,
            },
        )
        assert resp.status_code == 200, resp.text
        results[direction.lower()] = resp.json()[0]["score"]
    assert results["right"] == pytest.approx(
        truncated_reference(xlmr_reranker, QUERY, text, "right"), **RAW
    )
    assert results["left"] == pytest.approx(
        truncated_reference(xlmr_reranker, QUERY, text, "left"), **RAW
    )
    assert abs(results["right"] - results["left"]) > 1e-3  # the two cuts really differ


async def test_too_long_without_truncation_is_422_naming_count_and_limit(
    client: httpx.AsyncClient, tokenizer: Any
) -> None:
    text = long_text()
    n_tokens = len(tokenizer(QUERY, text)["input_ids"])
    for body in (
        {"query": QUERY, "texts": ["short", text], "truncate": False},
        {"query": QUERY, "texts": [text], "truncate": False, "truncation_direction": "left"},
    ):
        resp = await client.post("/rerank", json=body)
        assert resp.status_code == 422
        err = resp.json()
        assert err["error_type"] == "Validation"
        assert str(n_tokens) in err["error"] and str(TINY_MAX_TOKENS) in err["error"]


@pytest.mark.parametrize(
    ("auto_truncate", "truncate", "status"),
    [
        (True, None, 200),  # TEI's default: a request that does not say is truncated
        (True, False, 422),  # the request's own truncate wins, as in TEI
        (True, True, 200),
        (False, None, 422),  # --auto-truncate false
        (False, True, 200),
    ],
)
async def test_auto_truncate_decides_for_requests_that_do_not_say(
    xlmr_reranker: Path,
    xlmr_engine: TorchEngine,
    auto_truncate: bool,
    truncate: bool | None,
    status: int,
) -> None:
    text = long_text()
    said = {} if truncate is None else {"truncate": truncate}
    body: dict[str, Any] = {"query": QUERY, "texts": [text], "raw_scores": True, **said}
    settings = settings_for(xlmr_reranker, auto_truncate=auto_truncate)
    async with serving(settings, xlmr_engine) as client:
        resp = await client.post("/rerank", json=body)
        assert resp.status_code == status, resp.text
        if status == 200:
            assert resp.json()[0]["score"] == pytest.approx(
                truncated_reference(xlmr_reranker, QUERY, text, "right"), **RAW
            )
        else:
            assert "truncate=true" in resp.json()["error"]
        predicted = await client.post("/predict", json={"inputs": [QUERY, text], **said})
        assert predicted.status_code == status, predicted.text
        info = (await client.get("/info")).json()
        assert info["auto_truncate"] is auto_truncate


@pytest.mark.parametrize(
    ("body", "status", "error_type", "needle"),
    [
        ({"query": QUERY, "texts": []}, 400, "Empty", "texts"),
        ({"query": "", "texts": ["a"]}, 400, "Empty", "query"),
        (
            {"query": QUERY, "texts": ["x"] * (MAX_TEXTS + 1)},
            422,  # TEI's status and message
            "Validation",
            f"batch size {MAX_TEXTS + 1} > maximum allowed batch size {MAX_TEXTS}",
        ),
        (
            {"query": QUERY, "texts": ["a", "b", "c", 3]},
            422,
            "Validation",
            "texts.3: Input should be a valid string",
        ),
        ({"texts": ["a"]}, 422, "Validation", "query: Field required"),
        ({"query": QUERY}, 422, "Validation", "texts: Field required"),
        ({"query": QUERY, "texts": "a"}, 422, "Validation", "texts: Input should be a valid list"),
        ({"query": 5, "texts": ["a"]}, 422, "Validation", "query: Input should be a valid string"),
        ({"query": QUERY, "texts": ["a"], "raw_scores": "yes"}, 422, "Validation", "raw_scores"),
        ({"query": QUERY, "texts": ["a"], "return_text": 1}, 422, "Validation", "return_text"),
        ({"query": QUERY, "texts": ["a"], "truncate": "no"}, 422, "Validation", "truncate"),
        (
            {"query": QUERY, "texts": ["a"], "truncation_direction": "up"},
            422,
            "Validation",
            "truncation_direction",
        ),
        (
            {"query": QUERY, "texts": ["a"], "truncation_direction": 1},
            422,
            "Validation",
            "truncation_direction",
        ),
        ([QUERY, "a"], 422, "Validation", "body"),
    ],
)
async def test_rerank_errors(
    client: httpx.AsyncClient, body: Any, status: int, error_type: str, needle: str
) -> None:
    resp = await client.post("/rerank", json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()
    assert set(err) == {"error", "error_type"}
    assert err["error_type"] == error_type
    assert needle in err["error"]


async def test_malformed_json(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        "/rerank",
        content=b'{"query": "q", "texts": [',
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 400
    assert resp.json()["error_type"] == "Validation" and "malformed JSON" in resp.json()["error"]
    # An empty body is malformed JSON too (TEI's axum: a syntax error, 400), on every route.
    for path in ("/rerank", "/predict", "/v2/rerank", "/score", "/tokenize", "/", "/invocations"):
        resp = await client.post(path, content=b"", headers={"content-type": "application/json"})
        assert resp.status_code == 400, (path, resp.text)
        assert "malformed JSON body: the body is empty" in resp.json()["error"], path


async def test_a_body_that_is_not_an_object_says_so(client: httpx.AsyncClient) -> None:
    """Valid JSON of the wrong kind (an array, null, a string) names what was sent, on every
    route that takes a JSON object, instead of pydantic's 'valid dictionary or object'."""
    cases = ((b"[1, 2]", "an array"), (b"null", "null"), (b'"q"', "a string"), (b"3", "a number"))
    routes = ("/rerank", "/predict", "/v2/rerank", "/v1/rerank", "/score", "/tokenize", "/")
    for path in (*routes, "/invocations", "/vertex"):
        for body, got in cases:
            resp = await client.post(
                path, content=body, headers={"content-type": "application/json"}
            )
            assert resp.status_code == 422, (path, body, resp.text)
            assert resp.json()["error"] == (
                f"body: must be a JSON object with the request's fields, got {got}"
            ), (path, body)


_BODIES = {
    "/rerank": {"query": "q", "texts": ["a"]},
    "/v2/rerank": {"query": "q", "documents": ["a"]},
    "/": {"query": "q", "texts": ["a"]},  # parses its body itself: checked all the same
}


@pytest.mark.parametrize("path", list(_BODIES))
@pytest.mark.parametrize(
    ("headers", "status", "needles"),
    [
        # TEI (axum's Json): 415 unless the body is declared as JSON.
        ({}, 415, ["Content-Type: application/json", "no Content-Type"]),
        ({"content-type": "text/plain"}, 415, ["Content-Type: application/json", "text/plain"]),
        (
            {"content-type": "application/json", "content-encoding": "gzip"},
            415,
            ["Content-Encoding 'gzip' is not supported"],
        ),
        ({"content-type": "application/json; charset=utf-8"}, 200, []),
        ({"content-type": "application/vnd.api+json"}, 200, []),
        ({"content-type": "application/json", "content-encoding": "identity"}, 200, []),
    ],
)
async def test_body_media_type_and_encoding(
    client: httpx.AsyncClient, path: str, headers: dict[str, str], status: int, needles: list[str]
) -> None:
    content = json.dumps(_BODIES[path]).encode()
    resp = await client.post(path, content=content, headers=headers)
    assert resp.status_code == status, resp.text
    if status != 200:
        assert resp.json()["error_type"] == "Validation"
        for needle in needles:
            assert needle in resp.json()["error"], resp.json()


@pytest.mark.parametrize("path", list(_BODIES))
async def test_body_not_utf8_is_400_naming_the_byte(client: httpx.AsyncClient, path: str) -> None:
    texts = "documents" if path == "/v2/rerank" else "texts"
    content = b'{"query": "caf\xe9", "' + texts.encode() + b'": ["a"]}'  # latin-1, not UTF-8
    resp = await client.post(path, content=content, headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json() == {
        "error": "body is not valid UTF-8 (byte 14); send the JSON encoded as UTF-8",
        "error_type": "Validation",
    }


async def test_a_body_without_content_type_says_how_to_send_it(client: httpx.AsyncClient) -> None:
    resp = await client.post("/rerank", content=json.dumps(_BODIES["/rerank"]).encode())
    assert resp.status_code == 415
    assert resp.json()["error"] == (
        "expected a JSON body sent with 'Content-Type: application/json', got no Content-Type; "
        "send that header (curl: -H 'Content-Type: application/json')"
    )


@pytest.mark.parametrize("path", list(_BODIES))
@pytest.mark.parametrize(
    "content",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"query": "q", "texts": ["a"], "top_n": 1' + b"0" * 5000 + b"}",
    ],
    ids=["nested", "long-number"],
)
async def test_body_beyond_the_json_parser_is_400_not_500(
    client: httpx.AsyncClient, path: str, content: bytes
) -> None:
    resp = await client.post(path, content=content, headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"].startswith(
        "body could not be parsed as JSON: it is nested too deeply or holds a number too long"
    )


async def test_50_concurrent_mixed_requests_match_reference(
    client: httpx.AsyncClient, xlmr_reranker: Path
) -> None:
    rng = random.Random(1)
    words = " ".join(corpus(200, seed=3)).split()
    requests: list[tuple[str, list[str]]] = []
    for _ in range(50):
        query = " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))
        texts = [
            " ".join(rng.choice(words) for _ in range(rng.randint(1, 20)))
            for _ in range(rng.randint(1, 8))
        ]
        requests.append((query, texts))
    responses = await asyncio.gather(
        *(client.post("/rerank", json={"query": q, "texts": t}) for q, t in requests)
    )
    ref = reference_logits(xlmr_reranker, [(q, t) for q, texts in requests for t in texts])
    offset = 0
    for (_query, texts), resp in zip(requests, responses, strict=True):
        assert resp.status_code == 200, resp.text
        by_index = {item["index"]: item["score"] for item in resp.json()}
        assert sorted(by_index) == list(range(len(texts)))
        for i in range(len(texts)):
            assert by_index[i] == pytest.approx(sigmoid(ref[offset + i][0]), abs=TOL)
        offset += len(texts)


async def test_bert_reranker_matches_reference(
    bert_reranker: Path, bert_engine: TorchEngine
) -> None:
    async with serving(settings_for(bert_reranker), bert_engine) as bert:
        resp = await bert.post("/rerank", json={"query": QUERY, "texts": TEXTS})
        assert resp.status_code == 200
        ref = reference_logits(bert_reranker, [(QUERY, t) for t in TEXTS])
        for item in resp.json():
            assert item["score"] == pytest.approx(sigmoid(ref[item["index"]][0]), abs=TOL)


# ---------------------------------------------------------------------------------------------
# POST /predict


async def test_predict_shapes_on_a_reranker(client: httpx.AsyncClient, xlmr_reranker: Path) -> None:
    """TEI's PredictInput forms: a string, [text] and [text_a, text_b] are ONE input (a flat list
    of {label, score}); [[text], [text_a, text_b], ...] is a batch (a list of such lists)."""
    ref = reference_logits(xlmr_reranker, ["paris", ("what is", "paris"), "apple", ("a", "b")])

    def one(score: float) -> list[dict[str, Any]]:
        return [{"label": "LABEL_0", "score": pytest.approx(sigmoid(score), abs=TOL)}]

    for inputs, expected in (
        ("paris", one(ref[0][0])),
        (["paris"], one(ref[0][0])),
        (["what is", "paris"], one(ref[1][0])),
    ):
        resp = await client.post("/predict", json={"inputs": inputs})
        assert resp.status_code == 200, resp.text
        assert resp.json() == expected, inputs
    batch = await client.post(
        "/predict", json={"inputs": [["apple"], ["a", "b"], ["paris"]], "raw_scores": True}
    )
    assert batch.status_code == 200, batch.text
    got = [[(p["label"], p["score"]) for p in preds] for preds in batch.json()]
    assert got == [
        [("LABEL_0", pytest.approx(ref[2][0], **RAW))],
        [("LABEL_0", pytest.approx(ref[3][0], **RAW))],
        [("LABEL_0", pytest.approx(ref[0][0], **RAW))],
    ]
    one_item_batch = await client.post("/predict", json={"inputs": [["apple"]]})
    assert one_item_batch.json() == [one(ref[2][0])]
    assert "x-compute-tokens" in batch.headers


_EXPECTING = "expected a string, a pair of strings [string, string] or a batch"


@pytest.mark.parametrize(
    ("inputs", "needle"),
    [
        (5, "inputs: invalid type"),
        ([], "inputs: invalid length 0"),
        (["a", "b", "c"], "inputs: invalid length 3"),  # TEI refuses a third string
        (["a", 5], "inputs.1: invalid type"),
        (["a", ["b"]], "inputs.1: invalid type"),  # a string first: not a batch
        ([["a"], "b"], "inputs.1: invalid type"),  # a list first: every item a list
        ([["a"], []], "inputs.1: invalid length 0"),
        ([["a", "b", "c"]], "inputs.0: invalid length 3"),
        ([["a", 5]], "inputs.0: invalid type"),
    ],
)
async def test_predict_refuses_what_tei_refuses(
    client: httpx.AsyncClient, inputs: Any, needle: str
) -> None:
    resp = await client.post("/predict", json={"inputs": inputs})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error_type"] == "Validation"
    assert needle in resp.json()["error"] and _EXPECTING in resp.json()["error"]


async def test_predict_empty_text_is_400(client: httpx.AsyncClient) -> None:
    """The error names the input as sent: a single input is `inputs`, not a batch's element."""
    for inputs, named in (
        ("", "`inputs` is empty"),
        ([" "], "`inputs[0]` is empty"),
        (["a", " "], "`inputs[1]` is empty"),
        ([["a"], [" "]], "`inputs[1]` is empty"),
        ([["a"], ["b", ""]], "`inputs[1][1]` is empty"),
    ):
        resp = await client.post("/predict", json={"inputs": inputs})
        assert resp.status_code == 400 and resp.json()["error_type"] == "Empty", inputs
        assert resp.json()["error"].startswith(named), (inputs, resp.json())


async def test_predict_too_many_inputs(client: httpx.AsyncClient) -> None:
    resp = await client.post("/predict", json={"inputs": [["x"]] * (MAX_TEXTS + 1)})
    assert resp.status_code == 422, resp.text
    assert resp.json() == {
        "error": f"batch size {MAX_TEXTS + 1} > maximum allowed batch size {MAX_TEXTS}: "
        f"`inputs` has {MAX_TEXTS + 1} items; send fewer per request or raise "
        "--max-client-batch-size (RERANKER_MAX_CLIENT_BATCH_SIZE)",
        "error_type": "Validation",
    }


async def test_classifier_predict_and_rerank_refusal(
    xlmr_classifier: Path, classifier_engine: TorchEngine
) -> None:
    async with serving(settings_for(xlmr_classifier), classifier_engine) as clf:
        ref = reference_logits(xlmr_classifier, ["paris is nice", ("a query", "a text")])
        names = ["negative", "neutral", "positive"]
        resp = await clf.post(
            "/predict", json={"inputs": [["paris is nice"], ["a query", "a text"]]}
        )
        assert resp.status_code == 200, resp.text
        for preds, logits in zip(resp.json(), ref, strict=True):
            assert {p["label"] for p in preds} == {"negative", "neutral", "positive"}
            scores = [p["score"] for p in preds]
            assert scores == sorted(scores, reverse=True)
            probs = torch.softmax(torch.tensor(logits), dim=0).tolist()
            for p in preds:
                assert p["score"] == pytest.approx(probs[names.index(p["label"])], abs=TOL)
        raw = (
            await clf.post("/predict", json={"inputs": "paris is nice", "raw_scores": True})
        ).json()
        assert {p["label"]: p["score"] for p in raw} == pytest.approx(
            dict(zip(names, ref[0], strict=True)), **RAW
        )
        for route, body in (
            ("/rerank", {"query": "q", "texts": ["a"]}),
            ("/v2/rerank", {"query": "q", "documents": ["a"]}),
            ("/v1/rerank", {"query": "q", "documents": ["a"]}),
            # The model type comes first, as in TEI: before empty or too many texts.
            ("/rerank", {"query": "", "texts": []}),
            ("/rerank", {"query": "q", "texts": ["a"] * 17}),
            ("/v2/rerank", {"query": "q", "documents": [{"text": " "}]}),
        ):
            refused = await clf.post(route, json=body)
            # TEI: 424 Failed Dependency, error_type Backend, for a route of another model type
            assert refused.status_code == 424, (route, body)
            assert refused.json()["error_type"] == "Backend"
            assert (
                "classifier" in refused.json()["error"].lower()
                or "label" in refused.json()["error"].lower()
            )
        info = (await clf.get("/info")).json()
        assert info["num_labels"] == 3 and "classifier" in info["model_type"]


# ---------------------------------------------------------------------------------------------
# POST /tokenize


async def test_tokenize(client: httpx.AsyncClient, tokenizer: Any) -> None:
    text = "paris is the capital"
    resp = await client.post("/tokenize", json={"inputs": text})
    assert resp.status_code == 200, resp.text
    [tokens] = resp.json()
    assert [t["id"] for t in tokens] == tokenizer(text)["input_ids"]
    assert tokens[0]["special"] is True and tokens[-1]["special"] is True
    for t in tokens[1:-1]:
        assert t["special"] is False
        assert text[t["start"] : t["stop"]] == t["text"]
    plain = (
        await client.post(
            "/tokenize", json={"inputs": [text, "apple"], "add_special_tokens": False}
        )
    ).json()
    assert len(plain) == 2
    assert [t["id"] for t in plain[0]] == tokenizer(text, add_special_tokens=False)["input_ids"]
    bad = await client.post("/tokenize", json={"inputs": ["a", 1]})
    assert bad.status_code == 422 and "inputs.1" in bad.json()["error"]


async def test_an_error_quoting_a_lone_surrogate_is_still_a_422(client: httpx.AsyncClient) -> None:
    # The message quotes the client's value; a lone surrogate cannot be written as UTF-8.
    resp = await client.post(
        "/tokenize",
        content=b'{"inputs": "a", "prompt_name": "\\ud800"}',
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 422, resp.text
    assert "`prompt_name` is set to `\\ud800`" in resp.json()["error"]


async def test_tokenize_answer_is_built_off_the_event_loop_in_pieces(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A million tokens written on the event loop would hold every other request and the health
    probes for seconds: the answer is written on a worker thread, a few thousand tokens per
    json.dumps call, and reads exactly as the schema's list[list[SimpleToken]]."""
    threads = record_threads(monkeypatch, tei, "tokens_json")
    monkeypatch.setattr(tei, "TOKENS_PER_PIECE", 3)  # several pieces per sequence
    inputs = ["paris is the capital of france", 'é ü 東京 "quoted" \\ back', "x"]
    resp = await client.post("/tokenize", json={"inputs": inputs})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert threads and threads[0] is not threading.main_thread()
    service = resp.json()
    assert len(service) == 3 and all(len(seq) > 3 for seq in service[:2])  # several pieces
    expected = TypeAdapter(list[list[SimpleToken]]).validate_python(service)
    assert service == TypeAdapter(list[list[SimpleToken]]).dump_python(expected)
    assert any(t["start"] is None for t in service[0])  # special tokens: null offsets


async def test_tokenize_answers_are_built_one_per_tokenization_worker(
    xlmr_reranker: Path, xlmr_engine: TorchEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/tokenize takes no --max-concurrent-requests permit (as in TEI) and its answer can be
    30x its body: with one tokenization worker, eight at once are answered one after another
    (all of them), never built side by side."""
    building, most = 0, 0
    build = tei.tokens_json

    def counting(sequences: Any) -> bytes:
        nonlocal building, most
        building += 1
        most = max(most, building)
        try:
            threading.Event().wait(0.05)  # long enough for the others to overlap if they could
            return build(sequences)
        finally:
            building -= 1

    monkeypatch.setattr(tei, "tokens_json", counting)
    async with serving(settings_for(xlmr_reranker, tokenization_workers=1), xlmr_engine) as client:
        answers = await asyncio.gather(
            *(client.post("/tokenize", json={"inputs": [f"text {i}"] * 3}) for i in range(8))
        )
    assert [a.status_code for a in answers] == [200] * 8
    assert most == 1


async def test_a_cancelled_tokenize_waits_for_its_answer_being_built() -> None:
    """A client that leaves while its answer is built on a thread: the request ends only when
    the thread has, so its tokenize slot bounds that memory until then."""
    finished = threading.Event()

    def slow(sequences: Any) -> bytes:
        threading.Event().wait(0.3)
        finished.set()
        return b"[]"

    request = asyncio.ensure_future(to_the_end_on_a_thread(slow, []))
    await asyncio.sleep(0.05)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert finished.is_set()


@pytest.mark.parametrize(
    ("inputs", "needle"),
    [("", "`inputs` cannot be empty"), (["a", ""], "`inputs[1]` cannot be empty")],
)
async def test_tokenize_empty_input_is_400(
    client: httpx.AsyncClient, inputs: Any, needle: str
) -> None:
    # TEI's tokenizer refuses an empty input ("`inputs` cannot be empty", 400 Empty); a blank one
    # is tokenized.
    resp = await client.post("/tokenize", json={"inputs": inputs})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error_type"] == "Empty" and needle in resp.json()["error"]
    assert (await client.post("/tokenize", json={"inputs": " "})).status_code == 200
