"""Token-budget batcher: budgets, batch size, cancellation, failures, stop(), fairness.

Forward passes run on a real tiny XLM-R engine wrapped in ControlledEngine, so tests can hold
the worker at a gate and count batches instead of measuring time.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest
from prometheus_client import REGISTRY

from reranker_runtime.api.errors import http_error
from reranker_runtime.batching import Batcher, _spread, batch_cost, covered_seconds
from reranker_runtime.engines.base import EncodedPair, Engine, EngineInfo
from reranker_runtime.errors import EngineError, InternalError, ModelLoadError, NotReadyError
from runtime.fakes import ControlledEngine

WAIT_S = 30.0  # upper bound on any wait: a bug fails the test instead of hanging it


def seq(length: int, token: int = 5) -> EncodedPair:
    """An XLM-R-shaped sequence of `length` tokens; `token` marks whose it is."""
    return EncodedPair([0] + [token] * (length - 2) + [2])


def marked_by(engine: ControlledEngine, token: int) -> list[int]:
    """Indices of the engine calls that held a sequence marked with `token`."""
    return [
        i for i, batch in enumerate(engine.calls) if any(p.input_ids[1] == token for p in batch)
    ]


async def until(condition, what: str) -> None:
    """Yield to the event loop until condition() holds (bounded: fails instead of hanging)."""
    for _ in range(int(WAIT_S / 0.002)):
        if condition():
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


async def started(engine, **kwargs) -> Batcher:
    kwargs.setdefault("max_batch_tokens", 1024)
    batcher = Batcher(engine, **kwargs)
    await batcher.start(warmup=False)
    return batcher


async def test_results_match_each_sequence_alone(xlmr_engine) -> None:
    engine = ControlledEngine(xlmr_engine)
    batcher = await started(engine, max_batch_tokens=512)
    rng = random.Random(3)
    requests = [
        [seq(rng.randint(3, 128), token=rng.randint(4, 99)) for _ in range(rng.randint(1, 12))]
        for _ in range(10)
    ]
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(batcher.score(f"r{i}", items) for i, items in enumerate(requests))),
            WAIT_S,
        )
    finally:
        await batcher.stop()
    for items, result in zip(requests, results, strict=True):
        alone = np.array([xlmr_engine.score([p])[0] for p in items])
        np.testing.assert_allclose(result.logits, alone, atol=1e-4)
        assert result.batches >= 1 and result.inference_time_s > 0 and result.queue_time_s >= 0
    assert len(engine.calls) > 1


@pytest.mark.parametrize("padded", [True, False])
async def test_token_budget_respected(xlmr_engine, padded: bool) -> None:
    engine = ControlledEngine(xlmr_engine, padded=padded)
    budget = 300
    batcher = await started(engine, max_batch_tokens=budget)
    rng = random.Random(7)
    items = [seq(rng.randint(3, 128)) for _ in range(60)]
    try:
        await asyncio.wait_for(
            asyncio.gather(batcher.score("a", items[:30]), batcher.score("b", items[30:])), WAIT_S
        )
    finally:
        await batcher.stop()
    assert sum(len(b) for b in engine.calls) == 60
    for batch in engine.calls:
        lengths = [len(p) for p in batch]
        assert batch_cost(lengths, padded) <= budget, lengths
    if not padded:
        # Packed batches are costed by the sum, so they hold more sequences than padded ones would.
        assert any(max(len(p) for p in b) * len(b) > budget for b in engine.calls)


async def test_max_batch_requests_from_settings_and_engine(xlmr_engine) -> None:
    engine = ControlledEngine(xlmr_engine, max_batch_size=5)
    batcher = await started(engine, max_batch_tokens=4096, max_batch_requests=3)
    assert batcher.max_batch_requests == 3
    try:
        await asyncio.wait_for(batcher.score("a", [seq(10)] * 20), WAIT_S)
    finally:
        await batcher.stop()
    assert max(len(b) for b in engine.calls) == 3

    batcher = await started(engine, max_batch_tokens=4096, max_batch_requests=50)
    assert batcher.max_batch_requests == 5  # the engine's hard limit is the smaller one
    await batcher.stop()


async def test_long_pairs_grouped_to_limit_padding(xlmr_engine) -> None:
    engine = ControlledEngine(xlmr_engine)
    batcher = await started(engine, max_batch_tokens=512)
    rng = random.Random(1)
    lengths = [rng.choice([10, 120]) for _ in range(40)]
    try:
        await asyncio.wait_for(batcher.score("a", [seq(n) for n in lengths]), WAIT_S)
    finally:
        await batcher.stop()
    # Longest first within a request: no batch mixes the two lengths more than once.
    mixed = [b for b in engine.calls if len({len(p) for p in b}) > 1]
    assert len(mixed) <= 1


async def test_concurrent_requests_share_batches_with_little_padding(xlmr_engine) -> None:
    """8 requests of 16 mixed-length pairs: batches group similar lengths across requests, and
    every request gets a pair into the first batch formed and then at least every other one."""
    engine = ControlledEngine(xlmr_engine)
    batcher = await started(engine, max_batch_tokens=1024)
    rng = random.Random(3)
    marks = range(10, 18)
    engine.hold()
    try:
        first = asyncio.create_task(batcher.score("first", [seq(8, token=3)]))
        await engine.wait_for_calls(1)
        tasks = [
            asyncio.create_task(
                batcher.score(f"r{t}", [seq(rng.randint(10, 120), token=t) for _ in range(16)])
            )
            for t in marks
        ]
        await until(lambda: batcher.queue_size == 8 * 16, "all pairs queued")
        engine.release()
        await asyncio.wait_for(asyncio.gather(first, *tasks), WAIT_S)
    finally:
        engine.release()
        await batcher.stop()
    batches = engine.calls[1:]
    real = sum(len(p) for b in batches for p in b)
    computed = sum(batch_cost([len(p) for p in b], padded=True) for b in batches)
    assert real / computed >= 0.85, f"padding efficiency {real / computed:.2f}"
    for t in marks:
        held = marked_by(engine, t)
        assert held[0] == 1
        assert all(b - a <= 2 for a, b in itertools.pairwise(held)), (
            f"request {t} waited 2+ batches: {held}"
        )


async def test_cancelled_request_is_never_scored(xlmr_engine) -> None:
    engine = ControlledEngine(xlmr_engine, max_batch_size=2)
    batcher = await started(engine, pipeline_depth=2)
    engine.hold()
    try:
        big = asyncio.create_task(batcher.score("big", [seq(20, token=5)] * 8))
        await engine.wait_for_calls(1)  # batch 1 at the gate, batch 2 submitted behind it
        queued = asyncio.create_task(batcher.score("queued", [seq(20, token=7)] * 3))
        await asyncio.sleep(0)
        assert batcher.queue_size == 4 + 3
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert batcher.queue_size == 4
        engine.release()
        result = await asyncio.wait_for(big, WAIT_S)
    finally:
        engine.release()
        await batcher.stop()
    assert result.logits.shape == (8, 1)
    assert marked_by(engine, 7) == []


async def test_cancelled_request_skipped_in_submitted_batch(xlmr_engine) -> None:
    engine = ControlledEngine(xlmr_engine)
    batcher = await started(engine, pipeline_depth=2)
    engine.hold()
    try:
        first = asyncio.create_task(batcher.score("first", [seq(20, token=5)]))
        await engine.wait_for_calls(1)
        # Goes straight into the second (already submitted) batch, then its client goes away.
        second = asyncio.create_task(batcher.score("second", [seq(20, token=7)] * 2))
        await until(
            lambda: batcher.queue_size == 0 and len(batcher._requests) == 0, "second batch formed"
        )
        second.cancel()
        engine.release()
        await asyncio.wait_for(first, WAIT_S)
        with pytest.raises(asyncio.CancelledError):
            await second
        # The batcher still serves.
        await asyncio.wait_for(batcher.score("third", [seq(9, token=8)]), WAIT_S)
    finally:
        engine.release()
        await batcher.stop()
    assert marked_by(engine, 7) == []
    assert marked_by(engine, 8) != []


async def test_engine_failure_fails_exactly_its_batch(xlmr_engine) -> None:
    engine = ControlledEngine(xlmr_engine)
    batcher = await started(engine, pipeline_depth=2)
    failures_before = REGISTRY.get_sample_value("reranker_batch_failures_total") or 0.0
    engine.hold()
    try:
        first = asyncio.create_task(batcher.score("first", [seq(12, token=4)]))
        await engine.wait_for_calls(1)
        # a and b arrive together: the next batch holds both.
        a = asyncio.create_task(batcher.score("a", [seq(12, token=5), seq(30, token=5)]))
        b = asyncio.create_task(batcher.score("b", [seq(12, token=6)]))
        await until(
            lambda: batcher.queue_size == 0 and len(batcher._live) == 3, "second batch formed"
        )
        # c waits in the queue (two batches are already submitted).
        c = asyncio.create_task(batcher.score("c", [seq(12, token=7)]))
        engine.allow(1)
        await asyncio.wait_for(first, WAIT_S)
        engine.fail_next(RuntimeError("CUDA error: an illegal memory access"))
        engine.release()
        outcomes = await asyncio.wait_for(asyncio.gather(a, b, c, return_exceptions=True), WAIT_S)
        after = await asyncio.wait_for(batcher.score("d", [seq(12, token=8)]), WAIT_S)
    finally:
        engine.release()
        await batcher.stop()
    failed_batch = engine.calls[1]
    assert {p.input_ids[1] for p in failed_batch} == {5, 6}
    for outcome in outcomes[:2]:
        assert isinstance(outcome, EngineError)
        assert "illegal memory access" in outcome.message
    assert outcomes[2].logits.shape == (1, 1)  # type: ignore[union-attr]
    assert after.logits.shape == (1, 1)
    assert (
        REGISTRY.get_sample_value("reranker_batch_failures_total") or 0.0
    ) == failures_before + 1


async def test_a_crashed_batcher_fails_waiting_requests_as_a_server_error(
    xlmr_engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the owner task is not the model's failure: InternalError (500), not EngineError
    (424, TEI's status for a failed forward pass); nothing is left hanging."""
    batcher = await started(xlmr_engine)

    def broken() -> None:
        raise RuntimeError("bug in batch forming")

    monkeypatch.setattr(batcher, "_form_batch", broken)
    try:
        with pytest.raises(InternalError, match="the batcher stopped unexpectedly"):
            await asyncio.wait_for(batcher.score("r", [seq(12)]), WAIT_S)
    finally:
        await batcher.stop()
    assert http_error(InternalError("x")).status == 500
    assert http_error(EngineError("x")).status == 424


async def test_stop_resolves_or_fails_everything(xlmr_engine) -> None:
    engine = ControlledEngine(xlmr_engine, max_batch_size=2)
    batcher = await started(engine)
    engine.hold()
    tasks = [asyncio.create_task(batcher.score(f"r{i}", [seq(10 + i)] * 3)) for i in range(5)]
    await engine.wait_for_calls(1)
    stopping = asyncio.create_task(batcher.stop())
    await asyncio.sleep(0)
    engine.release()
    await asyncio.wait_for(stopping, WAIT_S)
    done, pending = await asyncio.wait(tasks, timeout=WAIT_S)
    assert not pending
    outcomes = [t.exception() or t.result() for t in done]
    assert all(isinstance(o, NotReadyError) or o.logits.shape == (3, 1) for o in outcomes)  # type: ignore[union-attr]
    assert any(isinstance(o, NotReadyError) for o in outcomes)
    with pytest.raises(NotReadyError):
        await batcher.score("late", [seq(10)])
    assert batcher.queue_size == 0


@pytest.mark.parametrize("depth", [1, 2])
async def test_small_request_not_stuck_behind_large_one(xlmr_engine, depth: int) -> None:
    engine = ControlledEngine(xlmr_engine, max_batch_size=4)
    batcher = await started(engine, pipeline_depth=depth)
    engine.hold()
    try:
        large = asyncio.create_task(batcher.score("large", [seq(40, token=5)] * 100))  # 25 batches
        await engine.wait_for_calls(1)
        small = asyncio.create_task(batcher.score("small", [seq(40, token=7)]))
        await asyncio.sleep(0)
        engine.release()
        await asyncio.wait_for(asyncio.gather(large, small), WAIT_S)
    finally:
        engine.release()
        await batcher.stop()
    # Batch 0 was running (and, at depth 2, batch 1 submitted) when it arrived: the small
    # request rides in the next batch formed, whatever the large request still has queued.
    assert marked_by(engine, 7) == [depth]
    assert len(engine.calls) >= 25


async def test_requests_share_batches_round_robin(xlmr_engine) -> None:
    engine = ControlledEngine(xlmr_engine, max_batch_size=4)
    batcher = await started(engine)
    engine.hold()
    try:
        tasks = [
            asyncio.create_task(batcher.score(f"r{t}", [seq(20, token=t)] * 8)) for t in (5, 6)
        ]
        await engine.wait_for_calls(1)
        engine.release()
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
    finally:
        engine.release()
        await batcher.stop()
    # After the first batch, every batch holds pairs of both requests, two each.
    for batch in engine.calls[1:-1]:
        marks = [p.input_ids[1] for p in batch]
        assert sorted(marks) == [5, 5, 6, 6]


async def test_start_refuses_max_length_above_budget(xlmr_engine) -> None:
    batcher = Batcher(xlmr_engine, max_batch_tokens=64)
    with pytest.raises(ModelLoadError) as err:
        await batcher.start()
    assert str(err.value) == (
        "model accepts up to 128 tokens per input but --max-batch-tokens is 64; "
        "raise --max-batch-tokens to at least 128"
    )
    assert not batcher.running


async def test_start_warms_up_at_full_budget(xlmr_engine) -> None:
    engine = ControlledEngine(xlmr_engine, max_batch_tokens=512)
    batcher = Batcher(engine, max_batch_tokens=1024)
    assert batcher.max_batch_tokens == 512  # the engine's own cap wins
    await batcher.start()
    await batcher.stop()
    assert engine.warmups == [512]


async def test_metrics_updated(xlmr_engine) -> None:
    def count(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    before = (count("te_batch_next_size_count"), count("te_batch_next_tokens_sum"))
    batcher = await started(ControlledEngine(xlmr_engine))
    try:
        await asyncio.wait_for(batcher.score("a", [seq(10), seq(20)]), WAIT_S)
    finally:
        await batcher.stop()
    assert count("te_batch_next_size_count") == before[0] + 1
    assert count("te_batch_next_tokens_sum") == before[1] + 40  # padded: 20 x 2
    assert REGISTRY.get_sample_value("te_queue_size") == 0


async def test_empty_request(xlmr_engine) -> None:
    batcher = await started(xlmr_engine)
    try:
        result = await batcher.score("empty", [])
    finally:
        await batcher.stop()
    assert result.logits.shape == (0, 1)


class _TwoWorkers(Engine):
    """A reentrant CPU engine of two forward workers around another engine."""

    max_concurrent_scores = 2
    reentrant_on_cpu = True

    def __init__(self, inner: Engine) -> None:
        self.inner = inner

    @property
    def info(self) -> EngineInfo:
        return self.inner.info

    @property
    def tokenizer(self) -> object:
        return self.inner.tokenizer

    def score(self, batch: Sequence[EncodedPair]) -> np.ndarray:
        return self.inner.score(batch)


class _GatedByToken(_TwoWorkers):
    """Passes holding a sequence marked with a gated token wait for that token's gate."""

    def __init__(self, inner: Engine, gates: dict[int, threading.Event]) -> None:
        super().__init__(inner)
        self.gates = gates
        self.entered: list[int] = []

    def score(self, batch: Sequence[EncodedPair]) -> np.ndarray:
        for token in {p.input_ids[1] for p in batch}:
            self.entered.append(token)
            if token in self.gates and not self.gates[token].wait(WAIT_S):
                raise TimeoutError("gate never opened (test bug)")
        return self.inner.score(batch)


async def test_cpu_workers_run_passes_at_once_and_deliver_out_of_order(xlmr_engine) -> None:
    """Two CPU forward workers: a request finishes while an earlier pass still runs."""
    gate = threading.Event()
    engine = _GatedByToken(xlmr_engine, {7: gate})
    batcher = await started(engine, max_batch_tokens=128)
    assert (batcher.workers, batcher.pipeline_depth) == (2, 2)
    try:
        slow = asyncio.ensure_future(batcher.score("slow", [seq(40, token=7)]))
        await until(lambda: engine.entered == [7], "the slow pass to start")
        fast_items = [seq(30, token=8), seq(20, token=8)]
        fast = await asyncio.wait_for(batcher.score("fast", fast_items), WAIT_S)
        assert not slow.done()  # the other worker is still held
        np.testing.assert_allclose(fast.logits, xlmr_engine.score(fast_items), atol=1e-5)
        gate.set()
        held = await asyncio.wait_for(slow, WAIT_S)
        np.testing.assert_allclose(held.logits, xlmr_engine.score([seq(40, token=7)]), atol=1e-5)
    finally:
        gate.set()
        await batcher.stop()


class _Overlapping(_TwoWorkers):
    """Two passes that wait for each other, then each take `seconds` more (sleeping: no CPU
    needed), so they surely overlap by that much; records how long each call took."""

    def __init__(self, inner: Engine, seconds: float) -> None:
        super().__init__(inner)
        self.seconds = seconds
        self.both = threading.Barrier(2, timeout=WAIT_S)
        self.durations: list[float] = []

    def score(self, batch: Sequence[EncodedPair]) -> np.ndarray:
        start = time.perf_counter()
        self.both.wait()
        time.sleep(self.seconds)
        logits = self.inner.score(batch)
        self.durations.append(time.perf_counter() - start)
        return logits


async def test_passes_at_once_count_once_in_a_requests_inference_time(xlmr_engine) -> None:
    """A request split over two passes that run at the same time spent the time they covered
    in inference, not their sum: x-inference-time never exceeds the request's own duration."""
    engine = _Overlapping(xlmr_engine, 0.4)
    batcher = await started(engine, max_batch_tokens=128)
    try:
        started_at = time.perf_counter()
        result = await asyncio.wait_for(batcher.score("r", [seq(100), seq(90)]), WAIT_S)
        took = time.perf_counter() - started_at
    finally:
        await batcher.stop()
    assert result.batches == 2 and len(engine.durations) == 2  # one sequence per pass
    assert result.inference_time_s <= took
    # The passes overlapped by at least the 0.4 s both slept after meeting: counted once.
    assert result.inference_time_s <= sum(engine.durations) - 0.35


def test_covered_seconds_is_the_union_of_the_intervals() -> None:
    assert covered_seconds([]) == 0
    assert covered_seconds([(0, 1), (0.5, 2), (3, 4)]) == pytest.approx(3.0)
    assert covered_seconds([(2, 3), (0, 10)]) == pytest.approx(10.0)  # one inside another
    assert covered_seconds([(0, 1), (1, 2)]) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("free", "work_s", "finish"),
    [
        ([0.5], 1.0, 1.5),  # one worker: after its running pass
        ([0.0, 0.0], 2.0, 1.0),  # two idle workers share the work
        ([0.01, 0.30], 0.03, 0.04),  # done on the first free worker before the other frees
        ([0.1, 0.3], 1.0, 0.7),  # both: (1.0 + 0.1 + 0.3) / 2
    ],
)
def test_early_refusal_bound_spreads_the_work_over_workers_as_they_free(
    free: list[float], work_s: float, finish: float
) -> None:
    """The deadline check's lower bound with several CPU workers: the request can start on the
    first worker that frees, not after the average of the passes running (which refused
    requests that could have made it)."""
    assert _spread(free, work_s) == pytest.approx(finish)
    rng = random.Random(3)
    for _ in range(200):
        frees = sorted(rng.uniform(0, 2) for _ in range(rng.randint(1, 4)))
        work = rng.uniform(0, 3)
        c = _spread(frees, work)
        assert sum(max(0.0, c - f) for f in frees) == pytest.approx(work)
