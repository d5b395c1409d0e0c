"""RerankService: validation, tokenization/truncation, the batcher, and score assembly.

Routes (api/) parse and format; everything a request needs beyond that happens here, and every
failure is a domain error (errors.py) that the HTTP layer maps in one table (api/errors.py).
Messages name the request's fields; the names come in as data (`texts_field`) because the
Cohere/Jina routes call the texts `documents`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from reranker_runtime import metrics, tracing
from reranker_runtime.batch_budget import resolve_max_batch_tokens
from reranker_runtime.batching import Batcher, BatchResult
from reranker_runtime.config import ServeSettings, default_tokenization_workers
from reranker_runtime.engines.base import Engine, EngineInfo
from reranker_runtime.errors import (
    DeadlineExceededError,
    DeadlineUnreachableError,
    EmptyInputError,
    EmptyTokenizerInputError,
    InputTooLongError,
    ModelLoadError,
    TooManyChunksPerRequestError,
    TooManyChunksPerTextError,
    TooManyInputsError,
    ValidationError,
    WrongModelKindError,
)
from reranker_runtime.lifecycle import State, not_ready_error
from reranker_runtime.limits import check_request_characters
from reranker_runtime.logging import log_fields
from reranker_runtime.text_bounds import TokenizationStopped
from reranker_runtime.tokenization import (
    ChunkedText,
    Encoded,
    PairTokenizer,
    TokenInfo,
    parse_direction,
)

__all__ = ["PredictResult", "RerankResult", "RerankService", "TokenInfo"]

logger = logging.getLogger(__name__)

PredictInput = str | tuple[str, str]
T = TypeVar("T")


async def to_the_end_on_a_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a worker thread. If the caller is cancelled (the client left), it still
    waits for the thread: what the thread builds holds its memory, and the caller its slot,
    until then."""
    building = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(building)
    except asyncio.CancelledError:
        await asyncio.wait({building})
        raise


@dataclass(frozen=True)
class RerankResult:
    scores: list[float]  # in input order; sigmoid(logit) unless raw_scores
    token_counts: list[int]  # tokens of each (query, text) pair as scored (after truncation)
    truncated: list[bool]  # whether each pair was cut
    total_tokens: int
    tokenization_time_s: float
    queue_time_s: float
    inference_time_s: float
    chunks: list[int] = field(default_factory=list)  # windows scored per text (1: not chunked)

    def ranking(self) -> list[int]:
        """Indices by score, best first; ties keep request order (stable sort)."""
        return sorted(range(len(self.scores)), key=lambda i: -self.scores[i])


@dataclass(frozen=True)
class PredictResult:
    predictions: list[list[tuple[str, float]]]  # per input: (label, score), score descending
    token_counts: list[int]
    truncated: list[bool]
    total_tokens: int
    tokenization_time_s: float
    queue_time_s: float
    inference_time_s: float


@dataclass
class _Progress:
    """How far a scoring request got, for the trace spans of one that ends early."""

    started: float  # perf_counter() before tokenization
    tokenization_s: float | None = None  # set once tokenized
    scoring: bool = False  # handed to the batcher

    def tokenized(self) -> float:
        """Mark tokenization done; its duration in seconds."""
        self.tokenization_s = time.perf_counter() - self.started
        return self.tokenization_s


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _is_blank(text: str) -> bool:
    return not text or text.isspace()


def _at(field: str, index: int, count: int) -> str:
    """How a message names item `index` of `count` in `field`: the field alone for one item."""
    return f"`{field}`" if count == 1 else f"`{field}[{index}]`"


def _deadline_passed(timeout_s: float, request_id: str | None) -> DeadlineExceededError:
    """Count and log a request whose deadline passed; the error to raise."""
    metrics.REQUEST_TIMEOUTS.inc()
    logger.info(
        "request deadline passed", extra=log_fields(request_id=request_id, timeout_s=timeout_s)
    )
    return DeadlineExceededError(timeout_s)


# Checks that need only the request and the settings, not the model: the service makes them,
# and the HTTP layer makes them again before admission (api/deps.py), so a request that can
# never succeed gets its 400/413/422 rather than a 429 or 503 to retry.


def check_count(field: str, n: int, settings: ServeSettings) -> None:
    limit = settings.max_client_batch_size
    if n > limit:
        raise TooManyInputsError(field, n, limit)


def check_rerank_input(
    query: str, texts: Sequence[str], settings: ServeSettings, texts_field: str = "texts"
) -> None:
    """A non-blank query, one to --max-client-batch-size non-blank texts, and at most
    --max-request-characters in all."""
    if not isinstance(query, str) or _is_blank(query):
        raise EmptyInputError("`query` must not be empty")
    if not texts:
        raise EmptyInputError(f"`{texts_field}` must not be empty: send at least one text to rank")
    check_count(texts_field, len(texts), settings)
    check_request_characters([query, *texts], settings.max_request_characters)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValidationError(f"`{texts_field}[{i}]` must be a string")
        if _is_blank(text):
            raise EmptyInputError(
                f"`{texts_field}[{i}]` is empty; every text needs at least one non-space character"
            )


def check_predict_inputs(
    inputs: Sequence[object],
    settings: ServeSettings,
    *,
    allow_blank: bool = False,
    field: str = "inputs",
    single_name: str | None = None,
) -> list[PredictInput]:
    """/predict's inputs: a list of one to --max-client-batch-size texts or pairs (non-blank
    unless `allow_blank`), at most --max-request-characters in all. `single_name`: what errors
    call the one input when the client sent TEI's single form, not a batch."""
    if isinstance(inputs, (str, tuple)):
        raise ValidationError(f"`{field}` must be a list of strings or pairs")
    if not inputs:
        raise EmptyInputError(f"`{field}` must not be empty")
    check_count(field, len(inputs), settings)
    items: list[PredictInput] = []
    for i, item in enumerate(inputs):
        name = single_name or f"{field}[{i}]"
        if isinstance(item, str):
            if not allow_blank and _is_blank(item):
                raise EmptyInputError(f"`{name}` is empty")
            items.append(item)
        elif (
            isinstance(item, (tuple, list))
            and len(item) == 2
            and all(isinstance(x, str) for x in item)
        ):
            for j, part in enumerate(item):
                if not allow_blank and _is_blank(part):
                    raise EmptyInputError(f"`{name}[{j}]` is empty")
            items.append((item[0], item[1]))
        else:
            raise ValidationError(f"`{name}` must be a string or a pair of two strings")
    check_request_characters(items, settings.max_request_characters)
    return items


class RerankService:
    """One model behind one batcher. `start()` warms up and starts batching, `stop()` stops
    batching and closes the engine; admission, readiness and draining belong to the lifecycle
    (lifecycle.py), which owns the service."""

    def __init__(self, engine: Engine, settings: ServeSettings) -> None:
        self._engine = engine
        self._settings = settings
        info = engine.info
        self._info = info
        self._tokenizer = PairTokenizer(engine.tokenizer, info.max_input_length)
        self._batcher = Batcher(
            engine,
            max_batch_tokens=resolve_max_batch_tokens(
                settings.max_batch_tokens, info, engine.max_concurrent_scores
            ),
            max_batch_requests=settings.max_batch_requests,
        )
        self._labels = [info.id2label.get(i, f"LABEL_{i}") for i in range(info.num_labels)]
        # --tokenization-workers: requests are tokenized on these threads (TEI's tokenization
        # workers), apart from the threads that run forward passes.
        self.tokenization_workers = settings.tokenization_workers or default_tokenization_workers()
        self._tokenize_pool = ThreadPoolExecutor(
            self.tokenization_workers, thread_name_prefix="tokenize"
        )
        self._stops: set[threading.Event] = set()  # of the tokenizations under way
        # /tokenize answers hold every token as objects, then as JSON (a 2 MB body can become
        # a 60 MB answer, 360 MB while built), and take no --max-concurrent-requests permit (as
        # in TEI): as many are built at once as there are tokenization workers; the rest wait.
        self._tokenize_answers = asyncio.Semaphore(self.tokenization_workers)

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
        """The batcher, whose limits (engine caps applied) are the ones in force."""
        return self._batcher

    async def start(self) -> None:
        """Refuse impossible limits, warm the engine up (off the event loop), start batching."""
        longest_window = self._tokenizer.max_text_tokens
        if self._settings.chunk_overlap_tokens >= longest_window:
            raise ModelLoadError(
                f"--chunk-overlap-tokens is {self._settings.chunk_overlap_tokens} but a window of "
                f"this model holds at most {longest_window} text tokens (max input length "
                f"{self._info.max_input_length} minus special tokens); lower --chunk-overlap-tokens"
            )
        s = self._settings
        if s.max_chunks_per_doc > 1 and s.max_chunks_per_request < s.max_client_batch_size:
            # Every text is at least one window: chunking on by default would refuse plain
            # requests the client batch size allows.
            logger.warning(
                "--max-chunks-per-request %d is below --max-client-batch-size %d while "
                "--max-chunks-per-doc %d chunks every request: a /rerank request of more than %d "
                "texts gets 413 even when every text fits; raise --max-chunks-per-request",
                s.max_chunks_per_request,
                s.max_client_batch_size,
                s.max_chunks_per_doc,
                s.max_chunks_per_request,
            )
        await self._batcher.start(warmup=True)

    async def stop(self, *, abandon: bool = False) -> None:
        """Stop the batcher (failing whatever still waits; with `abandon`, every request in
        flight at once, those being tokenized too) and release the engine. A request whose
        tokenization is stopped or dropped from the pool here gets 503 (draining)."""
        if abandon:
            for stop in list(self._stops):
                stop.set()
        await self._batcher.stop(abandon=abandon)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._engine.close)
        logger.info("service stopped")

    # ---------------------------------------------------------------------------- routes

    async def rerank(
        self,
        query: str,
        texts: list[str],
        *,
        truncate: bool | None,
        truncation_direction: str = "right",
        raw_scores: bool = False,
        max_tokens_per_text: int | None = None,
        max_chunks_per_text: int | None = None,
        timeout_s: float | None = None,
        arrived_at: float | None = None,
        request_id: str | None = None,
        texts_field: str = "texts",
    ) -> RerankResult:
        """Score each text against the query. `texts_field` is the request's name for the texts
        (`documents` on the Cohere/Jina routes), so error messages name what the client sent.
        `max_tokens_per_text` first cuts each text to that many tokens (Cohere/Jina
        `max_tokens_per_doc`); a text so cut is reported as truncated.

        `max_chunks_per_text` (default `--max-chunks-per-doc`): a text too long for the model is
        scored as up to that many windows, each paired with the whole query, and gets the best
        window's score (the max of the raw logits; sigmoid applies to that max). `timeout_s`
        (default `--request-timeout`): the deadline, counted from `arrived_at` (event-loop time
        the request arrived; default: this call)."""
        self.check_reranker()
        direction = parse_direction(truncation_direction)
        check_rerank_input(query, texts, self._settings, texts_field)
        chunks = (
            max_chunks_per_text
            if max_chunks_per_text is not None
            else self._settings.max_chunks_per_doc
        )
        if chunks < 1:
            raise ValidationError(f"max_chunks_per_doc must be at least 1, got {chunks}")
        truncating = self._truncating(truncate)

        async with self._scoring_request(timeout_s, request_id, arrived_at) as (progress, deadline):
            encoded = await self._stoppable_tokenization(
                self._tokenizer.encode_chunked,
                query,
                texts,
                truncate=truncating,
                direction=direction,
                max_text_tokens=max_tokens_per_text,
                max_windows=chunks,
                max_total_windows=self._settings.max_chunks_per_request if chunks > 1 else None,
                overlap=self._settings.chunk_overlap_tokens,
                texts_field=texts_field,
            )
            tokenization_s = progress.tokenized()
            windows = self._check_windows(encoded, chunks, truncating, texts_field)
            result = await self._score(windows, request_id, deadline, progress)

        # The max over each text's windows, on raw logits (sigmoid is monotonic: same ranking).
        logits = result.logits[:, 0].astype(np.float64)
        bounds = np.cumsum([0] + [len(e.windows) for e in encoded])
        best = np.array([logits[bounds[i] : bounds[i + 1]].max() for i in range(len(encoded))])
        scores = best if raw_scores else _sigmoid(best)
        self._observe(windows, progress.started, tokenization_s, result)
        if chunks > 1:
            metrics.CHUNKED_TEXTS.inc(sum(1 for e in encoded if len(e.windows) > 1))
        return RerankResult(
            scores=[float(s) for s in scores],
            token_counts=[e.num_tokens for e in encoded],
            truncated=[e.truncated for e in encoded],
            total_tokens=sum(e.num_tokens for e in encoded),
            tokenization_time_s=tokenization_s,
            queue_time_s=result.queue_time_s,
            inference_time_s=result.inference_time_s,
            chunks=[len(e.windows) for e in encoded],
        )

    def check_reranker(self) -> None:
        """Refuse (424, as TEI) a relevance score from a classifier with several labels."""
        if self._info.num_labels != 1:
            raise WrongModelKindError(
                "model is not a re-ranker model: "
                f"this model is a classifier with {self._info.num_labels} labels ({', '.join(self._labels)}), "
                "not a reranker (one relevance logit); use /predict to classify inputs"
            )

    async def predict(
        self,
        inputs: list[str | tuple[str, str]],
        *,
        truncate: bool | None,
        truncation_direction: str = "right",
        raw_scores: bool = False,
        timeout_s: float | None = None,
        arrived_at: float | None = None,
        request_id: str | None = None,
        inputs_field: str = "inputs",
    ) -> PredictResult:
        """TEI /predict: one label -> sigmoid, several -> softmax (raw logits with raw_scores).
        `timeout_s` as in `rerank`; `inputs_field` names the inputs in errors."""
        direction = parse_direction(truncation_direction)
        items = check_predict_inputs(inputs, self._settings, field=inputs_field)

        async with self._scoring_request(timeout_s, request_id, arrived_at) as (progress, deadline):
            encoded = await self._stoppable_tokenization(
                self._tokenizer.encode_inputs,
                items,
                truncate=self._truncating(truncate),
                direction=direction,
            )
            tokenization_s = progress.tokenized()
            self._check_lengths(encoded, inputs_field, "input is")
            result = await self._score(encoded, request_id, deadline, progress)
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
        self._observe(encoded, progress.started, tokenization_s, result)
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
        """TEI /tokenize: tokens of each input (a string or a pair), not truncated. A blank input
        is tokenized; an empty one is refused, as TEI's tokenizer refuses it."""
        items = check_predict_inputs(inputs, self._settings, allow_blank=True)
        for i, item in enumerate(items):
            if item in ("", ("", "")):  # TEI: a pair is empty when both parts are
                raise EmptyTokenizerInputError(f"{_at('inputs', i, len(items))} cannot be empty")
        return await self._stoppable_tokenization(
            self._tokenizer.tokens, items, add_special_tokens=add_special_tokens
        )

    async def tokenize_answer(
        self,
        inputs: list[str | tuple[str, str]],
        encode: Callable[[list[list[TokenInfo]]], T],
        *,
        add_special_tokens: bool = True,
    ) -> T:
        """`tokenize`'s tokens as an API answers them, `encode`d on a worker thread: a 1 MB text
        is about a million tokens, and built on the event loop its answer would hold every
        other request and the health probes for seconds. At most --tokenization-workers
        answers are built at once (the rest wait), which bounds their memory."""
        async with self._tokenize_answers:
            tokens = await self.tokenize(inputs, add_special_tokens=add_special_tokens)
            return await to_the_end_on_a_thread(encode, tokens)

    async def decode(
        self, sequences: list[list[int]], *, skip_special_tokens: bool = True
    ) -> list[str]:
        """TEI /decode: the text of each sequence of token ids (ids the vocabulary lacks are
        skipped, as the tokenizer does in TEI)."""
        check_count("ids", len(sequences), self._settings)
        for i, ids in enumerate(sequences):
            if not ids:  # TEI's tokenizer refuses an empty sequence ("`input_ids` cannot be empty")
                raise EmptyTokenizerInputError(
                    f"{_at('ids', i, len(sequences))} cannot be empty: send at least one token id"
                )
        backend = self._engine.tokenizer.backend_tokenizer
        texts: list[str] = await self._in_tokenize_pool(
            backend.decode_batch, sequences, skip_special_tokens=skip_special_tokens
        )
        return texts

    # --------------------------------------------------------------------------- helpers

    async def _in_tokenize_pool(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._tokenize_pool, functools.partial(fn, *args, **kwargs)
            )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling() == 0:
                # Not this request's own cancellation: stop() shut the pool down under it.
                raise not_ready_error(State.DRAINING) from None
            raise

    async def _stoppable_tokenization(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, stop=..., **kwargs)` on the tokenizer pool. When this await is cancelled
        (the request's deadline passed, its client left), `stop` is set and the tokenizer ends
        at its next slice of text instead of running on for nobody."""
        stop = threading.Event()
        self._stops.add(stop)
        try:
            return await self._in_tokenize_pool(fn, *args, stop=stop, **kwargs)
        except asyncio.CancelledError:
            stop.set()
            raise
        except TokenizationStopped:  # stop(abandon=True): a second exit signal
            raise not_ready_error(State.DRAINING) from None
        finally:
            self._stops.discard(stop)

    def _truncating(self, requested: bool | None) -> bool:
        # The one place auto-truncate applies, as in TEI (`req.truncate.unwrap_or(auto_truncate)`):
        # it decides for a request that does not say.
        return self._settings.auto_truncate if requested is None else requested

    def _check_lengths(self, encoded: list[Encoded], field: str, what: str) -> None:
        limit = self._info.max_input_length
        for i, enc in enumerate(encoded):
            if enc.num_tokens > limit:
                # A text far over the limit is tokenized only past it: its length is a bound.
                at_least = "" if enc.fully_counted else "at least "
                raise InputTooLongError(
                    f"`{field}[{i}]`: {what} {at_least}{enc.num_tokens} tokens long but the model "
                    f"accepts at most {limit}"
                )

    def _check_windows(
        self, encoded: list[ChunkedText], chunks: int, truncating: bool, field: str
    ) -> list[Encoded]:
        """The windows to score, in text order; refuses a text that needs more windows than
        `chunks` (truncation off), an over-long pair, and too many windows per request."""
        for i, text in enumerate(encoded):
            if not truncating and text.needed_windows > chunks:
                raise TooManyChunksPerTextError(
                    field,
                    i,
                    text.needed_windows,
                    text.window_tokens,
                    chunks,
                    at_least=not text.fully_counted,
                )
        if chunks > 1 and not truncating and encoded and encoded[0].window_tokens == 0:
            first = encoded[0].windows[0]
            if first.num_tokens > self._info.max_input_length:
                # Windowing splits the text, never the query: say so rather than "shorten it".
                raise InputTooLongError(
                    f"`query` leaves no room for text within the model's "
                    f"{self._info.max_input_length} tokens, so max_chunks_per_doc cannot split "
                    f"`{field}[0]` into windows (query and text are "
                    f"{'' if first.fully_counted else 'at least '}{first.num_tokens} tokens)"
                )
        self._check_lengths([text.windows[0] for text in encoded], field, "query and text are")
        limit = self._settings.max_chunks_per_request
        total = sum(text.kept_windows for text in encoded)
        if chunks > 1 and total > limit:
            # Counted, not built (encode_chunked): a text is windowed no further than the limit.
            at_least = any(text.kept_windows < min(text.needed_windows, chunks) for text in encoded)
            raise TooManyChunksPerRequestError(field, len(encoded), total, limit, at_least)
        return [w for text in encoded for w in text.windows]

    @asynccontextmanager
    async def _deadline(
        self, timeout_s: float | None, request_id: str | None, arrived_at: float | None = None
    ) -> AsyncIterator[float | None]:
        """Run the block under the request's deadline (event-loop time), if it has one, counted
        from `arrived_at` (default: now). When it passes, the block is cancelled (the batcher
        drops the request's waiting pairs) and the caller gets DeadlineExceededError at once,
        whatever forward pass is running; one already past when the block starts (a slow body)
        is refused the same way before any work."""
        timeout_s = timeout_s if timeout_s is not None else self._settings.request_timeout
        if timeout_s is None:
            yield None
            return
        now = asyncio.get_running_loop().time()
        deadline = (arrived_at if arrived_at is not None else now) + timeout_s
        if deadline <= now:  # spent before any work (a slow body): tokenize nothing
            raise _deadline_passed(timeout_s, request_id)
        scope = asyncio.timeout_at(deadline)
        try:
            async with scope:
                yield deadline
        except TimeoutError:
            if not scope.expired():
                raise  # not our deadline
            raise _deadline_passed(timeout_s, request_id) from None

    async def _score(
        self,
        encoded: list[Encoded],
        request_id: str | None,
        deadline: float | None,
        progress: _Progress,
    ) -> BatchResult:
        metrics.PREDICT_COUNT.inc(len(encoded))
        progress.scoring = True
        try:
            return await self._batcher.score(
                request_id or uuid.uuid4().hex, [e.pair for e in encoded], deadline=deadline
            )
        except DeadlineUnreachableError:
            metrics.REQUEST_DEADLINE_REFUSALS.inc()
            raise

    @asynccontextmanager
    async def _scoring_request(
        self, timeout_s: float | None, request_id: str | None, arrived_at: float | None
    ) -> AsyncIterator[tuple[_Progress, float | None]]:
        """One scoring request from its tokenization on: its deadline (`_deadline`), and on the
        way out of one that failed or was cancelled, its trace spans so far."""
        progress = _Progress(started=time.perf_counter())
        try:
            async with self._deadline(timeout_s, request_id, arrived_at) as deadline:
                yield progress, deadline
        except BaseException:
            tracing.record_unfinished(
                started=progress.started,
                tokenization_s=progress.tokenization_s,
                scoring=progress.scoring,
            )
            raise

    def _observe(
        self, encoded: list[Encoded], started: float, tokenization_s: float, result: BatchResult
    ) -> None:
        """Metrics and trace spans of a scored request; `started`: perf_counter() before its
        tokenization."""
        tracing.record_phases(
            started=started,
            tokenization_s=tokenization_s,
            queue_s=result.queue_time_s,
            compute_s=result.inference_time_s,
            batches=result.batches,
            pairs=len(encoded),
            tokens=sum(e.num_tokens for e in encoded),
        )
        metrics.TOKENIZATION_DURATION.observe(tokenization_s)
        metrics.QUEUE_DURATION.observe(result.queue_time_s)
        metrics.INFERENCE_DURATION.observe(result.inference_time_s)
        for e in encoded:  # per input, as TEI's tokenizer observes it
            metrics.REQUEST_INPUT_TOKENS.observe(e.num_tokens)
        metrics.PREDICT_SUCCESS.inc(len(encoded))
        # TEI records these once per input (core/src/infer.rs, `predict`), so their _count
        # equals te_predict_success; the inputs of one request share the request's times.
        total_s = tokenization_s + result.queue_time_s + result.inference_time_s
        n = len(encoded)
        metrics.observe_many(metrics.PREDICT_DURATION, total_s, n)
        metrics.observe_many(metrics.PREDICT_TOKENIZATION_DURATION, tokenization_s, n)
        metrics.observe_many(metrics.PREDICT_QUEUE_DURATION, result.queue_time_s, n)
        metrics.observe_many(metrics.PREDICT_INFERENCE_DURATION, result.inference_time_s, n)
