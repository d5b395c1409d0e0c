"""Long texts scored as windows (`max_chunks_per_doc`): the windows' layout, the score as the max
over windows against the fp32 reference, truncation, the 413 limits, usage, and the routes'
response fields (/rerank, /v2/rerank, /v1/rerank) over HTTP.

The reference builds each window's token ids itself (plain slicing of the text's tokens, special
tokens placed by hand) and runs the Hugging Face model on each window alone."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from reranker_runtime.api.errors import client_message, http_error
from reranker_runtime.cli import build_parser
from reranker_runtime.config import ServeSettings
from reranker_runtime.engines.base import Engine
from reranker_runtime.errors import (
    InputTooLongError,
    ModelLoadError,
    TooManyChunksPerRequestError,
    TooManyChunksPerTextError,
)
from reranker_runtime.server import SettingsError, settings_from_args
from reranker_runtime.service import RerankService
from reranker_runtime.tokenization import PairTokenizer
from runtime.api_support import serving as serving_http
from runtime.api_support import settings_for
from tiny_models import TINY_MAX_TOKENS, corpus

SCORE_TOL = 1e-5
LOGIT_TOL = 1e-4
OVERLAP = 16
QUERY = "what is the capital of france"


def sigmoid(x: Any) -> Any:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def long_texts(kind: str) -> list[str]:
    """Texts of a few windows each (the BERT test tokenizer makes fewer tokens per sentence)."""
    n = 6 if kind == "xlmr" else 24
    return [" ".join(corpus(n, seed=seed)) for seed in (7, 8, 9)]


@asynccontextmanager
async def serving(engine: Engine, **overrides: Any) -> AsyncIterator[RerankService]:
    values: dict[str, Any] = dict(
        device="cpu",
        dtype="float32",
        max_batch_tokens=1024,
        max_client_batch_size=64,
        chunk_overlap_tokens=OVERLAP,
    )
    values.update(overrides)
    service = RerankService(engine, ServeSettings(**values))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


# ------------------------------------------------------------------ independent reference


def reference_windows(
    tokenizer: Any, query: str, text: str, overlap: int, direction: str = "right"
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, token_type_ids) of every window of `text`, built by hand: windows of W text
    tokens (what the model's length leaves next to the query), consecutive ones sharing
    `overlap`, laid from the start (right) or the end (left); the last one may be shorter."""
    q = tokenizer(query, add_special_tokens=False)["input_ids"]
    t = tokenizer(text, add_special_tokens=False)["input_ids"]
    xlmr = tokenizer.cls_token == "<s>"
    middle = [tokenizer.sep_token_id] * (
        2 if xlmr else 1
    )  # <s> q </s></s> t </s> | [CLS] q [SEP] t [SEP]
    width = TINY_MAX_TOKENS - len(q) - len(middle) - 2
    step = width - overlap
    if direction == "right":
        starts = [0]
        while starts[-1] + width < len(t):
            starts.append(starts[-1] + step)
        spans = [(s, min(len(t), s + width)) for s in starts]
    else:
        ends = [len(t)]
        while ends[-1] - width > 0:
            ends.append(ends[-1] - step)
        spans = [(max(0, e - width), e) for e in ends]
    out = []
    for a, b in spans:
        head = [tokenizer.cls_token_id, *q, *middle]
        tail = [*t[a:b], tokenizer.sep_token_id]
        out.append((head + tail, [0] * len(head) + [1] * len(tail)))
    return out


@functools.cache
def _reference_model(model_dir: Path) -> Any:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        model_dir, torch_dtype=torch.float32
    ).eval()


def reference_window_logits(
    model_dir: Path, windows: list[tuple[list[int], list[int]]], token_types: bool
) -> list[float]:
    """fp32 logit of each window alone (no padding, no batching)."""
    model = _reference_model(model_dir)
    out = []
    with torch.inference_mode():
        for ids, types in windows:
            inputs = {"input_ids": torch.tensor([ids])}
            if token_types:
                inputs["token_type_ids"] = torch.tensor([types])
            out.append(float(model(**inputs).logits[0, 0]))
    return out


# ---------------------------------------------------------------------------- the windows


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
@pytest.mark.parametrize("direction", ["right", "left"])
def test_windows_are_slices_of_the_text_with_the_whole_query(
    kind: str, direction: str, xlmr_engine, bert_engine
) -> None:
    engine = xlmr_engine if kind == "xlmr" else bert_engine
    tok = engine.tokenizer
    pt = PairTokenizer(tok, TINY_MAX_TOKENS)
    texts = long_texts(kind)
    chunked = pt.encode_chunked(
        QUERY, texts, truncate=False, direction=direction, max_windows=100, overlap=OVERLAP
    )
    for text, c in zip(texts, chunked, strict=True):
        expected = reference_windows(tok, QUERY, text, OVERLAP, direction)
        assert len(expected) > 1  # really a long text
        assert [w.pair.input_ids for w in c.windows] == [ids for ids, _ in expected]
        if kind == "bert":
            assert [w.pair.token_type_ids for w in c.windows] == [tt for _, tt in expected]
        assert all(w.num_tokens <= TINY_MAX_TOKENS for w in c.windows)
        assert c.needed_windows == len(expected) and not c.truncated
        assert c.num_tokens == sum(len(ids) for ids, _ in expected)


def test_short_text_and_one_window_are_unchanged(xlmr_engine) -> None:
    tok = xlmr_engine.tokenizer
    pt = PairTokenizer(tok, TINY_MAX_TOKENS)
    text = long_texts("xlmr")[0]
    # A text that fits is one window, exactly tokenizer(query, text).
    (short,) = pt.encode_chunked(QUERY, ["paris"], truncate=False, max_windows=4, overlap=OVERLAP)
    assert [w.pair.input_ids for w in short.windows] == [tok(QUERY, "paris")["input_ids"]]
    # max_windows=1 is exactly encode_pairs (today's truncation).
    (one,) = pt.encode_chunked(QUERY, [text], truncate=True, max_windows=1, overlap=OVERLAP)
    (pair,) = pt.encode_pairs(QUERY, [text], truncate=True)
    assert [w.pair for w in one.windows] == [pair.pair] and one.truncated
    # A query that leaves no room for text: one window, cut by today's rule.
    query = " ".join(corpus(40, seed=3))
    (alone,) = pt.encode_chunked(query, [text], truncate=True, max_windows=4, overlap=OVERLAP)
    (cut,) = pt.encode_pairs(query, [text], truncate=True)
    assert [w.pair for w in alone.windows] == [cut.pair] and alone.truncated


def test_windows_beyond_the_limit_are_not_built(xlmr_engine) -> None:
    tok = xlmr_engine.tokenizer
    pt = PairTokenizer(tok, TINY_MAX_TOKENS)
    text = long_texts("xlmr")[0]
    expected = reference_windows(tok, QUERY, text, OVERLAP)
    (c,) = pt.encode_chunked(QUERY, [text], truncate=True, max_windows=2, overlap=OVERLAP)
    assert [w.pair.input_ids for w in c.windows] == [ids for ids, _ in expected[:2]]
    assert c.truncated and c.needed_windows == len(expected)


def test_overlap_is_at_most_half_a_window(xlmr_engine) -> None:
    """A long query leaves a small window; the overlap shrinks to half of it."""
    tok = xlmr_engine.tokenizer
    pt = PairTokenizer(tok, TINY_MAX_TOKENS)
    words = " ".join(corpus(20, seed=1)).split()
    for n in range(1, len(words)):
        query = " ".join(words[:n])
        width = TINY_MAX_TOKENS - 4 - len(tok(query, add_special_tokens=False)["input_ids"])
        if width <= 40:
            break
    assert 0 < width <= 40 < 100
    (c,) = pt.encode_chunked(
        query, [long_texts("xlmr")[0]], truncate=False, max_windows=100, overlap=100
    )
    assert [w.pair.input_ids for w in c.windows] == [
        ids for ids, _ in reference_windows(tok, query, long_texts("xlmr")[0], width // 2)
    ]


# --------------------------------------------------------------------- scores (service)


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
async def test_score_is_the_max_over_windows(
    kind: str, xlmr_engine, bert_engine, xlmr_reranker: Path, bert_reranker: Path
) -> None:
    engine, model_dir = (
        (xlmr_engine, xlmr_reranker) if kind == "xlmr" else (bert_engine, bert_reranker)
    )
    texts = [*long_texts(kind), "paris is the capital city of france"]
    async with serving(engine, max_chunks_per_doc=100) as service:
        result = await service.rerank(QUERY, texts, truncate=False)
        raw = await service.rerank(QUERY, texts, truncate=False, raw_scores=True)
    best, firsts, counts, tokens = [], [], [], []
    for text in texts:
        windows = reference_windows(engine.tokenizer, QUERY, text, OVERLAP)
        logits = reference_window_logits(model_dir, windows, token_types=kind == "bert")
        best.append(max(logits))
        firsts.append(logits[0])
        counts.append(len(windows))
        tokens.append(sum(len(ids) for ids, _ in windows))
    np.testing.assert_allclose(raw.scores, best, atol=LOGIT_TOL, rtol=0)
    np.testing.assert_allclose(result.scores, sigmoid(best), atol=SCORE_TOL, rtol=0)
    assert best != firsts  # the max matters: some text's best window is not its first
    assert result.chunks == counts and counts[-1] == 1 and min(counts[:-1]) > 1
    assert result.token_counts == tokens and result.total_tokens == sum(tokens)
    assert result.truncated == [False] * len(texts)
    assert result.ranking() == sorted(range(len(texts)), key=lambda i: -best[i])


async def test_truncation_scores_the_first_windows_only(xlmr_engine, xlmr_reranker: Path) -> None:
    text = long_texts("xlmr")[0]
    windows = reference_windows(xlmr_engine.tokenizer, QUERY, text, OVERLAP)
    assert len(windows) > 2
    logits = reference_window_logits(xlmr_reranker, windows[:2], token_types=False)
    async with serving(xlmr_engine, max_chunks_per_doc=2) as service:
        result = await service.rerank(QUERY, [text], truncate=True, raw_scores=True)
        with pytest.raises(TooManyChunksPerTextError) as err:
            await service.rerank(QUERY, ["paris", text], truncate=False)
    assert result.scores[0] == pytest.approx(max(logits), abs=LOGIT_TOL)
    assert result.chunks == [2] and result.truncated == [True]
    assert result.total_tokens == sum(len(ids) for ids, _ in windows[:2])
    assert http_error(err.value).status == 413
    width = (
        TINY_MAX_TOKENS
        - 4
        - len(xlmr_engine.tokenizer(QUERY, add_special_tokens=False)["input_ids"])
    )
    assert client_message(err.value) == (
        f"`texts[1]` needs {len(windows)} windows of up to {width} text tokens to be scored whole, "
        "but at most 2 windows per text are scored (max_chunks_per_doc); send a larger "
        "max_chunks_per_doc (server default: --max-chunks-per-doc) or set truncate=true to score "
        "only the first windows"
    )


async def test_request_parameter_overrides_the_server_default(xlmr_engine) -> None:
    text = long_texts("xlmr")[0]
    async with serving(xlmr_engine, max_chunks_per_doc=3, auto_truncate=True) as service:
        default = await service.rerank(QUERY, [text], truncate=None)
        one = await service.rerank(QUERY, [text], truncate=None, max_chunks_per_text=1)
        many = await service.rerank(QUERY, [text], truncate=None, max_chunks_per_text=50)
    assert default.chunks == [3] and default.truncated == [True]  # auto-truncate applies
    assert one.chunks == [1] and one.truncated == [True]
    assert many.chunks[0] > 3 and many.truncated == [False]


async def test_one_window_keeps_todays_422(xlmr_engine) -> None:
    async with serving(xlmr_engine) as service:  # --max-chunks-per-doc 1 (the default)
        with pytest.raises(InputTooLongError):
            await service.rerank(QUERY, [long_texts("xlmr")[0]], truncate=False)


async def test_a_query_that_leaves_no_room_says_chunking_cannot_help(xlmr_engine) -> None:
    long_query = long_texts("xlmr")[0]  # longer than the model's window on its own
    async with serving(xlmr_engine) as service:
        with pytest.raises(InputTooLongError) as err:
            await service.rerank(long_query, ["paris"], truncate=False, max_chunks_per_text=50)
        assert client_message(err.value).startswith(
            f"`query` leaves no room for text within the model's {TINY_MAX_TOKENS} tokens, so "
            "max_chunks_per_doc cannot split `texts[0]` into windows"
        )
        cut = await service.rerank(long_query, ["paris"], truncate=True, max_chunks_per_text=50)
        assert cut.chunks == [1] and cut.truncated == [True]


async def test_windows_per_request_are_capped(xlmr_engine) -> None:
    texts = long_texts("xlmr")
    async with serving(xlmr_engine, max_chunks_per_doc=100, max_chunks_per_request=6) as service:
        with pytest.raises(TooManyChunksPerRequestError) as err:
            await service.rerank(QUERY, texts, truncate=True)
        # Without chunking the cap does not apply (a request is bounded by its texts then).
        plain = await service.rerank(QUERY, texts * 3, truncate=True, max_chunks_per_text=1)
    assert len(plain.scores) == 9
    assert http_error(err.value).status == 413
    message = client_message(err.value)
    assert message.startswith(f"the 3 `texts` of this request make {err.value.windows} windows")
    assert "at most 6 per request" in message
    assert "--max-chunks-per-request (RERANKER_MAX_CHUNKS_PER_REQUEST)" in message


async def test_overlap_must_leave_room_in_a_window(xlmr_engine) -> None:
    service = RerankService(
        xlmr_engine,
        ServeSettings(device="cpu", max_batch_tokens=1024, chunk_overlap_tokens=TINY_MAX_TOKENS),
    )
    with pytest.raises(ModelLoadError, match="lower --chunk-overlap-tokens"):
        await service.start()


def test_flags_and_variables() -> None:
    args = build_parser().parse_args(
        ["serve", "--max-chunks-per-doc", "4", "--chunk-overlap-tokens", "0"]
    )
    env = {"RERANKER_MAX_CHUNKS_PER_REQUEST": "100", "RERANKER_REQUEST_TIMEOUT": "2.5"}
    settings = settings_from_args(args, env)
    assert (settings.max_chunks_per_doc, settings.chunk_overlap_tokens) == (4, 0)
    assert (settings.max_chunks_per_request, settings.request_timeout) == (100, 2.5)
    bare = build_parser().parse_args(["serve"])
    assert settings_from_args(bare, {}).request_timeout is None
    with pytest.raises(SettingsError, match="RERANKER_REQUEST_TIMEOUT='0' is invalid"):
        settings_from_args(bare, {"RERANKER_REQUEST_TIMEOUT": "0"})


# ------------------------------------------------------------------------------ over HTTP


async def test_routes_report_windows_and_usage(xlmr_reranker: Path, xlmr_engine) -> None:
    tok = xlmr_engine.tokenizer
    texts = [*long_texts("xlmr"), "paris is the capital city of france"]
    windows = [reference_windows(tok, QUERY, t, OVERLAP) for t in texts]
    counts = [len(w) for w in windows]
    tokens = sum(len(ids) for w in windows for ids, _ in w)
    logits = [max(reference_window_logits(xlmr_reranker, w, token_types=False)) for w in windows]
    order = sorted(range(len(texts)), key=lambda i: -logits[i])
    settings = settings_for(xlmr_reranker, chunk_overlap_tokens=OVERLAP)
    async with serving_http(settings, xlmr_engine) as client:
        # /rerank without chunking: TEI's body exactly, long texts refused as today.
        plain = await client.post("/rerank", json={"query": QUERY, "texts": texts[-1:]})
        assert plain.status_code == 200 and set(plain.json()[0]) == {"index", "score"}
        refused = await client.post(
            "/rerank", json={"query": QUERY, "texts": texts, "truncate": False}
        )
        assert refused.status_code == 422

        resp = await client.post(
            "/rerank", json={"query": QUERY, "texts": texts, "max_chunks_per_doc": 10}
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert [item["index"] for item in body] == order
        for item in body:
            assert set(item) == {"index", "score", "chunks", "truncated"}
            assert item["chunks"] == counts[item["index"]] and item["truncated"] is False
            assert item["score"] == pytest.approx(
                float(sigmoid(logits[item["index"]])), abs=SCORE_TOL
            )
        assert int(resp.headers["x-compute-tokens"]) == tokens

        too_many = await client.post(
            "/rerank",
            json={"query": QUERY, "texts": texts, "max_chunks_per_doc": 2, "truncate": False},
        )
        assert too_many.status_code == 413, too_many.text
        assert too_many.json()["error_type"] == "Validation"
        assert "max_chunks_per_doc" in too_many.json()["error"]
        cut = await client.post(
            "/rerank",
            json={"query": QUERY, "texts": texts, "max_chunks_per_doc": 2, "truncate": True},
        )
        assert cut.status_code == 200, cut.text
        for item in cut.json():
            assert item["chunks"] == min(counts[item["index"]], 2)
            assert item["truncated"] is (counts[item["index"]] > 2)
        bad = await client.post(
            "/rerank", json={"query": QUERY, "texts": texts, "max_chunks_per_doc": 0}
        )
        assert bad.status_code == 422 and "max_chunks_per_doc" in bad.json()["error"]

        v2 = await client.post(
            "/v2/rerank",
            json={"query": QUERY, "documents": texts, "max_chunks_per_doc": 10, "top_n": 2},
        )
        assert v2.status_code == 200, v2.text
        results = v2.json()["results"]
        assert [r["index"] for r in results] == order[:2]
        assert [r["chunks"] for r in results] == [counts[i] for i in order[:2]]
        assert all(r["truncated"] is False for r in results)
        assert v2.json()["meta"]["tokens"]["input_tokens"] == tokens

        # Cohere/Jina always truncate: windows beyond the limit are dropped and marked.
        v1 = await client.post(
            "/v1/rerank", json={"query": QUERY, "documents": texts, "max_chunks_per_doc": 2}
        )
        assert v1.status_code == 200, v1.text
        by_index = {r["index"]: r for r in v1.json()["results"]}
        for i, n in enumerate(counts):
            assert by_index[i]["chunks"] == min(n, 2)
            assert by_index[i]["truncated"] is (n > 2)
        kept = sum(len(ids) for w in windows for ids, _ in w[:2])
        assert v1.json()["usage"]["total_tokens"] == kept
        # Not asked for: one window, as before (and `chunks` still says so).
        v1_plain = await client.post("/v1/rerank", json={"query": QUERY, "documents": texts})
        assert all(r["chunks"] == 1 for r in v1_plain.json()["results"])


async def test_server_default_turns_chunking_on(xlmr_reranker: Path, xlmr_engine) -> None:
    texts = long_texts("xlmr")[:1]
    windows = len(reference_windows(xlmr_engine.tokenizer, QUERY, texts[0], OVERLAP))
    settings = settings_for(
        xlmr_reranker,
        chunk_overlap_tokens=OVERLAP,
        max_chunks_per_doc=100,
        max_chunks_per_request=windows,
    )
    async with serving_http(settings, xlmr_engine) as client:
        resp = await client.post("/rerank", json={"query": QUERY, "texts": texts})
        assert resp.status_code == 200, resp.text
        assert resp.json()[0]["chunks"] == windows > 1
        # A request may turn it off again, and the per-request cap answers 413 naming the flag.
        one = await client.post(
            "/rerank",
            json={"query": QUERY, "texts": texts, "max_chunks_per_doc": 1, "truncate": True},
        )
        assert "chunks" not in one.json()[0]
        capped = await client.post("/rerank", json={"query": QUERY, "texts": long_texts("xlmr")})
        assert capped.status_code == 413
        assert "--max-chunks-per-request" in capped.json()["error"]


@pytest.mark.parametrize(
    ("chunks_per_doc", "per_request", "warned"),
    [(3, 100, True), (3, 5000, False), (1, 100, False)],
)
async def test_a_window_cap_below_the_client_batch_size_is_warned_at_start(
    xlmr_engine,
    caplog: pytest.LogCaptureFixture,
    chunks_per_doc: int,
    per_request: int,
    warned: bool,
) -> None:
    """Chunking on by default counts every text as a window: a cap below the client batch size
    would refuse plain requests, so the start-up log says so."""
    with caplog.at_level(logging.WARNING, logger="reranker_runtime.service"):
        async with serving(
            xlmr_engine,
            max_chunks_per_doc=chunks_per_doc,
            max_chunks_per_request=per_request,
            max_client_batch_size=1000,
        ):
            pass
    messages = [
        r.getMessage() for r in caplog.records if "--max-chunks-per-request" in r.getMessage()
    ]
    assert bool(messages) is warned
    if warned:
        assert "more than 100 texts gets 413" in messages[0]


# ------------------------------------------------------------------ bounded work per request


def counting_windows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the windows PairTokenizer builds (each is post-processed with the query)."""
    built: list[int] = []
    original = PairTokenizer._window

    def window(self: PairTokenizer, enc: Any) -> Any:
        built.append(1)
        return original(self, enc)

    monkeypatch.setattr(PairTokenizer, "_window", window)
    return built


def test_a_huge_max_chunks_per_doc_builds_no_more_than_the_request_may_score(
    xlmr_engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_chunks_per_doc 10**9 on a 1 MB text: counted as far as the per-request cap, refused
    with only each text's first window built (it built every window of the text, ~8,000, and
    kept gigabytes after the client had gone)."""
    tokenizer = PairTokenizer(xlmr_engine.tokenizer, TINY_MAX_TOKENS)
    built = counting_windows(monkeypatch)
    text = "paris is the capital of france " * 40_000
    (chunked,) = tokenizer.encode_chunked(
        QUERY, [text], truncate=True, max_windows=10**9, max_total_windows=50
    )
    assert len(built) == 1 and len(chunked.windows) == 1
    assert chunked.kept_windows == 51 and chunked.truncated and not chunked.fully_counted
    assert chunked.needed_windows <= 52  # tokenized no further than 51 windows reach
    # Within the cap, every kept window is built, and no more.
    built.clear()
    (kept,) = tokenizer.encode_chunked(
        QUERY, [text], truncate=True, max_windows=7, max_total_windows=50
    )
    assert len(built) == 7 and len(kept.windows) == kept.kept_windows == 7 and kept.truncated


async def test_a_request_over_the_window_cap_is_refused_before_its_windows_are_built(
    xlmr_engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = long_texts("xlmr")
    async with serving(xlmr_engine, max_chunks_per_doc=100, max_chunks_per_request=6) as service:
        built = counting_windows(monkeypatch)
        with pytest.raises(TooManyChunksPerRequestError) as err:
            await service.rerank(QUERY, texts, truncate=True)
    assert len(built) == len(texts)  # one per text, the one the length checks read
    assert err.value.windows > 6


def test_window_building_stops_when_nobody_waits(
    xlmr_engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from reranker_runtime.text_bounds import TokenizationStopped

    tokenizer = PairTokenizer(xlmr_engine.tokenizer, TINY_MAX_TOKENS)
    stop = threading.Event()
    built: list[int] = []
    original = PairTokenizer._window

    def window_then_leave(self: PairTokenizer, enc: Any) -> Any:
        built.append(1)
        stop.set()  # the client goes away while the first window is built
        return original(self, enc)

    monkeypatch.setattr(PairTokenizer, "_window", window_then_leave)
    with pytest.raises(TokenizationStopped):
        tokenizer.encode_chunked(
            QUERY, ["paris is the capital of france " * 400], truncate=True, max_windows=20,
            stop=stop,
        )  # fmt: skip
    assert built == [1]  # of 20 windows, only the first was built
