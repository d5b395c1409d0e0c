"""Token-budget dynamic batcher: one queue owner task, fair across requests, low padding.

Every (query, text) pair is its own queue entry, so pairs of different requests share forward
passes. One asyncio task (the owner) forms batches; forward passes run on dedicated worker
threads, as many at once as the engine allows (`Engine.max_concurrent_scores`). The owner keeps
`pipeline_depth` batches submitted: 2 on GPUs (one running, one ready, so the device never idles
while the event loop is busy); on CPUs one per forward worker (`--cpu-workers`, cpu_threads.py:
two single-threaded passes at once on 2 CPUs), none waiting (forming a batch takes well under a
millisecond next to a forward pass of hundreds, and a request that arrives meanwhile rides in
the very next batch). A batch is delivered as soon as its pass ends, in any order.

Batch formation (`_form_batch`) balances fairness against padding:
1. lead: the longest waiting entry of all; batches are cut from the top of the length order,
   which is what keeps padding low (CrossEncoder.predict sorts its inputs the same way);
2. fairness: every waiting request that had no entry in the previous batch gets one slot, with
   its longest entry, so a new 1-text request rides in the very next batch instead of waiting
   behind a 500-text one (TEI's FIFO queue does that), and every request is served at least
   every other batch: nothing starves;
3. efficiency: the rest of the budget takes the longest waiting entries of all requests (a
   merge of the requests' length-sorted lists; equal lengths alternate between requests);
4. a batch is closed when the next entry would exceed the token budget (padded engines cost
   `longest * n`, packed engines `sum(lengths)`) or the per-batch request limit.

The batcher's limits (`max_batch_tokens`, `max_batch_requests`) are the ones in force: the
configured ones, lowered to the engine's own caps (a TensorRT profile). /info reports them.

Deadlines: a request submitted with one is refused at once (`DeadlineUnreachableError`) when
even served next it could not finish in time (`_refuse_if_unreachable`). When a deadline
passes, the service cancels the caller, which drops the request's waiting entries like a
client disconnect does. A long text's windows are ordinary entries of their request.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reranker_runtime import metrics
from reranker_runtime.engines.base import EncodedPair, Engine
from reranker_runtime.errors import (
    DeadlineUnreachableError,
    EngineError,
    InternalError,
    ModelLoadError,
)
from reranker_runtime.lifecycle import State, not_ready_error
from reranker_runtime.logging import log_fields

logger = logging.getLogger(__name__)


# Forward passes whose throughput the early deadline check looks at.
_RATE_WINDOW = 32


def default_pipeline_depth(device: str, workers: int = 1) -> int:
    """Batches kept submitted: one per forward worker on CPU, 2 (one running, one ready) on
    GPUs."""
    return max(1, workers) if device == "cpu" else 2


@dataclass
class BatchResult:
    """What one request gets back: logits in item order and where its time went."""

    logits: np.ndarray  # float32 [n, num_labels]
    queue_time_s: float  # from submission to the start of its first forward pass
    # Wall time during which a forward pass held any of its pairs: passes that ran at once (CPU
    # workers, GPU streams) count once, so it never exceeds the request's own duration.
    inference_time_s: float
    batches: int  # forward passes that held any of its pairs


def covered_seconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals."""
    total, reached = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


@dataclass(eq=False)
class _Request:
    request_id: str
    submitted_at: float
    future: asyncio.Future[BatchResult]
    # Waiting entries, longest first; `pending_lengths` holds their lengths negated (heap keys).
    pending: list[_Entry] = field(default_factory=list)
    pending_lengths: list[int] = field(default_factory=list)
    logits: np.ndarray | None = None
    remaining: int = 0
    first_start: float | None = None
    passes: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each
    # Set on the event loop; read by the worker thread to skip entries of a dropped request.
    dropped: bool = False
    last_batch: int = -2  # sequence number of the last batch formed with one of its entries


@dataclass(eq=False)
class _Entry:
    request: _Request
    index: int  # position in the request's items
    pair: EncodedPair


@dataclass
class _Batch:
    entries: list[_Entry]
    cost: int
    submitted_at: float = 0.0  # event-loop time it was handed to the worker


@dataclass
class _Outcome:
    ran: list[_Entry]  # the entries the engine actually saw (dropped ones filtered out)
    logits: np.ndarray | None
    started: float
    duration_s: float
    error: BaseException | None = None


def batch_cost(lengths: Sequence[int], padded: bool) -> int:
    """Tokens a forward pass costs: longest * n for padded engines, the sum for packed ones."""
    if not lengths:
        return 0
    return max(lengths) * len(lengths) if padded else sum(lengths)


def _spread(free: list[float], work_s: float) -> float:
    """When `work_s` seconds of one worker's work end at the earliest, spread over workers that
    are free after `free` seconds (ascending): the time C with sum(max(0, C - f)) = work_s."""
    done = 0.0
    for k in range(1, len(free) + 1):
        done += free[k - 1]
        finish = (work_s + done) / k  # the first k workers share the work
        if k == len(free) or finish <= free[k]:
            return finish
    return work_s  # no workers (not reached: a batcher has at least one)


class Batcher:
    """Owns the queue of one engine. Create, `await start()`, `await score(...)`, `await stop()`."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_tokens: int,
        max_batch_requests: int | None = None,
        pipeline_depth: int | None = None,
    ) -> None:
        info = engine.info
        self._engine = engine
        self._padded = info.padded
        budget = max_batch_tokens
        if info.max_batch_tokens is not None and info.max_batch_tokens < budget:
            logger.warning(
                "the engine caps tokens per forward pass below the configured max_batch_tokens; "
                "using the engine's limit",
                extra=log_fields(
                    max_batch_tokens=budget, engine_max_batch_tokens=info.max_batch_tokens
                ),
            )
            budget = info.max_batch_tokens
        self.max_batch_tokens = budget
        # The engine's hard batch size (EngineInfo.max_batch_size) caps the requests per batch.
        caps = [s for s in (max_batch_requests, info.max_batch_size) if s is not None]
        self.max_batch_requests: int | None = min(caps) if caps else None
        if budget < 1 or (self.max_batch_requests is not None and self.max_batch_requests < 1):
            raise ValueError("max_batch_tokens and max_batch_requests must be positive")
        self._num_labels = info.num_labels
        self.workers = max(1, engine.max_concurrent_scores)  # worker threads
        # Forward passes that compute in parallel: CPU workers; on a GPU the device runs one
        # at a time (a second worker only stages the next batch).
        self._parallel = self.workers if info.device == "cpu" else 1
        self.pipeline_depth = pipeline_depth or default_pipeline_depth(info.device, self.workers)
        # Requests with entries still waiting, least recently seeded first (the turn order).
        self._requests: dict[_Request, None] = {}
        # Every request whose future is not resolved yet (waiting or in a submitted batch).
        self._live: set[_Request] = set()
        self._queued = 0  # entries waiting (not yet in a batch)
        self._wakeup = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._owner: asyncio.Task[None] | None = None
        self._running = False
        self._stopped = False  # stop() was called: not scoring again
        self._batches_run = 0
        self._batches_formed = 0
        # Batches handed to the worker and not delivered yet, oldest (running) first.
        self._submitted: deque[tuple[_Batch, asyncio.Future[_Outcome]]] = deque()
        # Tokens per second (as budgeted) of recent large forward passes: the deadline estimate.
        self._recent_rates: deque[float] = deque(maxlen=_RATE_WINDOW)

    # ----------------------------------------------------------------------------- lifecycle

    def check_limits(self) -> None:
        """Refuse a model whose longest input does not fit one batch (it could never be scored)."""
        max_len = self._engine.info.max_input_length
        if max_len > self.max_batch_tokens:
            raise ModelLoadError(
                f"model accepts up to {max_len} tokens per input but --max-batch-tokens is "
                f"{self.max_batch_tokens}; raise --max-batch-tokens to at least {max_len}"
            )

    async def start(self, *, warmup: bool = True) -> None:
        """Check limits, warm the engine up at the full budget (on the worker thread), then
        start the queue owner task."""
        if self._running:
            return
        self.check_limits()
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="forward")
        if warmup:
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(
                    self._executor, self._engine.warmup, self.max_batch_tokens
                )
            except BaseException:
                self._executor.shutdown(wait=False)
                self._executor = None
                raise
            logger.info(
                "engine warmed up",
                extra=log_fields(
                    max_batch_tokens=self.max_batch_tokens,
                    warmup_s=round(time.perf_counter() - started, 3),
                ),
            )
        self._running = True
        self._owner = asyncio.create_task(self._own_queue(), name="batcher-owner")
        self._owner.add_done_callback(self._owner_done)

    async def stop(self, *, abandon: bool = False) -> None:
        """Finish the forward passes already submitted, fail every request still waiting
        (NotReadyError: draining), and release the worker thread. `abandon`: fail every request
        at once, those in a running forward pass too (whose results are then dropped)."""
        if not self._running and self._owner is None:
            return
        self._running = False
        self._stopped = True
        self._wakeup.set()
        if abandon:
            self._fail_all(not_ready_error(State.DRAINING))
        if self._owner is not None:
            with contextlib.suppress(BaseException):
                await self._owner
            self._owner = None
        self._fail_all(not_ready_error(State.DRAINING))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    @property
    def running(self) -> bool:
        return self._running

    @property
    def queue_size(self) -> int:
        """Pairs waiting for a batch (not counting those in a submitted forward pass)."""
        return self._queued

    @property
    def batches_run(self) -> int:
        return self._batches_run

    # ------------------------------------------------------------------------------- submit

    async def score(
        self, request_id: str, items: Sequence[EncodedPair], *, deadline: float | None = None
    ) -> BatchResult:
        """Score every item; returns when all are done. Cancelling the caller drops the
        request's entries that have not run yet (that is how a passed deadline ends it).

        `deadline` (event-loop time): refuse the request at once, queueing nothing, when even
        served next it could not finish in time (`DeadlineUnreachableError`)."""
        if not self._running:
            # Never started (loading, warming up) or stopped: either way no longer scoring.
            raise not_ready_error(State.STOPPED if self._stopped else State.WARMING_UP)
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        if not items:
            return BatchResult(np.zeros((0, self._num_labels), np.float32), 0.0, 0.0, 0)
        if deadline is not None:
            self._refuse_if_unreachable(items, deadline, loop.time())
        request = _Request(
            request_id=request_id,
            submitted_at=now,
            future=loop.create_future(),
            remaining=len(items),
        )
        # Longest first: batches are filled from the top of each request's list (less padding).
        order = sorted(range(len(items)), key=lambda i: -len(items[i]))
        request.pending = [_Entry(request, i, items[i]) for i in order]
        request.pending_lengths = [-len(items[i]) for i in order]
        request.logits = np.empty((len(items), self._num_labels), dtype=np.float32)
        self._requests[request] = None
        self._live.add(request)
        self._set_queued(self._queued + len(items))
        self._wakeup.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            self._drop(request, reason="cancelled")
            raise
        finally:
            self._live.discard(request)

    # ------------------------------------------------------------------------- queue owner

    def _refuse_if_unreachable(
        self, items: Sequence[EncodedPair], deadline: float, now: float
    ) -> None:
        """A lower bound of the time the request needs, were it served next, at the fastest rate
        of the recent forward passes of at least half the budget: each of the passes that run
        at once (CPU workers) is free once its running pass ends; the passes already submitted
        but not started (they cannot be interrupted) go to the first free one in turn; then the
        request's own tokens, spread over the workers as they free up. Pairs of other requests
        still waiting are not counted: the fair batching can put the new request's pairs ahead
        of them. So a request is refused only when it cannot finish in time."""
        if not self._recent_rates:
            return  # no large forward pass measured yet: no estimate
        single = max(self._recent_rates)  # tokens/s of one pass
        free = [0.0] * self._parallel  # seconds until each worker is free
        for i, (batch, _) in enumerate(self._submitted):
            if i < self._parallel:
                # Running (or about to): part of it is done. Counting from its submission
                # overstates that part, which keeps the bound low.
                free[i] = max(0.0, batch.cost - (now - batch.submitted_at) * single) / single
            else:
                # Not started: entries of requests dropped meanwhile will be skipped.
                live = [len(e.pair) for e in batch.entries if not e.request.dropped]
                first = free.index(min(free))
                free[first] += batch_cost(live, self._padded) / single
        tokens = sum(len(p) for p in items)
        needed_s = _spread(sorted(free), tokens / single)
        if now + needed_s > deadline:
            raise DeadlineUnreachableError(
                needed_s, min(free), tokens, single * self._parallel, deadline - now
            )

    async def _own_queue(self) -> None:
        loop = asyncio.get_running_loop()
        submitted = self._submitted
        while self._running or submitted:
            while self._running and len(submitted) < self.pipeline_depth and self._requests:
                batch = self._form_batch()
                assert self._executor is not None
                batch.submitted_at = loop.time()
                fut = loop.run_in_executor(self._executor, self._forward, batch)
                submitted.append((batch, fut))
            if submitted:
                self._wakeup.clear()
                waiter = asyncio.ensure_future(self._wakeup.wait())
                running: set[asyncio.Future[Any]] = {fut for _, fut in submitted}
                try:
                    await asyncio.wait({*running, waiter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                # Parallel workers may finish out of order: deliver every pass that ended.
                for item in [item for item in submitted if item[1].done()]:
                    submitted.remove(item)
                    self._deliver(item[0], item[1].result())
            elif self._running:
                self._wakeup.clear()
                if not self._requests:
                    await self._wakeup.wait()

    def _form_batch(self) -> _Batch:
        entries: list[_Entry] = []
        lengths: list[int] = []
        limit = self.max_batch_requests
        longest = total = 0
        # Entries taken from the top of each request's list (its longest waiting ones).
        taken: dict[_Request, int] = {}

        def fits(length: int) -> bool:
            if limit is not None and len(lengths) >= limit:
                return False
            if not lengths:  # the first entry always runs, even alone over the budget
                return True
            cost = max(longest, length) * (len(lengths) + 1) if self._padded else total + length
            return cost <= self.max_batch_tokens

        def take(request: _Request) -> None:
            nonlocal longest, total
            i = taken.get(request, 0)
            taken[request] = i + 1
            entries.append(request.pending[i])
            length = -request.pending_lengths[i]
            lengths.append(length)
            longest, total = max(longest, length), total + length

        # 1. Lead: the longest waiting entry of all.
        requests = list(self._requests)
        take(min(requests, key=lambda r: r.pending_lengths[0]))

        # 2. Fairness: one slot for each request that had no entry in the previous batch.
        for request in requests:
            missed_last = request.last_batch < self._batches_formed - 1
            if request not in taken and missed_last and fits(-request.pending_lengths[0]):
                take(request)

        # 3. Efficiency: the longest waiting entries of all requests, merged from their sorted
        # lists; equal lengths go to the request with fewer entries in this batch so far.
        heap = [
            (r.pending_lengths[taken.get(r, 0)], taken.get(r, 0), turn)
            for turn, r in enumerate(requests)
            if taken.get(r, 0) < len(r.pending)
        ]
        heapq.heapify(heap)
        while heap:
            neg_length, _, turn = heapq.heappop(heap)
            if not fits(-neg_length):
                # Padded: every candidate is no longer than the lead and costs the same, so none
                # fits; packed: stop at the first that does not, keeping the longest-first order.
                break
            request = requests[turn]
            take(request)
            if taken[request] < len(request.pending):
                heapq.heappush(
                    heap, (request.pending_lengths[taken[request]], taken[request], turn)
                )

        for request, n in taken.items():
            del request.pending[:n]
            del request.pending_lengths[:n]
            request.last_batch = self._batches_formed
        self._batches_formed += 1
        for request in [r for r in self._requests if not r.pending]:
            del self._requests[request]
        self._set_queued(self._queued - len(entries))
        return _Batch(entries=entries, cost=batch_cost(lengths, self._padded))

    def _forward(self, batch: _Batch) -> _Outcome:
        """Runs on the worker thread. Entries of requests dropped meanwhile are skipped."""
        ran = [e for e in batch.entries if not e.request.dropped]
        started = time.perf_counter()
        if not ran:
            return _Outcome(ran=[], logits=None, started=started, duration_s=0.0)
        try:
            logits = self._engine.score([e.pair for e in ran])
            logits = np.asarray(logits, dtype=np.float32)
            if logits.shape != (len(ran), self._num_labels):
                raise ValueError(
                    f"engine returned logits of shape {logits.shape}, expected {(len(ran), self._num_labels)}"
                )
        except Exception as exc:
            return _Outcome(
                ran=ran,
                logits=None,
                started=started,
                duration_s=time.perf_counter() - started,
                error=exc,
            )
        return _Outcome(
            ran=ran, logits=logits, started=started, duration_s=time.perf_counter() - started
        )

    def _deliver(self, batch: _Batch, outcome: _Outcome) -> None:
        if not outcome.ran:
            return
        self._batches_run += 1
        requests = list(dict.fromkeys(e.request for e in outcome.ran))
        if outcome.error is not None:
            metrics.BATCH_FAILURES.inc()
            logger.error(
                "forward pass failed",
                extra=log_fields(
                    batch_size=len(outcome.ran),
                    batch_tokens=batch.cost,
                    requests=[r.request_id for r in requests],
                    error=repr(outcome.error),
                ),
                exc_info=outcome.error,
            )
            err = EngineError(
                f"the model failed to score this batch: {type(outcome.error).__name__}: {outcome.error}"
            )
            for request in requests:
                self._fail(request, err)
            return
        metrics.BATCH_SIZE.observe(len(outcome.ran))
        metrics.BATCH_TOKENS.observe(batch.cost)
        metrics.BATCH_INFERENCE_DURATION.observe(outcome.duration_s)
        ran_cost = batch_cost([len(e.pair) for e in outcome.ran], self._padded)
        # Only passes of at least half the budget measure throughput: a small one is mostly
        # fixed per-pass overhead and would make every estimate too slow.
        if outcome.duration_s > 0 and 2 * ran_cost >= self.max_batch_tokens:
            self._recent_rates.append(ran_cost / outcome.duration_s)
        assert outcome.logits is not None
        for request in requests:
            if request.first_start is None or outcome.started < request.first_start:
                request.first_start = outcome.started
            request.passes.append((outcome.started, outcome.started + outcome.duration_s))
        for entry, row in zip(outcome.ran, outcome.logits, strict=True):
            request = entry.request
            if request.dropped:
                continue
            assert request.logits is not None
            request.logits[entry.index] = row
            request.remaining -= 1
            if request.remaining == 0 and not request.future.done():
                request.future.set_result(
                    BatchResult(
                        logits=request.logits,
                        queue_time_s=max(
                            0.0, (request.first_start or outcome.started) - request.submitted_at
                        ),
                        inference_time_s=covered_seconds(request.passes),
                        batches=len(request.passes),
                    )
                )

    # --------------------------------------------------------------------------- helpers

    def _set_queued(self, value: int) -> None:
        self._queued = value
        metrics.QUEUE_SIZE.set(value)

    def _drop(self, request: _Request, *, reason: str) -> None:
        """Remove a request's waiting entries from the queue; its submitted ones are skipped."""
        if request.dropped:
            return
        request.dropped = True
        dropped = len(request.pending)
        request.pending.clear()
        self._requests.pop(request, None)
        self._set_queued(self._queued - dropped)
        if dropped:
            logger.info(
                "dropped queued pairs",
                extra=log_fields(request_id=request.request_id, pairs=dropped, reason=reason),
            )

    def _fail(self, request: _Request, error: BaseException) -> None:
        self._drop(request, reason="failed")
        if not request.future.done():
            request.future.set_exception(error)

    def _fail_all(self, error: BaseException) -> None:
        for request in list(self._live):
            self._fail(request, error)

    def _owner_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A bug in the owner must not leave requests hanging.
            logger.error("batcher owner task crashed", exc_info=exc)
            self._running = False
            self._fail_all(InternalError(f"the batcher stopped unexpectedly: {exc!r}"))
