"""The runtime under hostile input: huge texts cost what the model can use, bad text is a 422,
oversized requests a 413, the schema says what is enforced, and stalled connections are closed.

Tokenization is checked against whole-text tokenization (and transformers' own truncation); the
connection limits against a real uvicorn server on 127.0.0.1 configured exactly as `serve` does
(`server.uvicorn_config`), with raw sockets.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from tokenizers import Tokenizer

from reranker_runtime import text_bounds
from reranker_runtime.api.errors import http_error
from reranker_runtime.errors import ValidationError
from reranker_runtime.text_bounds import Direction, encode_bounded, encode_bounded_many
from reranker_runtime.tokenization import PairTokenizer
from runtime.api_support import (
    MAX_TEXTS,
    QUERY,
    TOL,
    serving,
    settings_for,
    sigmoid,
    truncated_reference,
)
from runtime.fakes import ControlledEngine
from runtime.live_server import live_server
from tiny_models import TINY_MAX_TOKENS

DIRECTIONS: tuple[Direction, ...] = ("right", "left")
WAIT_S = 30.0  # upper bound for any wait on the server (a failure, not a timing assertion)
WORDS = [
    "the",
    "a",
    "of",
    "paris",
    "france",
    "capital",
    "river",
    "deep",
    "learning",
    "model",
    "inference",
    "baseten",
    "gpu",
]


def _texts(rng: random.Random) -> Iterator[str]:
    """Texts of every shape that stresses a cut: words, no spaces at all (one huge pre-token),
    runs of whitespace, one word longer than WordPiece takes, CJK without spaces, punctuation."""
    yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(200, 1200)))
    yield "".join(rng.choice(WORDS) for _ in range(rng.randint(200, 800)))
    yield "  \n ".join(rng.choice(WORDS) for _ in range(rng.randint(200, 800)))
    yield "word " + "x" * rng.randint(200, 6000) + " tail" * rng.randint(0, 300)
    yield "".join(
        rng.choice("的一是不了人我在有他这中大来上个国") for _ in range(rng.randint(500, 3000))
    )
    yield " ".join(rng.choice(WORDS) + rng.choice(["", ",", ".", "!?"]) for _ in range(1000))


@pytest.mark.parametrize("model", ["xlmr_reranker", "bert_reranker"])
def test_cut_then_tokenized_equals_whole_text_tokenized(
    model: str, request: pytest.FixtureRequest
) -> None:
    """The cut never changes a token: the kept end of a bounded encoding is exactly the whole
    text's, for Unigram (XLM-R) and WordPiece (BERT), both directions, any bound."""
    tok = Tokenizer.from_file(str(request.getfixturevalue(model) / "tokenizer.json"))
    rng = random.Random(7)
    cases = 0
    for _ in range(4):
        for text in _texts(rng):
            whole = tok.encode(text, add_special_tokens=False).ids
            for max_tokens in (1, 5, TINY_MAX_TOKENS + 1, 600):
                for direction in DIRECTIONS:
                    bounded = encode_bounded(tok, text, max_tokens, direction)
                    if bounded.complete:
                        assert bounded.encoding.ids == whole
                    else:
                        kept = whole[:max_tokens] if direction == "right" else whole[-max_tokens:]
                        assert bounded.encoding.ids == kept, (direction, max_tokens, text[:80])
                    cases += 1
    assert cases == 4 * 6 * 4 * 2


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_texts_bounded_together_equal_each_bounded_alone(
    direction: Direction, xlmr_reranker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request's texts are tokenized in batches, in slices (short and long texts, settled
    after one piece or after several): each comes out exactly as when bounded on its own."""
    monkeypatch.setattr(text_bounds, "SLICE_CHARS", 2_000)  # several slices per round
    tok = Tokenizer.from_file(str(xlmr_reranker / "tokenizer.json"))
    rng = random.Random(11)
    texts = ["tiny", "a few short words", *(t for _ in range(3) for t in _texts(rng))]
    rng.shuffle(texts)
    wholes = [tok.encode(text, add_special_tokens=False) for text in texts]
    for max_tokens in (1, TINY_MAX_TOKENS + 1, 600):
        together = encode_bounded_many(tok, texts, max_tokens, direction)
        alone = [encode_bounded(tok, text, max_tokens, direction) for text in texts]
        assert [(b.encoding.ids, b.complete) for b in together] == [
            (b.encoding.ids, b.complete) for b in alone
        ]
        assert any(b.complete for b in together) and any(not b.complete for b in together)
        for bounded, whole, text in zip(together, wholes, texts, strict=True):
            # Each text's kept tokens are the whole text's; so are their offsets, except those
            # of a piece cut from the end (counted from the piece's start).
            if bounded.complete:
                kept = slice(None)
            elif direction == "right":
                kept = slice(None, max_tokens)
            else:
                kept = slice(-max_tokens, None)
            assert bounded.encoding.ids == whole.ids[kept], text[:40]
            if bounded.complete or direction == "right":
                assert bounded.encoding.offsets == whole.offsets[kept], text[:40]


class _BatchOnlyTokenizer:
    """The real tokenizer, except that `encode` (which holds the GIL for its whole run) fails."""

    def __init__(self, inner: Tokenizer) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("tokenized with encode(): holds the GIL, serialises requests")


def test_every_path_tokenizes_in_batches_that_release_the_gil(xlmr_engine: Any) -> None:
    """Requests are tokenized concurrently on a thread pool. That only works if no tokenizer
    call holds the GIL through a long text: `encode_batch` releases it, `encode` does not."""
    tokenizer = PairTokenizer(xlmr_engine.tokenizer, TINY_MAX_TOKENS)
    tokenizer._tok = cast(Tokenizer, _BatchOnlyTokenizer(tokenizer._tok))
    long_texts = [_words(5_000), _words(300), "short"]
    for truncate in (True, False):
        pairs = tokenizer.encode_pairs(QUERY, long_texts, truncate=truncate)
        assert [p.truncated for p in pairs] == [truncate, truncate, False]
    chunked = tokenizer.encode_chunked(QUERY, long_texts, truncate=True, max_windows=3)
    assert [len(c.windows) for c in chunked] == [3, 3, 1]
    inputs = tokenizer.encode_inputs([_words(5_000), (QUERY, _words(5_000))], truncate=True)
    assert all(e.truncated for e in inputs)
    tokens = tokenizer.tokens([_words(5_000), (QUERY, "short")])  # /tokenize
    assert [t.special for t in tokens[1]].count(True) >= 2


def _words(chars: int) -> str:
    """About `chars` characters of random words (a random block, repeated: generating millions of
    random words takes long on a loaded machine)."""
    rng = random.Random(0)
    block = " ".join(rng.choice(WORDS) for _ in range(5000)) + " "
    return (block * (chars // len(block) + 1))[:chars]


class _CountingTokenizer:
    """A tokenizer that records how many characters it was given to encode."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.sizes: list[int] = []

    def encode_batch(self, texts: list[str], **kwargs: Any) -> Any:
        self.sizes.extend(len(text) for text in texts)
        return self.inner.encode_batch(texts, **kwargs)


def test_a_huge_text_is_tokenized_only_as_far_as_the_window_needs(xlmr_reranker: Path) -> None:
    tok = _CountingTokenizer(Tokenizer.from_file(str(xlmr_reranker / "tokenizer.json")))
    huge = _words(10_000_000)
    for direction in DIRECTIONS:
        tok.sizes.clear()
        bounded = encode_bounded(cast(Tokenizer, tok), huge, TINY_MAX_TOKENS + 1, direction)
        assert not bounded.complete and len(bounded.encoding.ids) == TINY_MAX_TOKENS + 1
        assert sum(tok.sizes) < 20_000, tok.sizes  # characters tokenized, of 10 million


@pytest.mark.parametrize("side", DIRECTIONS)
def test_pair_truncation_matches_transformers_on_a_long_text(
    side: Direction, xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    """The pair the model sees equals transformers' own `truncation="only_second"` of the whole
    text, although only a piece of the text was tokenized."""
    from transformers import AutoTokenizer

    long_text = _words(200_000)
    hf = AutoTokenizer.from_pretrained(xlmr_reranker)
    hf.truncation_side = side
    expected = hf(QUERY, long_text, truncation="only_second", max_length=TINY_MAX_TOKENS)
    (encoded,) = PairTokenizer(xlmr_engine.tokenizer, TINY_MAX_TOKENS).encode_pairs(
        QUERY,
        [long_text],
        truncate=True,
        direction=side,
    )
    assert encoded.pair.input_ids == expected["input_ids"]
    assert encoded.truncated and not encoded.fully_counted


def test_tokenizer_failure_is_a_422_naming_the_text(xlmr_engine: Any) -> None:
    """Below the schema's check (embedders call the service directly): still never a 500."""
    tokenizer = PairTokenizer(xlmr_engine.tokenizer, TINY_MAX_TOKENS)
    with pytest.raises(ValidationError) as err:
        tokenizer.encode_pairs("q", ["fine", "bad \ud800"], truncate=True, texts_field="documents")
    assert http_error(err.value).status == 422
    assert err.value.message.startswith("`documents[1]` cannot be tokenized")
    with pytest.raises(ValidationError, match=r"`query` cannot be tokenized"):
        tokenizer.encode_pairs("\udfff", ["fine"], truncate=True)


# ------------------------------------------------------------------------------------ HTTP API


def _ten_megabytes() -> str:
    return _words(10_000_000)


def _end(text: str, side: str) -> str:
    """The kept end of a huge text, for the reference: transformers needs minutes for 10 MB.
    100,000 characters of words hold hundreds of times the window, so the reference's
    truncated pair is the whole text's (test_cut_then_tokenized_equals_... checks the rule)."""
    return text[:100_000] if side == "right" else text[-100_000:]


async def test_ten_megabyte_text_is_scored_as_its_window_and_refused_fast_without_truncation(
    xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    huge = _ten_megabytes()
    settings = settings_for(
        xlmr_reranker, max_request_characters=11_000_000, payload_limit=20_000_000
    )
    async with serving(settings, xlmr_engine) as client:
        for side in ("right", "left"):
            response = await client.post(
                "/rerank",
                json={
                    "query": QUERY,
                    "texts": [huge],
                    "truncate": True,
                    "truncation_direction": side,
                },
            )
            assert response.status_code == 200, response.text
            reference = sigmoid(truncated_reference(xlmr_reranker, QUERY, _end(huge, side), side))
            assert response.json()[0]["score"] == pytest.approx(reference, abs=TOL)
            assert int(response.headers["x-compute-tokens"]) == TINY_MAX_TOKENS

        refused = await client.post(
            "/rerank", json={"query": QUERY, "texts": ["paris", huge], "truncate": False}
        )
        assert refused.status_code == 422
        message = refused.json()["error"]
        match = re.fullmatch(
            r"`texts\[1\]`: query and text are at least (\d+) tokens long but the model accepts "
            rf"at most {TINY_MAX_TOKENS}; shorten it or set truncate=true",
            message,
        )
        assert match and int(match.group(1)) > TINY_MAX_TOKENS, message

        cohere = await client.post(
            "/v2/rerank", json={"query": QUERY, "documents": [huge, "paris"], "top_n": 2}
        )
        assert cohere.status_code == 200, cohere.text
        first = next(r for r in cohere.json()["results"] if r["index"] == 0)
        assert first["truncated"] is True
        reference = sigmoid(truncated_reference(xlmr_reranker, QUERY, huge[:100_000], "right"))
        assert first["relevance_score"] == pytest.approx(reference, abs=TOL)

        # max_tokens_per_doc cuts a document by its tokens: only its start is tokenized, and the
        # result is the same as for a document that is just that start.
        scores = []
        for document in (huge, huge[:100_000]):
            cut = await client.post(
                "/v2/rerank",
                json={"query": QUERY, "documents": [document], "max_tokens_per_doc": 20},
            )
            assert cut.status_code == 200, cut.text
            (result,) = cut.json()["results"]
            assert result["truncated"] is True
            scores.append(result["relevance_score"])
        assert scores[0] == pytest.approx(scores[1], abs=TOL)


async def test_ten_megabyte_text_chunked_costs_only_its_windows(
    xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    """With chunking, a text is tokenized as far as its windows reach: a 10 MB text scores as
    its first 100,000 characters do (hundreds of windows' worth), and without truncation it is
    refused at once with a true lower bound on the windows it needs."""
    huge = _ten_megabytes()
    settings = settings_for(
        xlmr_reranker, max_request_characters=11_000_000, payload_limit=20_000_000
    )
    async with serving(settings, xlmr_engine) as client:
        answers = []
        for text in (huge, huge[:100_000]):
            response = await client.post(
                "/rerank",
                json={"query": QUERY, "texts": [text], "truncate": True, "max_chunks_per_doc": 3},
            )
            assert response.status_code == 200, response.text
            answers.append(response.json()[0])
        assert answers[0]["chunks"] == answers[1]["chunks"] == 3
        assert answers[0]["score"] == pytest.approx(answers[1]["score"], abs=TOL)

        refused = await client.post(
            "/rerank",
            json={"query": QUERY, "texts": [huge], "max_chunks_per_doc": 3, "truncate": False},
        )
        assert refused.status_code == 413, refused.text
        assert re.match(
            r"`texts\[0\]` needs at least 4 windows of up to \d+ text tokens",
            refused.json()["error"],
        )


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/rerank", {"query": "q", "texts": ["a" * 600, "b" * 500]}),
        ("/predict", {"inputs": [["q" * 500, "a" * 600]]}),
        ("/tokenize", {"inputs": ["a" * 1001]}),
        ("/v2/rerank", {"query": "q" * 1000, "documents": ["a"]}),
        ("/v1/rerank", {"query": "q", "documents": [{"text": "a" * 1000}]}),
    ],
)
async def test_request_over_the_character_cap_is_413_naming_the_limit(
    path: str, body: dict[str, Any], xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    settings = settings_for(xlmr_reranker, max_request_characters=1000)
    async with serving(settings, xlmr_engine) as client:
        response = await client.post(path, json=body)
        assert response.status_code == 413, response.text
        error = response.json()
        assert error["error_type"] == "Validation"
        assert "at most 1,000 per request" in error["error"]
        assert "--max-request-characters (RERANKER_MAX_REQUEST_CHARACTERS)" in error["error"]
        # At the cap exactly, the same route answers.
        ok = await client.post(
            "/rerank", json={"query": "q", "texts": ["a" * 999], "truncate": True}
        )
        assert ok.status_code == 200, ok.text


LONE_SURROGATE = [
    ("/rerank", '{"query": "\\ud800", "texts": ["a"]}', "query"),
    ("/rerank", '{"query": "q", "texts": ["a", "b\\udfff"]}', "texts.1"),
    ("/predict", '{"inputs": "\\ud800"}', "inputs"),
    ("/predict", '{"inputs": ["a", "\\ud800"]}', "inputs.1"),
    ("/predict", '{"inputs": [["a", "\\ud800"], "b"]}', "inputs.0.1"),
    ("/tokenize", '{"inputs": ["a", "\\ud800"]}', "inputs.1"),
    ("/tokenize", '{"inputs": "x\\udbff"}', "inputs"),
    ("/v2/rerank", '{"query": "q", "documents": ["x", "\\ud800"]}', "documents.1"),
    ("/v1/rerank", '{"query": "q", "documents": [{"text": "\\ud800"}]}', "documents.0.text"),
    ("/v1/rerank", '{"model": "\\ud800", "query": "q", "documents": ["x"]}', "model"),
]


async def test_lone_surrogates_are_a_422_naming_the_field(
    xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    async with serving(settings_for(xlmr_reranker), xlmr_engine) as client:
        for path, body, field in LONE_SURROGATE:
            response = await client.post(
                path, content=body, headers={"content-type": "application/json"}
            )
            assert response.status_code == 422, (path, body, response.text)
            error = response.json()
            assert error["error_type"] == "Validation"
            assert error["error"].startswith(f"{field}: Input should be valid Unicode text"), error


async def test_schema_publishes_the_limits_the_server_enforces(
    xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    async with serving(settings_for(xlmr_reranker), xlmr_engine) as client:
        schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
        rerank = schemas["RerankRequest"]["properties"]
        assert rerank["query"]["minLength"] == 1 and rerank["query"]["pattern"] == r"\S"
        assert rerank["texts"]["minItems"] == 1 and rerank["texts"]["maxItems"] == MAX_TEXTS
        assert rerank["texts"]["items"]["minLength"] == 1
        for name in ("CohereRerankRequest", "JinaRerankRequest"):
            documents = schemas[name]["properties"]["documents"]
            assert (documents["minItems"], documents["maxItems"]) == (1, MAX_TEXTS)
        batch = schemas["PredictRequest"]["properties"]["inputs"]["oneOf"][2]
        assert (batch["minItems"], batch["maxItems"]) == (1, MAX_TEXTS)
        assert "x-max-client-batch-size" not in json.dumps(schemas)

        # What the schema says is refused, is.
        assert (await client.post("/rerank", json={"query": "", "texts": ["a"]})).status_code == 400
        assert (await client.post("/rerank", json={"query": "q", "texts": []})).status_code == 400
        too_many = {"query": "q", "texts": ["a"] * (MAX_TEXTS + 1)}
        assert (await client.post("/rerank", json=too_many)).status_code == 422


async def test_no_redirect_reflects_the_host_header(xlmr_reranker: Path, xlmr_engine: Any) -> None:
    async with serving(settings_for(xlmr_reranker), xlmr_engine) as client:
        response = await client.post(
            "/rerank/", json={"query": "q", "texts": ["a"]}, headers={"host": "evil.example"}
        )
        assert response.status_code == 404
        assert "location" not in response.headers


# ---------------------------------------------------------------------------- connections


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by WAIT_S)."""
    sock.settimeout(WAIT_S)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture(scope="module")
def guarded_server(xlmr_reranker: Path, xlmr_engine: Any) -> Iterator[tuple[str, int, Any]]:
    engine = ControlledEngine(xlmr_engine)
    settings = settings_for(xlmr_reranker, request_read_timeout=0.5, max_connections=4)
    with live_server(settings, engine) as url:
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port), engine


def test_stalled_headers_get_408_and_the_connection_closed(guarded_server: Any) -> None:
    host, port, _ = guarded_server
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        reply = _read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), reply
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert body["error_type"] == "Timeout" and "--request-read-timeout" in body["error"]


def test_a_silent_connection_is_closed_without_an_answer(guarded_server: Any) -> None:
    host, port, _ = guarded_server
    with socket.create_connection((host, port)) as sock:
        assert _read_until_closed(sock) == b""


def test_a_stalled_body_gets_408_and_the_connection_closed(guarded_server: Any) -> None:
    host, port, _ = guarded_server
    with socket.create_connection((host, port)) as sock:
        sock.sendall(
            b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"query": "q", '
        )
        reply = _read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), reply
    assert reply.count(b"HTTP/1.1") == 1  # the application's own answer was dropped


def test_a_body_that_breaks_http_part_way_is_counted_as_the_400_it_got(
    guarded_server: Any,
) -> None:
    host, port, _ = guarded_server
    url = f"http://{host}:{port}"

    def count() -> float:
        text = httpx.get(f"{url}/metrics").text
        pattern = r'^reranker_http_requests_total\{route="/rerank",status="(\d+)"\} (\S+)$'
        return {s: float(v) for s, v in re.findall(pattern, text, re.MULTILINE)}

    before = count()
    with socket.create_connection((host, port)) as sock:
        sock.sendall(
            b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"que\r\nZZ\r\n'
        )
        reply = _read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n"), reply
    after = count()
    moved = {s: n - before.get(s, 0.0) for s, n in after.items() if n != before.get(s, 0.0)}
    assert moved == {"400": 1}, moved


def test_headers_dripped_byte_by_byte_do_not_keep_a_connection(guarded_server: Any) -> None:
    """The deadline counts from the request's first byte, not from the last one."""
    host, port, _ = guarded_server
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 1000
    reply = b""
    with socket.create_connection((host, port)) as sock:
        for byte in request:  # 1,000+ bytes, one per 20 ms: 20 s, 40x the deadline
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            readable, _, _ = select.select([sock], [], [], 0.02)
            if readable:  # the server spoke (or closed): read what it had to say
                reply = _read_until_closed(sock)
                break
    assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), reply


def test_kept_alive_and_slow_to_answer_requests_are_not_cut(guarded_server: Any) -> None:
    """Idle time between requests and the server's own time answering do not count."""
    host, port, engine = guarded_server
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=WAIT_S) as client:
        assert client.get("/health").status_code == 200
        time.sleep(1.0)  # idle on the kept-alive connection, twice the read deadline
        engine.hold()
        try:
            result: dict[str, Any] = {}

            def call() -> None:
                result["response"] = client.post("/rerank", json={"query": QUERY, "texts": ["a"]})

            caller = threading.Thread(target=call)
            caller.start()
            asyncio.run(engine.wait_for_calls(engine.arrived + 1))
            time.sleep(1.0)  # the forward pass is held for twice the read deadline
        finally:
            engine.release()
        caller.join(timeout=WAIT_S)
        assert result["response"].status_code == 200


def test_connections_beyond_the_cap_get_503_and_are_closed(guarded_server: Any) -> None:
    host, port, _ = guarded_server
    held = [socket.create_connection((host, port)) for _ in range(4)]
    try:
        # Make sure the server has accepted the four before the fifth arrives.
        for sock in held:
            sock.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        with socket.create_connection((host, port)) as extra:
            reply = _read_until_closed(extra)
        assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), reply
        assert b"retry-after: 1" in reply.lower() and b"--max-connections" in reply
    finally:
        for sock in held:
            sock.close()
    # Once they are gone, new connections are served again.
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            response = httpx.get(f"http://{host}:{port}/live", timeout=WAIT_S)
            if response.status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.05)
    metrics = httpx.get(f"http://{host}:{port}/metrics", timeout=WAIT_S).text
    refused = re.search(r"^reranker_http_connections_refused_total (\S+)$", metrics, re.M)
    assert refused and float(refused.group(1)) >= 1
    timeouts = re.search(r"^reranker_http_read_timeouts_total (\S+)$", metrics, re.M)
    assert timeouts is not None


# ----------------------------------------------------------------- refusals counted as sent


def _count(url: str, route: str, status: int) -> float:
    text = httpx.get(f"{url}/metrics", timeout=WAIT_S).text
    pattern = (
        rf'^reranker_http_requests_total\{{route="{re.escape(route)}",status="{status}"\}} (\S+)$'
    )
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else 0.0


def _raw_exchange(host: str, port: int, data: bytes, then_close: bool = False) -> bytes:
    with socket.create_connection((host, port)) as sock:
        sock.sendall(data)
        if then_close:
            return b""
        return _read_until_closed(sock)


def test_refusals_are_counted_and_logged_as_what_the_client_got(
    guarded_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """413 for a body over the limit, 400 for malformed JSON, 408 for a stalled body, 499 for a
    client that left mid-body, 400 for bytes that are not HTTP: each counted in
    reranker_http_requests_total with the status the client got, logged in one line, no
    traceback."""
    host, port, _ = guarded_server
    url = f"http://{host}:{port}"
    head = (
        b"POST /rerank HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\n"
    )
    cases = [
        (413, head + b"Content-Length: 70000000\r\n\r\n" + b'{"query": ', False),
        (400, head + b"Content-Length: 10\r\n\r\n" + b'{"query": ', False),
        (408, head + b"Content-Length: 100\r\n\r\n" + b'{"query": ', False),
        (499, head + b"Content-Length: 100\r\n\r\n" + b'{"query": ', True),
    ]
    for status, request, leave in cases:
        before = _count(url, "/rerank", status)
        reply = _raw_exchange(host, port, request, then_close=leave)
        if not leave:
            assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply
            body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
            assert set(body) == {"error", "error_type"}, body
        deadline = time.monotonic() + WAIT_S
        while _count(url, "/rerank", status) != before + 1:
            assert time.monotonic() < deadline, f"the request was never counted as {status}"
            time.sleep(0.05)

    assert _raw_exchange(host, port, b"NOT HTTP AT ALL\r\n\r\n").startswith(
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json"
    )
    assert not [r for r in caplog.records if r.exc_info], "a refusal logged a traceback"
    assert not [r for r in caplog.records if r.levelno >= 40], "a refusal logged an error"


def test_head_on_a_get_route_answers_as_get_without_the_body(
    xlmr_reranker: Path, xlmr_engine: Any
) -> None:
    """Monitors often probe with HEAD; RFC 9110 asks every server to take it on GET routes,
    and TEI's router does. Over real HTTP (uvicorn's h11), so the body rules are the real ones."""
    with (
        live_server(settings_for(xlmr_reranker), ControlledEngine(xlmr_engine)) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        for path in ("/health", "/live", "/ping", "/info", "/metrics", "/", "/openapi.json"):
            got, head = client.get(path), client.head(path)
            assert (head.status_code, got.status_code) == (200, 200), path
            assert head.content == b"", path
            assert head.headers["content-type"] == got.headers["content-type"], path
        health = client.get("/health")
        assert client.head("/health").headers["content-length"] == str(len(health.content))
        assert client.head("/rerank").status_code == 405  # POST routes stay POST
        wrong = client.post("/health")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, HEAD"
        assert client.head("/no-such-route").status_code == 404
        assert client.get("/health").status_code == 200  # the connection is still good
