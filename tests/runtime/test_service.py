"""RerankService: scores vs the reference, validation errors (and their HTTP mapping),
truncation, tokenization, /predict semantics, engine failures and cancellation. Readiness,
admission and draining: test_lifecycle.py."""

from __future__ import annotations

import asyncio
import random
import re
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from reranker_runtime.api.errors import client_message, http_error
from reranker_runtime.config import ServeSettings
from reranker_runtime.engines.base import EncodedPair, Engine
from reranker_runtime.errors import (
    EmptyInputError,
    EngineError,
    InputTooLongError,
    ModelLoadError,
    NotReadyError,
    TooManyInputsError,
    ValidationError,
    WrongModelKindError,
)
from reranker_runtime.service import RerankService
from reranker_runtime.tokenization import PairTokenizer
from runtime.fakes import ControlledEngine
from tiny_models import TINY_MAX_TOKENS, corpus, reference_logits

SCORE_TOL = 1e-5
LOGIT_TOL = 1e-4  # see test_engine.py: raw logits of the tiny models move ~3e-5 under padding
WAIT_S = 30.0
QUERY = "what is the capital of france"
TEXTS = [
    "paris is the capital city of france",
    "apple banana orange fruit",
    "the river in the city",
]


def sigmoid(x: Any) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def settings(**overrides: Any) -> ServeSettings:
    values: dict[str, Any] = dict(
        device="cpu", dtype="float32", max_batch_tokens=1024, max_client_batch_size=64
    )
    values.update(overrides)
    return ServeSettings(**values)


@asynccontextmanager
async def serving(engine: Engine, **overrides: Any) -> AsyncIterator[RerankService]:
    service = RerankService(engine, settings(**overrides))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def random_texts(n: int, seed: int, max_chars: int = 80) -> list[str]:
    """Texts of 5..max_chars characters (the tiny XLM-R tokenizer makes up to ~1 token per char)."""
    rng = random.Random(seed)
    sentences = corpus(200, seed=seed)
    texts = [
        " ".join(rng.choice(sentences) for _ in range(4))[: rng.randint(5, max_chars)]
        for _ in range(n)
    ]
    return [t.strip() or "a" for t in texts]


# ----------------------------------------------------------------------------- scores


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
async def test_rerank_scores_match_reference(
    kind: str, xlmr_engine, bert_engine, xlmr_reranker, bert_reranker
) -> None:
    engine, model_dir = (
        (xlmr_engine, xlmr_reranker) if kind == "xlmr" else (bert_engine, bert_reranker)
    )
    texts = random_texts(20, seed=2, max_chars=80)
    async with serving(engine) as service:
        result = await service.rerank(QUERY, texts, truncate=False)
        raw = await service.rerank(QUERY, texts, truncate=False, raw_scores=True)
    ref = np.array(reference_logits(model_dir, [(QUERY, t) for t in texts]))[:, 0]
    np.testing.assert_allclose(result.scores, sigmoid(ref), atol=SCORE_TOL, rtol=0)
    np.testing.assert_allclose(raw.scores, ref, atol=LOGIT_TOL, rtol=0)
    expected_counts = [len(engine.tokenizer(QUERY, t)["input_ids"]) for t in texts]
    assert result.token_counts == expected_counts
    assert result.total_tokens == sum(expected_counts)
    assert result.truncated == [False] * len(texts)
    assert (
        result.tokenization_time_s >= 0 and result.queue_time_s >= 0 and result.inference_time_s > 0
    )


async def test_fifty_concurrent_requests_no_cross_talk(xlmr_engine, xlmr_reranker: Path) -> None:
    rng = random.Random(9)
    queries = random_texts(50, seed=4, max_chars=30)
    requests = [
        (q, random_texts(rng.randint(1, 6), seed=100 + i, max_chars=80))
        for i, q in enumerate(queries)
    ]
    async with serving(xlmr_engine, max_batch_tokens=2048) as service:

        async def one(query: str, texts: list[str]) -> list[float]:
            return (await service.rerank(query, texts, truncate=True)).scores

        results = await asyncio.wait_for(
            asyncio.gather(*(one(q, ts) for q, ts in requests)), WAIT_S
        )
        batches = service.batcher.batches_run
    pairs = [(q, t) for q, ts in requests for t in ts]
    ref = sigmoid(np.array(reference_logits(xlmr_reranker, pairs))[:, 0])
    got = np.array([s for scores in results for s in scores])
    np.testing.assert_allclose(got, ref, atol=SCORE_TOL, rtol=0)
    assert batches < len(requests)  # pairs of different requests shared forward passes


# ------------------------------------------------------------------------- validation


async def test_validation_errors(xlmr_engine) -> None:
    async with serving(xlmr_engine, max_client_batch_size=4) as service:
        cases: list[tuple[Any, type, int, str]] = [
            (
                service.rerank("", ["a"], truncate=False),
                EmptyInputError,
                400,
                "`query` must not be empty",
            ),
            (service.rerank("  ", ["a"], truncate=False), EmptyInputError, 400, "`query`"),
            (
                service.rerank("q", [], truncate=False),
                EmptyInputError,
                400,
                "`texts` must not be empty",
            ),
            (
                service.rerank("q", ["a", ""], truncate=False),
                EmptyInputError,
                400,
                "`texts[1]` is empty",
            ),
            (
                service.rerank("q", ["a"] * 5, truncate=False),
                TooManyInputsError,
                422,
                "batch size 5 > maximum allowed batch size 4",
            ),
            (
                service.rerank("q", ["a"], truncate=False, truncation_direction="up"),
                ValidationError,
                422,
                "truncation_direction must be 'right' or 'left'",
            ),
            (
                service.predict([], truncate=False),
                EmptyInputError,
                400,
                "`inputs` must not be empty",
            ),
            (
                service.predict(["a", ("b", "")], truncate=False),
                EmptyInputError,
                400,
                "`inputs[1][1]` is empty",
            ),
            (
                service.predict(["a", ("b", "c", "d")], truncate=False),
                ValidationError,
                422,
                "`inputs[1]`",
            ),
            (
                service.predict(["a"] * 5, truncate=False),
                TooManyInputsError,
                422,
                "--max-client-batch-size",
            ),
        ]
        for call, error_type, status, text in cases:
            with pytest.raises(error_type) as err:
                await call
            assert http_error(err.value).status == status
            assert text in client_message(err.value), client_message(err.value)

        long_text = " ".join(corpus(40, seed=1))
        n = len(xlmr_engine.tokenizer("q", long_text)["input_ids"])
        with pytest.raises(InputTooLongError) as err:
            await service.rerank("q", ["short", long_text], truncate=False)
        assert http_error(err.value).status == 422
        # The text is tokenized only past the limit (text_bounds), so the count is a true bound.
        match = re.fullmatch(
            r"`texts\[1\]`: query and text are at least (\d+) tokens long but the model accepts "
            rf"at most {TINY_MAX_TOKENS}; shorten it or set truncate=true",
            client_message(err.value),
        )
        assert match, err.value.message
        assert TINY_MAX_TOKENS < int(match.group(1)) <= n
        with pytest.raises(InputTooLongError, match=r"`inputs\[0\]`: input is"):
            await service.predict([long_text], truncate=False)


async def test_too_many_message_names_limit(xlmr_engine) -> None:
    async with serving(xlmr_engine, max_client_batch_size=2) as service:
        with pytest.raises(TooManyInputsError) as err:
            await service.rerank("q", ["a", "b", "c"], truncate=False)
    # TEI's message first, then ours: the field and the flag.
    assert client_message(err.value) == (
        "batch size 3 > maximum allowed batch size 2: `texts` has 3 items; send fewer per "
        "request or raise --max-client-batch-size (RERANKER_MAX_CLIENT_BATCH_SIZE)"
    )


# ------------------------------------------------------------------------- truncation


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("direction", ["right", "Right", "left", "LEFT"])
async def test_truncation_keeps_query_and_cuts_text(direction: str, xlmr_engine) -> None:
    tok = xlmr_engine.tokenizer
    long_text = " ".join(corpus(40, seed=1))
    query_ids, text_ids = _ids(tok, QUERY), _ids(tok, long_text)
    room = TINY_MAX_TOKENS - 4 - len(query_ids)  # <s> q </s></s> t </s>
    kept = text_ids[:room] if direction.lower() == "right" else text_ids[-room:]
    expected = [0, *query_ids, 2, 2, *kept, 2]

    pt = PairTokenizer(tok, TINY_MAX_TOKENS)
    (enc,) = pt.encode_pairs(QUERY, [long_text], truncate=True, direction=direction.lower())  # type: ignore[arg-type]
    assert enc.pair.input_ids == expected
    assert enc.truncated and enc.num_tokens == TINY_MAX_TOKENS
    # Tokenized only past the window (text_bounds): the original length is a lower bound.
    assert not enc.fully_counted
    assert TINY_MAX_TOKENS < enc.original_tokens <= len(tok(QUERY, long_text)["input_ids"])

    async with serving(xlmr_engine) as service:
        result = await service.rerank(
            QUERY, [long_text, "paris"], truncate=True, truncation_direction=direction
        )
    assert result.truncated == [True, False]
    assert result.token_counts[0] == TINY_MAX_TOKENS
    alone = xlmr_engine.score([EncodedPair(expected)])[0, 0]
    assert result.scores[0] == pytest.approx(float(sigmoid(alone)), abs=SCORE_TOL)


async def test_truncation_cuts_query_when_it_alone_does_not_fit(bert_engine) -> None:
    tok = bert_engine.tokenizer
    long_query = " ".join(corpus(40, seed=3))
    pt = PairTokenizer(tok, TINY_MAX_TOKENS)
    (enc,) = pt.encode_pairs(long_query, ["paris france"], truncate=True, direction="right")
    text_ids = _ids(tok, "paris france")
    assert enc.num_tokens == TINY_MAX_TOKENS
    # [CLS] q' [SEP] t' [SEP], with one text token kept and the query filling the rest.
    assert enc.pair.input_ids[-3:] == [tok.sep_token_id, text_ids[0], tok.sep_token_id]
    assert enc.pair.input_ids[1:-3] == _ids(tok, long_query)[: TINY_MAX_TOKENS - 4]
    assert enc.pair.token_type_ids == [0] * (TINY_MAX_TOKENS - 2) + [1, 1]


async def test_auto_truncate_applies_only_where_the_request_does_not_say(xlmr_engine) -> None:
    long_text = " ".join(corpus(40, seed=1))
    async with serving(xlmr_engine, auto_truncate=True) as service:
        result = await service.rerank(QUERY, [long_text], truncate=None)
        assert result.truncated == [True]
        with pytest.raises(InputTooLongError):
            await service.rerank(QUERY, [long_text], truncate=False)
    async with serving(xlmr_engine, auto_truncate=False) as service:
        with pytest.raises(InputTooLongError):
            await service.rerank(QUERY, [long_text], truncate=None)


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_pair_encoding_equals_tokenizer_call(kind: str, xlmr_engine, bert_engine) -> None:
    engine = xlmr_engine if kind == "xlmr" else bert_engine
    tok = engine.tokenizer
    pt = PairTokenizer(tok, TINY_MAX_TOKENS)
    texts = [
        *random_texts(30, seed=6, max_chars=80),
        "Paris, France!",
        "  spaced   out  ",
        "über naïve café",
    ]
    for query in (QUERY, "apple?"):
        for text, enc in zip(texts, pt.encode_pairs(query, texts, truncate=False), strict=True):
            ref = tok(query, text)
            assert enc.pair.input_ids == ref["input_ids"], text
            assert enc.pair.token_type_ids == ref.get("token_type_ids")
            assert not enc.truncated
    for item, enc in zip(texts[:5], pt.encode_inputs(texts[:5], truncate=False), strict=True):
        assert enc.pair.input_ids == tok(item)["input_ids"]


# ------------------------------------------------------------------ tokenize / predict


async def test_tokenize(bert_engine) -> None:
    async with serving(bert_engine) as service:
        (single, pair) = await service.tokenize(["Paris is nice", ("what is", "the river")])
        (bare,) = await service.tokenize(["Paris is nice"], add_special_tokens=False)
    ref = bert_engine.tokenizer("Paris is nice")["input_ids"]
    assert [t.id for t in single] == ref
    assert single[0].special and single[0].text == "[CLS]" and single[0].start is None
    assert [t.id for t in bare] == ref[1:-1]
    assert not any(t.special for t in bare)
    assert all("Paris is nice"[t.start : t.stop] == t.text for t in bare)
    assert [t.id for t in pair] == bert_engine.tokenizer("what is", "the river")["input_ids"]
    assert "".join(t.text for t in pair if not t.special) == "whatistheriver"


async def test_classifier_refused_by_rerank_served_by_predict(
    classifier_engine, xlmr_classifier: Path
) -> None:
    inputs: list[str | tuple[str, str]] = ["paris is the capital", ("what is the capital", "paris")]
    async with serving(classifier_engine) as service:
        with pytest.raises(WrongModelKindError) as err:
            await service.rerank(QUERY, TEXTS, truncate=False)
        result = await service.predict(inputs, truncate=False)
        raw = await service.predict(inputs, truncate=False, raw_scores=True)
    assert http_error(err.value).status == 424  # TEI: another model type
    assert (
        "3 labels (negative, neutral, positive)" in err.value.message
        and "/predict" in err.value.message
    )
    ref = np.array(reference_logits(xlmr_classifier, inputs))
    probs = np.exp(ref) / np.exp(ref).sum(axis=1, keepdims=True)
    for row, expected, logits, raw_row in zip(
        result.predictions, probs, ref, raw.predictions, strict=True
    ):
        labels = [label for label, _ in row]
        scores = [score for _, score in row]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0)
        by_label = dict(row)
        for j, name in enumerate(["negative", "neutral", "positive"]):
            assert by_label[name] == pytest.approx(expected[j], abs=SCORE_TOL)
            assert dict(raw_row)[name] == pytest.approx(logits[j], abs=LOGIT_TOL)
        assert sorted(labels) == ["negative", "neutral", "positive"]


async def test_predict_on_reranker_uses_sigmoid(xlmr_engine, xlmr_reranker: Path) -> None:
    inputs: list[str | tuple[str, str]] = [(QUERY, TEXTS[0]), TEXTS[1]]
    async with serving(xlmr_engine) as service:
        result = await service.predict(inputs, truncate=False)
    ref = sigmoid(np.array(reference_logits(xlmr_reranker, inputs))[:, 0])
    assert [row[0][0] for row in result.predictions] == ["LABEL_0", "LABEL_0"]
    np.testing.assert_allclose([row[0][1] for row in result.predictions], ref, atol=SCORE_TOL)


async def test_bfloat16_service_close_to_fp32(xlmr_reranker: Path, xlmr_engine) -> None:
    from reranker_runtime.engines.torch_engine import TorchEngine

    bf16 = TorchEngine.load(str(xlmr_reranker), device="cpu", dtype="bfloat16")
    texts = random_texts(12, seed=8, max_chars=80)
    async with serving(bf16, dtype="bfloat16") as service:
        low = await service.rerank(QUERY, texts, truncate=True)
    async with serving(xlmr_engine) as service:
        full = await service.rerank(QUERY, texts, truncate=True)
    np.testing.assert_allclose(low.scores, full.scores, atol=0.15)


# ------------------------------------------------------------- failures and start-up


async def test_engine_failure_is_engine_error_and_service_recovers(xlmr_engine) -> None:
    engine = ControlledEngine(xlmr_engine)
    async with serving(engine) as service:
        engine.fail_next(RuntimeError("boom"))
        with pytest.raises(EngineError) as err:
            await service.rerank(QUERY, TEXTS, truncate=False)
        # TEI: a failed forward pass is ErrorType::Backend, 424.
        assert http_error(err.value).status == 424 and "boom" in err.value.message
        assert len((await service.rerank(QUERY, TEXTS, truncate=False)).scores) == len(TEXTS)


async def test_cancelled_rerank_drops_its_pairs(xlmr_engine) -> None:
    engine = ControlledEngine(xlmr_engine, max_batch_size=1)
    async with serving(engine) as service:
        engine.hold()
        blocker = asyncio.create_task(service.rerank(QUERY, ["apple", "banana"], truncate=False))
        await engine.wait_for_calls(1)
        before = service.batcher.queue_size  # the blocker's pairs not yet in a forward pass
        victim = asyncio.create_task(
            service.rerank("zzz", ["music art science"] * 3, truncate=False)
        )
        for _ in range(200):
            if service.batcher.queue_size == before + 3:
                break
            await asyncio.sleep(0.005)
        assert service.batcher.queue_size == before + 3
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        engine.release()
        await asyncio.wait_for(blocker, WAIT_S)
    victim_ids = xlmr_engine.tokenizer("zzz", "music art science")["input_ids"]
    assert victim_ids not in engine.seen_input_ids


async def test_start_refuses_max_length_above_budget(xlmr_engine) -> None:
    service = RerankService(xlmr_engine, settings(max_batch_tokens=100))
    with pytest.raises(ModelLoadError, match="raise --max-batch-tokens to at least 128"):
        await service.start()
    assert not service.batcher.running


async def test_a_request_still_queued_for_tokenization_at_stop_gets_a_503(xlmr_engine: Any) -> None:
    """stop() drops the tokenizer pool's queued work: the request waiting on it gets the
    draining 503, not a bare cancellation (which uvicorn would answer with a plain 500)."""
    service = RerankService(ControlledEngine(xlmr_engine), settings(tokenization_workers=1))
    busy = threading.Event()
    first = asyncio.ensure_future(service._in_tokenize_pool(busy.wait, WAIT_S))
    queued = asyncio.ensure_future(service._in_tokenize_pool(lambda: "never run"))
    await asyncio.sleep(0)  # both submitted: the one worker runs `first`, `queued` waits
    stopping = asyncio.ensure_future(service.stop(abandon=True))
    with pytest.raises(NotReadyError, match="shutting down"):
        await asyncio.wait_for(queued, WAIT_S)
    busy.set()
    assert await asyncio.wait_for(first, WAIT_S) is True
    await asyncio.wait_for(stopping, WAIT_S)
