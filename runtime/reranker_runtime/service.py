"""RerankService: validation, tokenization/truncation, the batcher, and score assembly.

Routes (api/) parse and format; everything a request needs beyond that happens here, and every
failure is a `RerankerError` with its HTTP status (errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import numpy as np

from reranker_runtime import metrics
from reranker_runtime.batch_budget import resolve_max_batch_tokens
from reranker_runtime.batching import Batcher, BatchResult
from reranker_runtime.config import ServeSettings
from reranker_runtime.engines.base import Engine, EngineInfo
from reranker_runtime.errors import (
    EmptyInputError,
    InputTooLongError,
    NotReadyError,
    OverloadedError,
    TooManyInputsError,
    ValidationError,
    WrongModelKindError,
)
from reranker_runtime.tokenization import Encoded, PairTokenizer, TokenInfo, parse_direction

__all__ = ["PredictResult", "RerankResult", "RerankService", "TokenInfo"]

logger = logging.getLogger(__name__)

PredictInput = str | tuple[str, str]


@dataclass(frozen=True)
class RerankResult:
    scores: list[float]  # in input order; sigmoid(logit) unless raw_scores
    token_counts: list[int]  # tokens of each (query, text) pair as scored (after truncation)
    truncated: list[bool]  # whether each pair was cut
    total_tokens: int
    tokenization_time_s: float
    queue_time_s: float
    inference_time_s: float


@dataclass(frozen=True)
class PredictResult:
    predictions: list[list[tuple[str, float]]]  # per input: (label, score), score descending
    token_counts: list[int]
    truncated: list[bool]
    total_tokens: int
    tokenization_time_s: float
    queue_time_s: float
    inference_time_s: float


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _is_blank(text: str) -> bool:
    return not text or text.isspace()


class RerankService:
    """One model behind one batcher. `start()` before use, `stop()` on shutdown."""

    def __init__(self, engine: Engine, settings: ServeSettings) -> None:
        self._engine = engine
        self._settings = settings
        info = engine.info
        self._info = info
        self._tokenizer = PairTokenizer(engine.tokenizer, info.max_input_length)
        self._batcher = Batcher(
            engine,
            max_batch_tokens=resolve_max_batch_tokens(settings.max_batch_tokens, info),
            max_batch_size=settings.max_batch_requests,
        )
        self._labels = [info.id2label.get(i, f"LABEL_{i}") for i in range(info.num_labels)]
        self._ready = False
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # ----------------------------------------------------------------------------- state

    @property
    def ready(self) -> bool:
        """Loaded, warmed up, and not draining: what /health reports."""
        return self._ready and not self._draining

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def settings(self) -> ServeSettings:
        return self._settings

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def batcher(self) -> Batcher:
        return self._batcher

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def max_batch_tokens(self) -> int:
        """The effective token budget per forward pass (engine limits applied)."""
        return self._batcher.max_batch_tokens

    @property
    def max_batch_size(self) -> int | None:
        return self._batcher.max_batch_size

    async def start(self) -> None:
        """Refuse impossible limits, warm the engine up (off the event loop), start batching."""
        if self._ready:
            return
        started = time.perf_counter()
        await self._batcher.start(warmup=True)
        self._ready = True
        logger.info(
            "service ready",
            extra={
                "model": self._info.model_id,
                "engine": self._info.name,
                "max_input_length": self._info.max_input_length,
                "max_batch_tokens": self._batcher.max_batch_tokens,
                "max_batch_size": self._batcher.max_batch_size,
                "start_s": round(time.perf_counter() - started, 3),
            },
        )

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop admitting (ready -> False), let in-flight requests finish (up to timeout_s),
        then stop the batcher (failing whatever still waits) and release the engine."""
        self._draining = True
        if self._in_flight:
            logger.info("draining in-flight requests", extra={"in_flight": self._in_flight})
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except asyncio.TimeoutError:
                logger.warning(
                    "drain timed out; failing what is left", extra={"in_flight": self._in_flight}
                )
        await self._batcher.stop()
        self._ready = False
        await asyncio.to_thread(self._engine.close)
        logger.info("service stopped")

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Count one request in flight for its whole duration (a large request counts once).
        Refuses at once: NotReadyError (503) when not ready, OverloadedError (429) when
        --max-concurrent-requests are already in flight."""
        if not self.ready:
            raise NotReadyError(
                "the model is still loading or warming up"
                if not self._draining
                else "the server is shutting down"
            )
        limit = self._settings.max_concurrent_requests
        if self._in_flight >= limit:
            raise OverloadedError(
                f"{self._in_flight} requests are already in flight, the limit (--max-concurrent-requests) "
                f"is {limit}; retry shortly"
            )
        self._in_flight += 1
        self._idle.clear()
        metrics.IN_FLIGHT.inc()
        try:
            yield
        finally:
            self._in_flight -= 1
            metrics.IN_FLIGHT.dec()
            if self._in_flight == 0:
                self._idle.set()

    # ---------------------------------------------------------------------------- routes

    async def rerank(
        self,
        query: str,
        texts: list[str],
        *,
        truncate: bool,
        truncation_direction: str = "right",
        raw_scores: bool = False,
        request_id: str | None = None,
        texts_field: str = "texts",
    ) -> RerankResult:
        """Score each text against the query. `texts_field` is the request's name for the texts
        (`documents` on the Cohere/Jina routes), so error messages name what the client sent."""
        self._check_serving()
        if self._info.num_labels != 1:
            raise WrongModelKindError(
                f"this model is a classifier with {self._info.num_labels} labels ({', '.join(self._labels)}), "
                "not a reranker (one relevance logit); use /predict to classify inputs"
            )
        direction = parse_direction(truncation_direction)
        if not isinstance(query, str) or _is_blank(query):
            raise EmptyInputError("`query` must not be empty")
        if not texts:
            raise EmptyInputError(
                f"`{texts_field}` must not be empty: send at least one text to rank"
            )
        self._check_count(texts_field, len(texts))
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValidationError(f"`{texts_field}[{i}]` must be a string")
            if _is_blank(text):
                raise EmptyInputError(
                    f"`{texts_field}[{i}]` is empty; every text needs at least one non-space character"
                )

        truncating = truncate or self._settings.auto_truncate
        t0 = time.perf_counter()
        encoded = await asyncio.to_thread(
            self._tokenizer.encode_pairs, query, texts, truncate=truncating, direction=direction
        )
        tokenization_s = time.perf_counter() - t0
        self._check_lengths(encoded, texts_field, "query and text are")

        result = await self._score(encoded, request_id)
        logits = result.logits[:, 0]
        scores = logits.astype(np.float64) if raw_scores else _sigmoid(logits)
        self._observe(encoded, tokenization_s, result)
        return RerankResult(
            scores=[float(s) for s in scores],
            token_counts=[e.num_tokens for e in encoded],
            truncated=[e.truncated for e in encoded],
            total_tokens=sum(e.num_tokens for e in encoded),
            tokenization_time_s=tokenization_s,
            queue_time_s=result.queue_time_s,
            inference_time_s=result.inference_time_s,
        )

    async def predict(
        self,
        inputs: list[str | tuple[str, str]],
        *,
        truncate: bool,
        truncation_direction: str = "right",
        raw_scores: bool = False,
        request_id: str | None = None,
    ) -> PredictResult:
        """TEI /predict: one label -> sigmoid, several -> softmax (raw logits with raw_scores)."""
        self._check_serving()
        direction = parse_direction(truncation_direction)
        items = self._check_inputs(inputs)

        truncating = truncate or self._settings.auto_truncate
        t0 = time.perf_counter()
        encoded = await asyncio.to_thread(
            self._tokenizer.encode_inputs, items, truncate=truncating, direction=direction
        )
        tokenization_s = time.perf_counter() - t0
        self._check_lengths(encoded, "inputs", "input is")

        result = await self._score(encoded, request_id)
        logits = result.logits
        if raw_scores:
            probs = logits.astype(np.float64)
        elif self._info.num_labels == 1:
            probs = _sigmoid(logits)
        else:
            probs = _softmax(logits)
        predictions = [
            sorted(((self._labels[j], float(row[j])) for j in range(len(row))), key=lambda p: -p[1])
            for row in probs
        ]
        self._observe(encoded, tokenization_s, result)
        return PredictResult(
            predictions=predictions,
            token_counts=[e.num_tokens for e in encoded],
            truncated=[e.truncated for e in encoded],
            total_tokens=sum(e.num_tokens for e in encoded),
            tokenization_time_s=tokenization_s,
            queue_time_s=result.queue_time_s,
            inference_time_s=result.inference_time_s,
        )

    async def tokenize(
        self, inputs: list[str | tuple[str, str]], *, add_special_tokens: bool = True
    ) -> list[list[TokenInfo]]:
        """TEI /tokenize: tokens of each input (a string or a pair), not truncated."""
        items = self._check_inputs(inputs, allow_blank=True)
        return await asyncio.to_thread(
            self._tokenizer.tokens, items, add_special_tokens=add_special_tokens
        )

    # --------------------------------------------------------------------------- helpers

    def _check_serving(self) -> None:
        # Requests admitted before a drain began still run; only a stopped batcher refuses.
        if not self._batcher.running:
            raise NotReadyError(
                "the model is still loading or warming up, or the server is shutting down"
            )

    def _check_count(self, field: str, n: int) -> None:
        limit = self._settings.max_client_batch_size
        if n > limit:
            raise TooManyInputsError(
                f"`{field}` has {n} items but this server accepts at most {limit} per request; "
                "send fewer per request or raise --max-client-batch-size (RERANKER_MAX_CLIENT_BATCH_SIZE)"
            )

    def _check_inputs(
        self, inputs: Sequence[object], *, allow_blank: bool = False
    ) -> list[PredictInput]:
        if isinstance(inputs, (str, tuple)):
            raise ValidationError("`inputs` must be a list of strings or pairs")
        if not inputs:
            raise EmptyInputError("`inputs` must not be empty")
        self._check_count("inputs", len(inputs))
        items: list[PredictInput] = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                if not allow_blank and _is_blank(item):
                    raise EmptyInputError(f"`inputs[{i}]` is empty")
                items.append(item)
            elif (
                isinstance(item, (tuple, list))
                and len(item) == 2
                and all(isinstance(x, str) for x in item)
            ):
                for j, part in enumerate(item):
                    if not allow_blank and _is_blank(part):
                        raise EmptyInputError(f"`inputs[{i}][{j}]` is empty")
                items.append((item[0], item[1]))
            else:
                raise ValidationError(f"`inputs[{i}]` must be a string or a pair of two strings")
        return items

    def _check_lengths(self, encoded: list[Encoded], field: str, what: str) -> None:
        limit = self._info.max_input_length
        for i, enc in enumerate(encoded):
            if enc.num_tokens > limit:
                raise InputTooLongError(
                    f"`{field}[{i}]`: {what} {enc.num_tokens} tokens long but the model accepts at most "
                    f"{limit}; shorten it or set truncate=true"
                )

    async def _score(self, encoded: list[Encoded], request_id: str | None) -> BatchResult:
        return await self._batcher.score(request_id or uuid.uuid4().hex, [e.pair for e in encoded])

    def _observe(self, encoded: list[Encoded], tokenization_s: float, result: BatchResult) -> None:
        metrics.TOKENIZATION_DURATION.observe(tokenization_s)
        metrics.QUEUE_DURATION.observe(result.queue_time_s)
        metrics.INFERENCE_DURATION.observe(result.inference_time_s)
        metrics.REQUEST_INPUT_TOKENS.observe(sum(e.num_tokens for e in encoded))
