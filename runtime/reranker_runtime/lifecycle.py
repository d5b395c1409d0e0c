"""The server's lifecycle: one state machine that every route, probe and the shutdown path read.

    loading -> warming_up -> ready -> draining -> stopped
        \\___________\\__________________________> failed (with the reason)

`start()` loads the model in the background (a daemon thread, so `/live` answers at once) and
warms it up; `admit()` lets a request in (only when ready, and only under
`max_concurrent_requests`) and counts it until it finishes; `drain()` stops admitting, lets the
requests in flight finish (up to `drain_timeout_s`), then stops the service; `close()` drains and
releases an engine nobody else owns. `not_ready_error()` is the one source of the "not ready"
message: one per state, each saying what to do next.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, TypeVar

from reranker_runtime import metrics
from reranker_runtime.config import ServeSettings
from reranker_runtime.errors import NotReadyError, OverloadedError
from reranker_runtime.logging import log_fields

if TYPE_CHECKING:
    from reranker_runtime.engines.base import Engine
    from reranker_runtime.service import RerankService

T = TypeVar("T")
log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 30.0


class State(enum.Enum):
    LOADING = "loading"
    WARMING_UP = "warming_up"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


_NOT_READY_MESSAGES = {
    State.LOADING: "the model is loading; retry shortly",
    State.WARMING_UP: "the model is warming up; retry shortly",
    State.DRAINING: "the server is shutting down; retry on another replica",
    State.STOPPED: "the server has stopped; retry on another replica",
}


def not_ready_error(state: State, failure: str | None = None) -> NotReadyError:
    """The error a request gets in `state` (every state but READY)."""
    if state is State.FAILED:
        message = (
            f"model failed to load: {failure}; this server will not become ready: "
            "check its log and settings, then restart it"
        )
    else:
        message = _NOT_READY_MESSAGES.get(state, f"the server is {state.value}")
    return NotReadyError(message, state=state.value)


class Lifecycle:
    """Owns the service (and the engine it loads itself) from start-up to shutdown.

    Built with nothing, it loads the engine from `settings`; built with an `engine` or a
    `service` (tests, embedders), it serves those and leaves closing an injected engine to the
    service that wraps it.
    """

    def __init__(
        self,
        settings: ServeSettings,
        engine: Engine | None = None,
        service: RerankService | None = None,
    ) -> None:
        self.settings = settings
        self.created = int(time.time())  # when this server started (the model list's `created`)
        self._engine = engine
        self._service = service
        self._owns_engine = engine is None and service is None
        self._state = State.LOADING
        self._failure: str | None = None
        self._in_flight = 0  # every admitted request (a drain waits for these)
        self._scoring = 0  # those under max_concurrent_requests
        self._idle = asyncio.Event()
        self._idle.set()
        self._boot_task: asyncio.Task[None] | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._cut_short = asyncio.Event()  # a second exit signal: stop waiting for requests
        # Called once with the reason when loading fails (the server then exits).
        self.on_fatal: Callable[[str], None] | None = None
        # Called once after warm-up, just before the state turns ready (`serve` freezes the
        # garbage collector's heap there: allocator.freeze_heap).
        self.on_warm: Callable[[], None] | None = None

    # -- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def ready(self) -> bool:
        return self._state is State.READY

    @property
    def failure(self) -> str | None:
        """Why loading failed (state FAILED), else None."""
        return self._failure

    @property
    def service(self) -> RerankService | None:
        """The service once the model is loaded (also while warming up and draining)."""
        return self._service

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def not_ready_error(self) -> NotReadyError:
        return not_ready_error(self._state, self._failure)

    # -- admission -----------------------------------------------------------------------------

    @asynccontextmanager
    async def admit(self, *, limited: bool = True) -> AsyncIterator[RerankService]:
        """Count one request in flight for its whole duration (a large request counts once; a
        drain waits for it). Refuses at once: NotReadyError unless ready, OverloadedError when
        `max_concurrent_requests` scoring requests are already in flight. `limited=False`
        (/tokenize, /decode: TEI takes no permit for them) neither counts towards that limit
        nor in the `reranker_requests_in_flight` gauge."""
        if self._state is not State.READY or self._service is None:
            raise self.not_ready_error()
        service = self._service
        if limited:
            self.take_scoring_permit()
        self._in_flight += 1
        self._idle.clear()
        try:
            yield service
        finally:
            self._in_flight -= 1
            if limited:
                self.return_scoring_permit()
            if self._in_flight == 0:
                self._idle.set()

    def take_scoring_permit(self) -> None:
        """One of the `max_concurrent_requests` permits (also for scoring within an admitted
        request: a gRPC stream's messages); OverloadedError at once when all are taken."""
        limit = self.settings.max_concurrent_requests
        if self._scoring >= limit:
            raise OverloadedError(self._scoring, limit)
        self._scoring += 1
        metrics.IN_FLIGHT.inc()

    def return_scoring_permit(self) -> None:
        self._scoring -= 1
        metrics.IN_FLIGHT.dec()

    # -- start ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Load (unless given) and warm up in the background; the state says how far it got."""
        if self._boot_task is None:
            self._boot_task = asyncio.create_task(self._boot(), name="reranker-boot")

    async def _boot(self) -> None:
        load_s = 0.0
        try:
            if self._service is None:
                if self._engine is None:
                    from reranker_runtime.engines.factory import create_engine

                    log.info("loading model", extra=log_fields(**_model_fields(self.settings)))
                    started = time.perf_counter()
                    self._engine = await _in_daemon_thread(create_engine, self.settings)
                    load_s = time.perf_counter() - started
                from reranker_runtime.service import RerankService

                self._service = RerankService(self._engine, self.settings)
            self._state = State.WARMING_UP
            started = time.perf_counter()
            await self._service.start()
            if self._state is not State.WARMING_UP:  # a drain began meanwhile
                return
            if self.on_warm is not None:
                self.on_warm()
            self._state = State.READY
            batcher = self._service.batcher
            log.info(
                "ready",
                extra=log_fields(
                    load_s=round(load_s, 3),
                    warmup_s=round(time.perf_counter() - started, 3),
                    max_batch_tokens=batcher.max_batch_tokens,
                    max_batch_requests=batcher.max_batch_requests,
                ),
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any load/warm-up failure is fatal for the server
            self._failure = _describe(exc)
            self._state = State.FAILED
            log.error("model load failed: %s", self._failure)
            log.debug("model load failure details", exc_info=True)
            if self.on_fatal is not None:
                self.on_fatal(self._failure)

    # -- drain / close -------------------------------------------------------------------------

    def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> asyncio.Task[None]:
        """Stop admitting, let in-flight requests finish (up to timeout_s), stop the service.
        Idempotent: every caller (SIGTERM handler, lifespan shutdown) awaits the same task."""
        if self._drain_task is None:
            if self._state is not State.FAILED:
                self._state = State.DRAINING
            self._drain_task = asyncio.create_task(self._drain(timeout_s), name="reranker-drain")
        return self._drain_task

    async def _drain(self, timeout_s: float) -> None:
        log.info(
            "draining: /health now 503, finishing in-flight requests",
            extra=log_fields(in_flight=self._in_flight),
        )
        if self._boot_task is not None and not self._boot_task.done():
            self._boot_task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await self._boot_task
        idle = asyncio.ensure_future(self._idle.wait())
        cut = asyncio.ensure_future(self._cut_short.wait())
        await asyncio.wait({idle, cut}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        idle.cancel()
        cut.cancel()
        abandon = self._cut_short.is_set() and not self._idle.is_set()
        if abandon:
            log.warning(
                "drain cut short: answering the requests in flight with 503",
                extra=log_fields(in_flight=self._in_flight),
            )
        elif not self._idle.is_set():
            log.warning(
                "drain timed out; failing what is left", extra=log_fields(in_flight=self._in_flight)
            )
        if self._service is not None:
            try:
                await self._service.stop(abandon=abandon)
            except Exception:
                log.exception("error while stopping the service")
        if self._state is not State.FAILED:
            self._state = State.STOPPED
        log.info("drained")

    def cut_drain_short(self) -> None:
        """Stop waiting for the requests in flight: each gets 503 now, and the drain ends once
        the forward passes already running have (their results are dropped). Idempotent."""
        self._cut_short.set()

    async def close(self) -> None:
        await self.drain()
        # service.stop() closes its engine; close ours only if no service ever took it over.
        if self._owns_engine and self._service is None and self._engine is not None:
            engine, self._engine = self._engine, None
            with suppress(Exception):
                await asyncio.to_thread(engine.close)


def _model_fields(settings: ServeSettings) -> dict[str, Any]:
    return {
        "model": settings.model,
        "revision": settings.revision,
        "engine_dir": settings.engine_dir,
        "device": settings.device,
        "dtype": settings.dtype,
    }


def _describe(exc: BaseException) -> str:
    # One line: a library's message may span several (the log line and /health carry it).
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    if not text:
        return name
    # Our own ModelLoadError messages are written for users; others keep their type for context.
    return text if name == "ModelLoadError" else f"{name}: {text}"


async def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run fn in a daemon thread: a model load that is still running when the process is told
    to exit must not keep it alive (the default executor's threads are joined at exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def resolve(ok: bool, value: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:
            loop.call_soon_threadsafe(resolve, False, exc)
        else:
            loop.call_soon_threadsafe(resolve, True, result)

    threading.Thread(target=target, name="reranker-load", daemon=True).start()
    return await future
