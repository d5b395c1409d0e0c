"""TEI drop-in, checked against TEI's own published API over HTTP on the real app (tiny models):
TEI's openapi request examples, POST / and /invocations by model type, /ping, /decode, 424 for
the embedding routes, TEI's /info fields, TEI's headers, CORS and the body limit.

`data/tei-openapi-1.9.3.json` is TEI's docs/openapi.json (huggingface/text-embeddings-inference
at 0d124dc, Apache-2.0), unchanged. TEI declares its examples per property, some as strings
("false", "null"); `example_body` turns them into the values TEI itself accepts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import pytest_asyncio
import torch

from reranker_runtime.api import create_app
from reranker_runtime.config import ServeSettings
from reranker_runtime.engines.torch_engine import TorchEngine
from reranker_runtime.server import (
    SettingsError,
    add_serve_parser,
    ignored_tei_variables,
    settings_from_args,
    use_hub_settings,
)
from reranker_runtime.tokenization import PairTokenizer
from runtime.api_support import (
    MAX_TEXTS,
    QUERY,
    TEXTS,
    TOL,
    running_app,
    serving,
    settings_for,
    sigmoid,
    wait_until,
)
from runtime.fakes import ControlledEngine
from tiny_models import reference_logits

pytestmark = pytest.mark.asyncio(loop_scope="module")

OPENAPI = json.loads((Path(__file__).parent / "data" / "tei-openapi-1.9.3.json").read_text())
SCHEMAS = OPENAPI["components"]["schemas"]
# TEI's routes of another model type (router/src/http/server.rs, `run`).
EMBEDDING_ROUTES = ("/embed", "/embed_all", "/embed_sparse", "/similarity", "/v1/embeddings")
OPENAI_ROUTES = ("/embeddings", "/v1/embeddings")
KEY = "s3cret"


# ---------------------------------------------------------------------------------------------
# TEI's openapi: examples and response schemas


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = SCHEMAS[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _coerce(value: Any, schema: dict[str, Any]) -> Any:
    """An example as TEI's serde would take it: "false" -> False, "null" -> None, "4" -> 4."""
    if value == "null" and (schema.get("nullable") or schema.get("type") != "string"):
        return None
    kind = schema.get("type")
    if kind == "boolean" and isinstance(value, str):
        return value == "true"
    if kind == "integer" and isinstance(value, str):
        return int(value)
    return value


def example_of(schema: dict[str, Any]) -> Any:
    schema = _resolve(schema)
    if "example" in schema:
        return _coerce(schema["example"], schema)
    if "allOf" in schema:
        if "default" in schema:
            return _coerce(schema["default"], {"type": "string", "nullable": True})
        return example_of(schema["allOf"][0])
    if "oneOf" in schema:
        return example_of(schema["oneOf"][0])
    kind = schema.get("type")
    if kind == "object":
        return {name: example_of(prop) for name, prop in schema.get("properties", {}).items()}
    if kind == "array":
        return [example_of(schema["items"])]
    if kind == "integer":
        return schema.get("minimum", 0)
    if kind == "string":
        return schema.get("enum", ["What is Deep Learning?"])[0]
    raise AssertionError(f"no example for {schema}")


def example_body(path: str) -> Any:
    return example_of(
        OPENAPI["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    )


def _as_json_schema(schema: Any) -> Any:
    """TEI's OpenAPI 3.0 schema as plain JSON Schema: refs inlined, `nullable` as a null type."""
    if isinstance(schema, list):
        return [_as_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = _resolve(schema)
    out = {k: _as_json_schema(v) for k, v in schema.items() if k not in ("example", "nullable")}
    out.pop("default", None)
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def assert_tei_response(path: str, body: Any, method: str = "post") -> None:
    schema = OPENAPI["paths"][path][method]["responses"]["200"]["content"]["application/json"]
    jsonschema.validate(body, _as_json_schema(schema["schema"]))


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(xlmr_reranker: Path, xlmr_engine: TorchEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(settings_for(xlmr_reranker), xlmr_engine) as c:
        yield c


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def classifier(
    xlmr_classifier: Path, classifier_engine: TorchEngine
) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(settings_for(xlmr_classifier), classifier_engine) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(xlmr_reranker: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(xlmr_reranker)


CLASSIFIER_LABELS = ["negative", "neutral", "positive"]


def softmax_by_label(logits: list[float]) -> dict[str, float]:
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=0).tolist()
    return dict(zip(CLASSIFIER_LABELS, probs, strict=True))


# ---------------------------------------------------------------------------------------------
# TEI's openapi request examples


async def test_openapi_examples_are_tei_requests() -> None:
    # What example_body builds is what TEI documents, with TEI's types.
    assert example_body("/rerank") == {
        "query": "What is Deep Learning?",
        "texts": ["Deep Learning is ..."],
        "raw_scores": False,
        "return_text": False,
        "truncate": False,
        "truncation_direction": "right",
    }
    assert example_body("/predict")["inputs"] == "What is Deep Learning?"
    assert example_body("/decode") == {"ids": [0], "skip_special_tokens": True}


async def test_openapi_rerank_example(client: httpx.AsyncClient, xlmr_reranker: Path) -> None:
    body = example_body("/rerank")
    resp = await client.post("/rerank", json=body)
    assert resp.status_code == 200, resp.text
    assert_tei_response("/rerank", resp.json())
    [ref] = reference_logits(xlmr_reranker, [(body["query"], body["texts"][0])])
    assert resp.json() == [{"index": 0, "score": pytest.approx(sigmoid(ref[0]), abs=TOL)}]


async def test_openapi_predict_example(client: httpx.AsyncClient, xlmr_reranker: Path) -> None:
    body = example_body("/predict")
    resp = await client.post("/predict", json=body)
    assert resp.status_code == 200, resp.text
    assert_tei_response("/predict", resp.json())
    [ref] = reference_logits(xlmr_reranker, [body["inputs"]])
    assert resp.json() == [{"label": "LABEL_0", "score": pytest.approx(sigmoid(ref[0]), abs=TOL)}]


async def test_openapi_tokenize_and_decode_examples(
    client: httpx.AsyncClient, tokenizer: Any
) -> None:
    body = example_body("/tokenize")
    resp = await client.post("/tokenize", json=body)
    assert resp.status_code == 200, resp.text
    assert_tei_response("/tokenize", resp.json())
    assert [t["id"] for t in resp.json()[0]] == tokenizer(body["inputs"])["input_ids"]
    resp = await client.post("/decode", json=example_body("/decode"))
    assert resp.status_code == 200, resp.text
    assert_tei_response("/decode", resp.json())
    assert resp.json() == [tokenizer.decode([0], skip_special_tokens=True)]


@pytest.mark.parametrize("path", ["/embed", "/embed_all", "/embed_sparse", "/similarity"])
async def test_openapi_embedding_examples_get_424(client: httpx.AsyncClient, path: str) -> None:
    resp = await client.post(path, json=example_body(path))
    assert resp.status_code == 424
    assert resp.json()["error_type"] == "Backend"
    expected = (
        "Backend error: Model is not an embedding model with SPLADE pooling"
        if path == "/embed_sparse"
        else "Backend error: Model is not an embedding model"
    )
    assert resp.json()["error"].startswith(expected)  # TEI's message, then what to use instead
    assert "/rerank" in resp.json()["error"]


@pytest.mark.parametrize("path", OPENAI_ROUTES)
async def test_openai_embedding_routes_get_424_in_openai_shape(
    client: httpx.AsyncClient, path: str
) -> None:
    resp = await client.post(path, json=example_body("/v1/embeddings"))
    assert resp.status_code == 424
    body = resp.json()
    assert set(body) == {"message", "code", "type"}  # TEI's OpenAICompatErrorResponse
    assert body["code"] == 424 and body["type"] == "Backend"
    assert body["message"].startswith("Backend error: Model is not an embedding model")


async def test_info_has_every_tei_field(client: httpx.AsyncClient) -> None:
    resp = await client.get("/info")
    assert resp.status_code == 200
    info = resp.json()
    jsonschema.validate(info, _as_json_schema(SCHEMAS["Info"]))
    assert set(SCHEMAS["Info"]["properties"]) <= set(info)
    assert info["tokenization_workers"] >= 1
    assert info["sha"] is None and info["docker_label"] is None  # not set in tests
    assert_tei_response("/info", info, method="get")


async def test_info_sha_and_docker_label_from_the_environment(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RERANKER_GIT_SHA", "0123abc")
    monkeypatch.setenv("DOCKER_LABEL", "sha-0123abc")
    info = (await client.get("/info")).json()
    assert (info["sha"], info["docker_label"]) == ("0123abc", "sha-0123abc")


# ---------------------------------------------------------------------------------------------
# POST / and /invocations, GET / and /ping


@pytest.mark.parametrize("path", ["/", "/invocations"])
async def test_default_route_reranks_on_a_reranker(
    client: httpx.AsyncClient, xlmr_reranker: Path, path: str
) -> None:
    resp = await client.post(path, json={"query": QUERY, "texts": TEXTS, "return_text": True})
    assert resp.status_code == 200, resp.text
    assert_tei_response("/rerank", resp.json())
    ref = reference_logits(xlmr_reranker, [(QUERY, t) for t in TEXTS])
    scores = [item["score"] for item in resp.json()]
    assert scores == sorted(scores, reverse=True)
    for item in resp.json():
        assert item["text"] == TEXTS[item["index"]]
        assert item["score"] == pytest.approx(sigmoid(ref[item["index"]][0]), abs=TOL)
    assert "x-compute-characters" in resp.headers
    # TEI serves /rerank there for a reranker: a /predict body (InferenceClient's
    # text_classification) is refused, saying which body this server takes and where to post it.
    refused = await client.post(path, json={"inputs": "paris"})
    assert refused.status_code == 422
    assert refused.json()["error"].startswith(
        "this server serves a reranker, so POST / takes /rerank's body"
    )
    assert "post it to /predict" in refused.json()["error"]
    incomplete = await client.post(path, json={"query": QUERY})
    assert incomplete.status_code == 422 and "texts: Field required" in incomplete.json()["error"]
    malformed = await client.post(path, content=b"{", headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and "malformed JSON" in malformed.json()["error"]


@pytest.mark.parametrize("path", ["/", "/invocations"])
async def test_default_route_predicts_on_a_classifier(
    classifier: httpx.AsyncClient, xlmr_classifier: Path, path: str
) -> None:
    resp = await classifier.post(path, json={"inputs": [["I love this"], ["meh"]]})
    assert resp.status_code == 200, resp.text
    assert_tei_response("/predict", resp.json())
    ref = reference_logits(xlmr_classifier, ["I love this", "meh"])
    for preds, logits in zip(resp.json(), ref, strict=True):
        assert {p["label"]: p["score"] for p in preds} == pytest.approx(
            softmax_by_label(logits), abs=TOL
        )
    refused = await classifier.post(path, json={"query": "q", "texts": ["a"]})
    assert refused.status_code == 422
    assert refused.json()["error"].startswith(
        "this server serves a classifier, so POST / takes /predict's body"
    )
    empty = await classifier.post(path, json={"raw_scores": True})
    assert empty.status_code == 422 and "inputs: Field required" in empty.json()["error"]


async def test_baseten_classify_batch_form(
    classifier: httpx.AsyncClient, xlmr_classifier: Path
) -> None:
    """Baseten's performance client `classify` posts TEI's batch form to /predict."""
    texts = ["I love this", "meh"]
    resp = await classifier.post("/predict", json={"inputs": [[t] for t in texts]})
    assert resp.status_code == 200, resp.text
    ref = reference_logits(xlmr_classifier, texts)
    assert len(resp.json()) == 2
    for preds, logits in zip(resp.json(), ref, strict=True):
        scores = [p["score"] for p in preds]
        assert scores == sorted(scores, reverse=True)
        assert {p["label"]: p["score"] for p in preds} == pytest.approx(
            softmax_by_label(logits), abs=TOL
        )
    # ["a"] is ONE input in TEI: a flat list of labels.
    single = await classifier.post("/predict", json={"inputs": ["I love this"]})
    assert {p["label"]: p["score"] for p in single.json()} == pytest.approx(
        softmax_by_label(ref[0]), abs=TOL
    )


async def test_openapi_names_the_default_routes_body_by_model_type(
    client: httpx.AsyncClient, classifier: httpx.AsyncClient
) -> None:
    for c, kind in ((client, "RerankRequest"), (classifier, "PredictRequest")):
        spec = (await c.get("/openapi.json")).json()
        for path in ("/", "/invocations"):
            body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
            assert body["schema"] == {"$ref": f"#/components/schemas/{kind}"}
        assert "/decode" in spec["paths"] and "/ping" in spec["paths"]
        # TEI's embedding routes answer 424 but are not offered to generated clients.
        assert not set(EMBEDDING_ROUTES) & set(spec["paths"])


async def test_openapi_also_at_teis_path(client: httpx.AsyncClient) -> None:
    # TEI serves its schema at /api-doc/openapi.json (router/src/http/server.rs, SwaggerUi).
    tei = await client.get("/api-doc/openapi.json")
    assert tei.status_code == 200 and tei.headers["content-type"] == "application/json"
    spec = tei.json()
    assert spec == (await client.get("/openapi.json")).json()
    assert "/rerank" in spec["paths"] and "/api-doc/openapi.json" not in spec["paths"]


@pytest.mark.parametrize("path", ["/", "/ping", "/health"])
async def test_get_probes(client: httpx.AsyncClient, path: str) -> None:
    resp = await client.get(path)
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}


async def test_probes_are_503_while_loading(xlmr_reranker: Path, xlmr_engine: TorchEngine) -> None:
    engine = ControlledEngine(xlmr_engine)
    engine.hold_warmup()
    app = create_app(settings_for(xlmr_reranker), engine=engine)
    async with running_app(app) as c:
        for path in ("/", "/ping"):
            resp = await c.get(path)
            assert resp.status_code == 503 and resp.json()["error_type"] == "Unhealthy"
        # POST / is admitted like every inference route: 503 until ready.
        assert (await c.post("/", json={"query": "q", "texts": ["a"]})).status_code == 503
        engine.release_warmup()
        await wait_until(c, "/ping")


# ---------------------------------------------------------------------------------------------
# /vertex


async def test_vertex_reranks_and_predicts_each_instance(
    client: httpx.AsyncClient, xlmr_reranker: Path
) -> None:
    instances = [
        {"query": QUERY, "texts": TEXTS[:3]},
        {"inputs": [["paris"], ["what is", "paris"]]},
        {"inputs": "apple"},
    ]
    resp = await client.post("/vertex", json={"instances": instances})
    assert resp.status_code == 200, resp.text
    ranks, batch, single = resp.json()["predictions"]
    ref = reference_logits(
        xlmr_reranker, [(QUERY, t) for t in TEXTS[:3]] + ["paris", ("what is", "paris"), "apple"]
    )
    assert {r["index"]: r["score"] for r in ranks} == pytest.approx(
        {i: sigmoid(ref[i][0]) for i in range(3)}, abs=TOL
    )
    assert [p[0]["score"] for p in batch] == pytest.approx(
        [sigmoid(ref[3][0]), sigmoid(ref[4][0])], abs=TOL
    )
    assert single == [{"label": "LABEL_0", "score": pytest.approx(sigmoid(ref[5][0]), abs=TOL)}]
    refused = await client.post("/vertex", json={"instances": [{"inputs": "a"}, {"inputs": 5}]})
    assert refused.status_code == 422 and "instances.1.inputs" in refused.json()["error"]
    refused = await client.post("/vertex", json={"instances": [{"query": "q"}]})
    assert (
        refused.status_code == 422
        and "instances.0.texts: Field required" in refused.json()["error"]
    )
    # Refusals found while scoring name the instance too.
    two = [{"query": QUERY, "texts": ["a", "b"]}, {"query": QUERY, "texts": ["a", " "]}]
    refused = await client.post("/vertex", json={"instances": two})
    assert refused.status_code == 400
    assert refused.json()["error"].startswith("instances.1: `texts[1]` is empty")
    # A bad header belongs to the whole request, not to an instance.
    bad = await client.post(
        "/vertex", json={"instances": two[:1]}, headers={"X-Request-Timeout": "abc"}
    )
    assert bad.status_code == 422 and not bad.json()["error"].startswith("instances.")


async def test_vertex_limits_hold_for_the_whole_request(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    """--max-client-batch-size and --max-request-characters bound a /vertex request as a
    whole, not each instance: three instances of MAX_TEXTS texts are refused, as one /rerank
    body of that many texts is."""
    settings = settings_for(xlmr_reranker, max_request_characters=1_000)
    async with serving(settings, xlmr_engine) as c:
        full = {"query": "q", "texts": ["a"] * MAX_TEXTS}
        assert (await c.post("/vertex", json={"instances": [full]})).status_code == 200
        refused = await c.post("/vertex", json={"instances": [full, {"inputs": "a"}]})
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"].startswith(
            f"batch size {MAX_TEXTS + 1} > maximum allowed batch size {MAX_TEXTS}: "
            f"`instances` has {MAX_TEXTS + 1} texts in all"
        )
        long = {"query": "q", "texts": ["a" * 400]}
        assert (await c.post("/vertex", json={"instances": [long, long]})).status_code == 200
        refused = await c.post("/vertex", json={"instances": [long, long, long]})
        assert refused.status_code == 413, refused.text
        assert "1,203 characters" in refused.json()["error"]


# ---------------------------------------------------------------------------------------------
# /decode


async def test_decode_round_trips_tokenize(client: httpx.AsyncClient, tokenizer: Any) -> None:
    texts = ["paris is the capital", "apple banana"]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    resp = await client.post("/decode", json={"ids": ids})
    assert resp.status_code == 200, resp.text
    assert resp.json() == texts
    one = await client.post("/decode", json={"ids": ids[0], "skip_special_tokens": False})
    assert one.json() == [tokenizer.decode(ids[0], skip_special_tokens=False)]
    assert one.json()[0].startswith("<s>")


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"ids": "abc"}, 422, "ids: Input should be a list of token ids"),
        ({"ids": [1, -2]}, 422, "ids: Input should be a list of token ids"),
        ({"ids": [[1], [1.5]]}, 422, "ids.1: Input should be a list of token ids"),
        ({"ids": [True]}, 422, "ids"),
        ({}, 422, "ids: Field required"),
        ({"ids": [[1]] * (MAX_TEXTS + 1)}, 422, f"maximum allowed batch size {MAX_TEXTS}"),
        # TEI's tokenizer refuses an empty sequence: 400 Empty ("`input_ids` cannot be empty").
        ({"ids": []}, 400, "`ids` cannot be empty"),
        ({"ids": [[1], []]}, 400, "`ids[1]` cannot be empty"),
    ],
)
async def test_decode_errors(
    client: httpx.AsyncClient, body: Any, status: int, needle: str
) -> None:
    resp = await client.post("/decode", json=body)
    assert resp.status_code == status, resp.text
    assert needle in resp.json()["error"]
    assert resp.json()["error_type"] == ("Empty" if status == 400 else "Validation")


async def test_tokenize_refuses_a_prompt_name(client: httpx.AsyncClient) -> None:
    resp = await client.post("/tokenize", json={"inputs": "a", "prompt_name": "query"})
    assert resp.status_code == 422 and "prompt_name" in resp.json()["error"]


# ---------------------------------------------------------------------------------------------
# Headers


_TEI_HEADERS = (
    "x-compute-type",
    "x-compute-time",
    "x-compute-characters",
    "x-compute-tokens",
    "x-total-time",
    "x-tokenization-time",
    "x-queue-time",
    "x-inference-time",
)


@pytest.mark.parametrize(
    ("path", "body", "characters"),
    [
        ("/rerank", {"query": "qq", "texts": ["abc", "défg"]}, 2 * 2 + 3 + 4),
        ("/", {"query": "qq", "texts": ["abc", "défg"]}, 2 * 2 + 3 + 4),
        ("/invocations", {"query": "qq", "texts": ["abc"]}, 2 + 3),
        ("/v2/rerank", {"query": "qq", "documents": ["abc", "défg"]}, 2 * 2 + 3 + 4),
        ("/v1/rerank", {"query": "qq", "documents": ["abc"]}, 2 + 3),
        ("/predict", {"inputs": "héllo"}, 5),
        ("/predict", {"inputs": [["ab"], ["cd", "efg"]]}, 2 + 2 + 3),
    ],
)
async def test_tei_headers_on_every_inference_route(
    client: httpx.AsyncClient, path: str, body: Any, characters: int
) -> None:
    resp = await client.post(path, json=body)
    assert resp.status_code == 200, resp.text
    for name in _TEI_HEADERS:
        assert name in resp.headers, name
    assert resp.headers["x-compute-type"] == "cpu"
    assert int(resp.headers["x-compute-characters"]) == characters  # Unicode characters
    assert resp.headers["x-total-time"] == resp.headers["x-compute-time"]
    for name in ("x-total-time", "x-tokenization-time", "x-queue-time", "x-inference-time"):
        assert int(resp.headers[name]) >= 0


# ---------------------------------------------------------------------------------------------
# API key, CORS, body limit


async def test_api_key_covers_the_new_routes(xlmr_reranker: Path, xlmr_engine: TorchEngine) -> None:
    async with serving(settings_for(xlmr_reranker, api_key=KEY), xlmr_engine) as c:
        for path in ("/", "/invocations", "/decode", *EMBEDDING_ROUTES, "/embeddings"):
            assert (await c.post(path, json={})).status_code == 401, path
        for path in ("/", "/ping"):  # probes stay open
            assert (await c.get(path)).status_code == 200, path
        auth = {"Authorization": f"Bearer {KEY}"}
        assert (await c.post("/decode", json={"ids": [5]}, headers=auth)).status_code == 200
        assert (await c.post("/embed", json={}, headers=auth)).status_code == 424
        # The schema stays open at both paths, as /openapi.json is.
        assert (await c.get("/api-doc/openapi.json")).status_code == 200


def _preflight(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }


async def test_cors_allows_any_origin_by_default(client: httpx.AsyncClient) -> None:
    resp = await client.options("/rerank", headers=_preflight("https://app.example"))
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] == "*"
    assert "POST" in resp.headers["access-control-allow-methods"]
    simple = await client.post(
        "/predict", json={"inputs": "a"}, headers={"Origin": "https://app.example"}
    )
    assert simple.headers["access-control-allow-origin"] == "*"


async def test_cors_allow_origin_list(xlmr_reranker: Path, xlmr_engine: TorchEngine) -> None:
    settings = settings_for(xlmr_reranker, cors_allow_origin=("https://a.example",))
    async with serving(settings, xlmr_engine) as c:
        ok = await c.options("/rerank", headers=_preflight("https://a.example"))
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://a.example"
        refused = await c.options("/rerank", headers=_preflight("https://evil.example"))
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers


async def test_body_over_the_payload_limit_is_a_counted_413(
    xlmr_reranker: Path, xlmr_engine: TorchEngine, caplog: pytest.LogCaptureFixture
) -> None:
    limit = 2_000
    async with serving(settings_for(xlmr_reranker, payload_limit=limit), xlmr_engine) as c:
        before = _http_counts((await c.get("/metrics")).text)
        fits = json.dumps(
            {"query": QUERY, "texts": ["a " * (limit // 2 - 100)], "truncate": True}
        ).encode()
        assert len(fits) <= limit
        assert (await c.post("/rerank", content=fits, headers=_JSON)).status_code == 200
        big = json.dumps({"query": QUERY, "texts": ["a" * limit]}).encode()

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
            for start in range(0, len(big), 500):
                yield big[start : start + 500]

        caplog.set_level(logging.INFO)
        caplog.clear()
        for path, content in (("/rerank", big), ("/rerank", chunked()), ("/", big)):
            resp = await c.post(path, content=content, headers=_JSON)
            assert resp.status_code == 413, (path, resp.text)
            assert resp.json()["error_type"] == "Validation"
            assert f"{limit}-byte limit" in resp.json()["error"]
            assert "--payload-limit" in resp.json()["error"]
        after = _http_counts((await c.get("/metrics")).text)
    moved = {key: n - before.get(key, 0.0) for key, n in after.items() if n != before.get(key)}
    assert moved == {
        ("/rerank", "200"): 1,
        ("/metrics", "200"): 1,
        ("/rerank", "413"): 2,
        ("/", "413"): 1,
    }
    # One access line each, at INFO, naming the limit; no traceback anywhere.
    lines = [
        r for r in caplog.records if r.name == "reranker_runtime.access" and "413" in r.msg % r.args
    ]
    assert len(lines) == 3
    assert all(
        r.levelno == logging.INFO and "limit" in str(r.__dict__["fields"].get("error"))
        for r in lines
    )
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_without_the_api_key_an_oversized_body_is_401_not_413(
    xlmr_reranker: Path, xlmr_engine: TorchEngine
) -> None:
    """The documented order: 401 first, whatever the caller sends; a caller without the key
    does not even learn the payload limit. With the key, the limit applies as before."""
    limit, key = 2_000, "s3cret"
    big = json.dumps({"query": QUERY, "texts": ["a" * limit]}).encode()
    settings = settings_for(xlmr_reranker, payload_limit=limit, api_key=key)
    async with serving(settings, xlmr_engine) as c:
        for auth in ({}, {"authorization": "Bearer wrong"}):
            resp = await c.post("/rerank", content=big, headers={**_JSON, **auth})
            assert resp.status_code == 401, (auth, resp.text)
            assert str(limit) not in resp.text
        authed = {**_JSON, "authorization": f"Bearer {key}"}
        resp = await c.post("/rerank", content=big, headers=authed)
        assert resp.status_code == 413 and f"{limit}-byte limit" in resp.json()["error"]


_JSON = {"content-type": "application/json"}


def _http_counts(text: str) -> dict[tuple[str, str], float]:
    """reranker_http_requests_total by (route, status)."""
    pattern = r'^reranker_http_requests_total\{route="([^"]*)",status="(\d+)"\} (\S+)$'
    return {(r, s): float(v) for r, s, v in re.findall(pattern, text, re.MULTILINE)}


async def test_framework_errors_are_counted_and_logged_as_what_they_are(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    caplog.clear()
    cases = (
        ("POST", "/rerank", b'{"query": ', 400),  # malformed JSON
        ("POST", "/rerank", b'{"query": 5, "texts": []}', 422),  # schema
        ("GET", "/rerank", b"", 405),
        ("POST", "/nope", b"{}", 404),
    )
    for method, path, content, status in cases:
        resp = await client.request(method, path, content=content, headers=_JSON)
        assert resp.status_code == status, (path, resp.text)
        assert set(resp.json()) == {"error", "error_type"}
    access = [r for r in caplog.records if r.name == "reranker_runtime.access"]
    assert [r.args[2] for r in access] == [400, 422, 405, 404]
    assert all(r.__dict__["fields"].get("error") for r in access)  # the reason, on the same line
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


# ---------------------------------------------------------------------------------------------
# --tokenization-workers


async def test_tokenization_runs_on_the_configured_workers(
    xlmr_reranker: Path, xlmr_engine: TorchEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: set[str] = set()
    encode = PairTokenizer.encode_pairs

    def spy(self: PairTokenizer, *args: Any, **kwargs: Any) -> Any:
        threads.add(threading.current_thread().name)
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(PairTokenizer, "encode_pairs", spy)
    async with serving(settings_for(xlmr_reranker, tokenization_workers=2), xlmr_engine) as c:
        assert (await c.get("/info")).json()["tokenization_workers"] == 2
        responses = await asyncio.gather(
            *(c.post("/rerank", json={"query": QUERY, "texts": TEXTS}) for _ in range(6))
        )
        assert all(r.status_code == 200 for r in responses)
    assert threads and all(name.startswith("tokenize") for name in threads)
    assert len(threads) <= 2


# ---------------------------------------------------------------------------------------------
# TEI's flags: names, TEI's variables, defaults


def _serve_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="reranker-runtime")
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


async def test_tei_flag_defaults_and_tei_variables() -> None:
    defaults = settings_from_args(_serve_args([]), environ={})
    assert (defaults.payload_limit, defaults.prometheus_port) == (2_000_000, 9000)  # TEI's
    assert defaults.cors_allow_origin is None and defaults.tokenization_workers is None
    tei_env = {
        "PAYLOAD_LIMIT": "3000000",
        "PROMETHEUS_PORT": "9200",
        "CORS_ALLOW_ORIGIN": "https://a.example",
        "HUGGINGFACE_HUB_CACHE": "/data/hub",
        "TOKENIZATION_WORKERS": "4",
    }
    from_tei = settings_from_args(_serve_args([]), environ=tei_env)
    assert (
        from_tei.payload_limit,
        from_tei.prometheus_port,
        from_tei.cors_allow_origin,
        from_tei.hf_cache,
        from_tei.tokenization_workers,
    ) == (3_000_000, 9200, ("https://a.example",), "/data/hub", 4)
    # Ours wins over TEI's variable; a flag wins over both; the CORS flag adds up.
    ours = settings_from_args(
        _serve_args(["--cors-allow-origin", "https://b.example,https://c.example"]),
        environ={**tei_env, "RERANKER_PAYLOAD_LIMIT": "10"},
    )
    assert ours.payload_limit == 10
    assert ours.cors_allow_origin == ("https://b.example", "https://c.example")
    repeated = settings_from_args(
        _serve_args(
            [
                *("--cors-allow-origin", "https://b.example"),
                *("--cors-allow-origin", "*"),
                *("--huggingface-hub-cache", "/x"),
            ]
        ),
        environ={},
    )
    assert repeated.cors_allow_origin == ("https://b.example", "*")
    assert repeated.hf_cache == "/x"


@pytest.mark.parametrize(
    ("argv", "why"),
    [(["--pooling", "cls"], "embedding model's pooling"),
     (["--pooling=mean"], "embedding model's pooling"),
     (["--default-prompt", "query: "], "prompt"),
     (["--default-prompt-name", "q"], "prompt"),
     (["--dense-path", "2_Dense"], "Dense layer"),
     (["--uds-path", "/tmp/s"], "Python backend")],
)  # fmt: skip
async def test_tei_flags_without_meaning_are_refused_saying_so(
    argv: list[str], why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A TEI command line moved over as it is: the embedding-only flags are refused naming the
    flag and why, where argparse alone says only 'unrecognized arguments'."""
    with pytest.raises(SystemExit) as exc:
        _serve_args(["--model", "m", *argv])
    assert exc.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    flag = argv[0].split("=")[0]
    assert error.startswith(f"reranker-runtime serve: error: {flag} is a TEI flag")
    assert why in error and error.endswith("remove it")
    # TEI's older name of --hf-token works; the embedding-only variables are reported, not fatal.
    assert settings_from_args(_serve_args(["--hf-api-token", "t"]), environ={}).hf_token == "t"
    env = {"POOLING": "cls", "DENSE_PATH": " ", "DEFAULT_PROMPT": "q: ", "MODEL_ID": "m"}
    assert ignored_tei_variables(env) == ["POOLING", "DEFAULT_PROMPT"]


async def test_bad_tei_variable_names_itself() -> None:
    with pytest.raises(SettingsError, match="PROMETHEUS_PORT='x'"):
        settings_from_args(_serve_args([]), environ={"PROMETHEUS_PORT": "x"})
    with pytest.raises(SystemExit):
        _serve_args(["--tokenization-workers", "0"])


async def test_hf_cache_is_where_huggingface_hub_downloads(tmp_path: Path) -> None:
    env: dict[str, str] = {}
    use_hub_settings(ServeSettings(hf_cache=str(tmp_path / "hub")), env)
    assert env == {"HF_HUB_CACHE": str(tmp_path / "hub")}
    # huggingface_hub reads it when imported, as `serve` imports it after use_hub_settings.
    probe = "import huggingface_hub.constants as c; print(c.HF_HUB_CACHE)"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip() == str(tmp_path / "hub")
    untouched: dict[str, str] = {}
    use_hub_settings(ServeSettings(), untouched)
    assert untouched == {}  # HF_HOME / HF_HUB_CACHE as the user set them
