"""Test engines: a real engine with controllable forward passes and warm-up.

`ControlledEngine(inner)` delegates tokenizer, info and score to a real engine (a TorchEngine on a
tiny model), so scores stay real, and adds knobs a test can turn from the event loop while the
batcher's worker thread runs forward passes:

    engine = ControlledEngine(xlmr_engine)            # behaves exactly like the inner engine
    engine.hold()                                     # forward passes block at a gate ...
    await engine.wait_for_calls(1)                    # ... until one has arrived there,
    engine.allow(1)                                   # let exactly one through (count batches),
    engine.release()                                  # or open the gate for good.
    engine.fail_next(RuntimeError("boom"))            # the next forward pass raises
    engine.delay_s = 0.05                             # every forward pass sleeps first
    engine.hold_warmup(); ...; engine.release_warmup()  # a slow warm-up (503 before ready)
    engine.calls                                      # every batch score() received, in order

Overrides of EngineInfo (`ControlledEngine(inner, padded=False, max_batch_size=4)`) let one real
model stand in for a packed engine or one with a hard batch limit. Every blocking wait has a
timeout, so a test bug fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from reranker_runtime.engines.base import EncodedPair, Engine, EngineInfo

_GATE_TIMEOUT_S = 60.0


class ControlledEngine(Engine):
    def __init__(self, inner: Engine, **info_overrides: Any) -> None:
        self.inner = inner
        self._info = (
            dataclasses.replace(inner.info, **info_overrides) if info_overrides else inner.info
        )
        self.calls: list[list[EncodedPair]] = []  # batches that reached the engine (incl. failed)
        self.delay_s = 0.0
        self.closed = False
        self.warmups: list[int] = []  # max_batch_tokens of each warmup() call
        self._cond = threading.Condition()
        self._permits: int | None = None  # None = gate open; n = that many passes may go
        self._arrived = 0  # forward passes that reached the gate
        self._failures: list[BaseException] = []
        self._warmup_gate = threading.Event()
        self._warmup_gate.set()

    # ------------------------------------------------------------------ Engine interface

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    def score(self, batch: Sequence[EncodedPair]) -> np.ndarray:
        with self._cond:
            self._arrived += 1
            self._cond.notify_all()
            deadline = time.monotonic() + _GATE_TIMEOUT_S
            while self._permits is not None and self._permits <= 0:
                if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise TimeoutError("ControlledEngine gate was never opened (test bug)")
            if self._permits is not None:
                self._permits -= 1
            self.calls.append(list(batch))
            failure = self._failures.pop(0) if self._failures else None
        if self.delay_s:
            time.sleep(self.delay_s)
        if failure is not None:
            raise failure
        return self.inner.score(batch)

    def warmup(self, max_batch_tokens: int) -> None:
        self.warmups.append(max_batch_tokens)
        if not self._warmup_gate.wait(timeout=_GATE_TIMEOUT_S):
            raise TimeoutError("ControlledEngine warm-up was never released (test bug)")
        # Warm up the real engine directly: warm-up passes are not counted in `calls`.
        self.inner.warmup(max_batch_tokens)

    def close(self) -> None:
        self.closed = True  # the inner engine is shared between tests: keep it open

    # ----------------------------------------------------------------------------- knobs

    def hold(self) -> None:
        """Close the gate: forward passes block until allow() or release()."""
        with self._cond:
            self._permits = 0

    def allow(self, n: int = 1) -> None:
        """Let n more forward passes through a held gate."""
        with self._cond:
            self._permits = (self._permits or 0) + n
            self._cond.notify_all()

    def release(self) -> None:
        """Open the gate for good."""
        with self._cond:
            self._permits = None
            self._cond.notify_all()

    def fail_next(self, error: BaseException | None = None) -> None:
        """Make the next forward pass raise `error` (RuntimeError by default). Stackable."""
        with self._cond:
            self._failures.append(error or RuntimeError("injected engine failure"))

    def hold_warmup(self) -> None:
        self._warmup_gate.clear()

    def release_warmup(self) -> None:
        self._warmup_gate.set()

    @property
    def arrived(self) -> int:
        """Forward passes that reached the gate (running, blocked or done)."""
        with self._cond:
            return self._arrived

    @property
    def seen_input_ids(self) -> list[list[int]]:
        """input_ids of every sequence the engine was asked to score."""
        return [list(p.input_ids) for batch in self.calls for p in batch]

    async def wait_for_calls(self, n: int, timeout_s: float = 30.0) -> None:
        """Wait (without blocking the event loop) until n forward passes reached the gate."""
        deadline = time.monotonic() + timeout_s
        while self.arrived < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"expected {n} forward passes, saw {self.arrived}")
            await asyncio.sleep(0.005)


class GatedTokenizer:
    """A real `tokenizers.Tokenizer` whose encode_batch calls of several texts (the slices of a
    request's texts) are counted and, while held, wait at a gate:

        gated = GatedTokenizer(pair_tokenizer._tok); pair_tokenizer._tok = gated
        gated.hold(); ...; gated.arrived.wait(); ...; gated.release()
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.slices = 0
        self.arrived = threading.Event()  # a slice reached the closed gate
        self._gate = threading.Event()
        self._gate.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def encode_batch(self, texts: list[str], **kwargs: Any) -> Any:
        if len(texts) > 1:
            self.slices += 1
            if not self._gate.is_set():
                self.arrived.set()
                if not self._gate.wait(_GATE_TIMEOUT_S):
                    raise TimeoutError("GatedTokenizer was never released (test bug)")
        return self._inner.encode_batch(texts, **kwargs)


def record_threads(monkeypatch: Any, module: Any, name: str) -> list[threading.Thread]:
    """Wrap `module.name` so each call records the thread it ran on (the list returned)."""
    threads: list[threading.Thread] = []
    original = getattr(module, name)

    def recording(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    return threads
