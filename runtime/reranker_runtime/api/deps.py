"""What the routes share: the runtime state (service, boot, drain), the client-disconnect guard,
TEI's timing headers and the access-log annotations."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request

from reranker_runtime.config import ServeSettings
from reranker_runtime.errors import NotReadyError

if TYPE_CHECKING:
    from reranker_runtime.engines.base import Engine
    from reranker_runtime.service import RerankService

T = TypeVar("T")
log = logging.getLogger("reranker_runtime.api")

# Per-request fields for the access log (pairs, tokens), kept in the ASGI scope so the
# outer middleware can read what the route wrote.
LOG_SCOPE_KEY = "reranker.access"
REQUEST_ID_SCOPE_KEY = "reranker.request_id"


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; the work was cancelled."""


class Runtime:
    """The app's mutable state: loading, serving, draining.

    The model loads in the background so `/live` answers (and `/health` says 503) while it
    loads and warms up; `/health` turns 503 again as soon as draining starts.
    """

    def __init__(
        self,
        settings: ServeSettings,
        engine: Engine | None = None,
        service: RerankService | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.service = service
        # Engines we loaded ourselves are ours to close; injected ones belong to the caller.
        self.owns_engine = engine is None and service is None
        self.load_error: str | None = None
        self.draining = False
        self.on_fatal: Callable[[str], None] | None = None
        self._boot_task: asyncio.Task[None] | None = None
        self._drain_task: asyncio.Task[None] | None = None

    # -- state ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return not self.draining and self.service is not None and bool(self.service.ready)

    def not_ready_reason(self) -> str:
        if self.load_error:
            return f"model failed to load: {self.load_error}"
        if self.draining:
            return "server is shutting down"
        if self.service is None:
            return "model is loading"
        return "model is warming up"

    def require_service(self) -> RerankService:
        """The service when it can take requests; 503 (with Retry-After) otherwise."""
        if self.service is None or self.draining or self.load_error:
            raise NotReadyError(self.not_ready_reason())
        return self.service

    # -- boot / drain --------------------------------------------------------------------------

    def start_boot(self) -> None:
        self._boot_task = asyncio.create_task(self._boot(), name="reranker-boot")

    async def _boot(self) -> None:
        try:
            if self.service is None:
                if self.engine is None:
                    from reranker_runtime.engines.factory import create_engine

                    log.info("loading model", extra={"fields": _model_fields(self.settings)})
                    started = time.perf_counter()
                    self.engine = await _in_daemon_thread(create_engine, self.settings)
                    log.info(
                        "model loaded",
                        extra={"fields": {"load_s": round(time.perf_counter() - started, 3)}},
                    )
                from reranker_runtime.service import RerankService

                self.service = RerankService(self.engine, self.settings)
            if not self.service.ready:
                started = time.perf_counter()
                await self.service.start()
                log.info(
                    "ready",
                    extra={"fields": {"warmup_s": round(time.perf_counter() - started, 3)}},
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any load/warm-up failure is fatal for the server
            self.load_error = _describe(exc)
            log.error("model load failed: %s", self.load_error)
            log.debug("model load failure details", exc_info=True)
            if self.on_fatal is not None:
                self.on_fatal(self.load_error)

    def drain(self) -> asyncio.Task[None]:
        """Stop taking requests, let in-flight ones finish, stop the batcher. Idempotent: every
        caller (SIGTERM handler, lifespan shutdown) awaits the same task."""
        if self._drain_task is None:
            self.draining = True
            self._drain_task = asyncio.create_task(self._drain(), name="reranker-drain")
        return self._drain_task

    async def _drain(self) -> None:
        log.info("draining: /health now 503, finishing in-flight requests")
        if self._boot_task is not None and not self._boot_task.done():
            self._boot_task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await self._boot_task
        if self.service is not None:
            try:
                await self.service.stop()
            except Exception:
                log.exception("error while stopping the service")
        log.info("drained")

    async def close(self) -> None:
        await self.drain()
        # service.stop() closes its engine; close ours only if no service ever took it over.
        if self.owns_engine and self.service is None and self.engine is not None:
            engine, self.engine = self.engine, None
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
    text = str(exc).strip()
    name = type(exc).__name__
    if not text:
        return name
    # Our own ModelLoadError messages are written for users; others keep their type for context.
    return text if name == "ModelLoadError" else f"{name}: {text}"


async def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run fn in a daemon thread: a model load that is still running when the process is told
    to exit must not keep it alive (the default executor's threads are joined at exit)."""
    import threading

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


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read by the time a route runs, so the next ASGI message is the
    # disconnect (uvicorn sends it when the connection closes).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first, so its pairs leave the
    batcher's queue instead of being scored for nobody."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


def request_id(request: Request) -> str | None:
    """The id AccessMiddleware gave this request (the client's x-request-id, or generated)."""
    value = request.scope.get(REQUEST_ID_SCOPE_KEY)
    return value if isinstance(value, str) else None


def annotate(request: Request, **fields: Any) -> None:
    """Add fields (pairs, tokens, ...) to this request's access-log line."""
    request.scope.setdefault(LOG_SCOPE_KEY, {}).update(fields)


def timing_headers(result: Any, started: float) -> dict[str, str]:
    """TEI's headers, in whole milliseconds like TEI."""

    def ms(seconds: float) -> str:
        return str(round(seconds * 1000))

    return {
        "x-compute-time": ms(time.perf_counter() - started),
        "x-compute-tokens": str(int(result.total_tokens)),
        "x-tokenization-time": ms(result.tokenization_time_s),
        "x-queue-time": ms(result.queue_time_s),
        "x-inference-time": ms(result.inference_time_s),
    }
