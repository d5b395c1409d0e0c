"""HTTP connections that cannot be held open for free: a read deadline and a connection cap.

uvicorn closes idle keep-alive connections, but a connection that sends part of its headers, or
part of its body, and then stalls is held forever, and nothing bounds how many are open. This
protocol (uvicorn's h11 one, which `serve` uses) adds both:

- **Read deadline.** A request's headers and body must arrive within `read_timeout_s` of its first
  byte (of the connection's opening, for the first request). Otherwise the client gets
  `408 Request Timeout` (TEI's error body) when the request had started and no response had, and
  the connection is closed. The server's own time answering is not counted.
- **Connection cap.** With `max_connections` connections open, a new one gets
  `503 Service Unavailable` (`Retry-After: 1`) and is closed at once.

Both act below the application, so they show in their own metrics (`reranker_http_*`), not in
`te_request_count`, except a body that times out: the application saw that request, and its
access line and count say 408 (`CLIENT_STATUS_SCOPE_KEY`). Bytes that are not HTTP get uvicorn's
400, with TEI's error body and counted (`reranker_http_invalid_requests_total`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, ClassVar, cast

import h11
from prometheus_client import Counter, Gauge
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = [
    "CLIENT_STATUS_SCOPE_KEY",
    "GuardedH11Protocol",
    "guarded_protocol",
]

log = logging.getLogger("reranker_runtime.connections")

# Set in a request's ASGI scope when the protocol answered the client itself (408): the status
# the client got, for the access log and te_request_count.
CLIENT_STATUS_SCOPE_KEY = "reranker.client_status"

OPEN_CONNECTIONS = Gauge("reranker_http_connections", "Open HTTP connections")
REFUSED_CONNECTIONS = Counter(
    "reranker_http_connections_refused",
    "Connections refused with 503 because --max-connections were open",
)
INVALID_REQUESTS = Counter(
    "reranker_http_invalid_requests",
    "Requests refused with 400 because they were not valid HTTP/1.1",
)
READ_TIMEOUTS = Counter(
    "reranker_http_read_timeouts",
    "Connections closed because a request's headers or body took longer than "
    "--request-read-timeout",
)


def _raw_response(status: int, reason: str, message: str, error_type: str, **headers: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, for use outside h11's state
    machine (before a request was parsed, or instead of the application's answer)."""
    body = json.dumps({"error": message, "error_type": error_type}).encode()
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a read deadline per request and a cap on open connections.
    Use `guarded_protocol(...)` to get a subclass with the server's settings."""

    read_timeout_s: ClassVar[float] = 30.0
    max_connections: ClassVar[int] = 2048

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_deadline: asyncio.TimerHandle | None = None
        self._counted = False

    # -- asyncio.Protocol -------------------------------------------------------------------

    # uvicorn narrows asyncio's BaseTransport to Transport with the same ignore.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            REFUSED_CONNECTIONS.inc()
            log.warning(
                "connection refused: %d connections open (--max-connections)",
                self.max_connections,
            )
            transport.write(
                _raw_response(
                    503,
                    "Service Unavailable",
                    f"this server already has {self.max_connections} connections open, the limit "
                    "(--max-connections); retry shortly",
                    "Overloaded",
                    retry_after="1",
                )
            )
            transport.close()
            return
        self._counted = True
        OPEN_CONNECTIONS.inc()
        self._arm()

    def data_received(self, data: bytes) -> None:
        # The first bytes of a request on a kept-alive connection start its deadline.
        if self._read_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()  # the whole request is in

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._counted:
            self._counted = False
            OPEN_CONNECTIONS.dec()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """Not HTTP at all: TEI's error body instead of uvicorn's plain text, and counted. A
        request whose body broke the protocol part way (a bad chunk) reaches the application
        as a disconnect: its access line and count say 400, what the client got, not 499."""
        INVALID_REQUESTS.inc()
        cycle = getattr(self, "cycle", None)
        if cycle is not None and not cycle.response_started:
            cast(dict[str, Any], self.scope)[CLIENT_STATUS_SCOPE_KEY] = 400
        self.transport.write(
            _raw_response(
                400, "Bad Request", f"invalid HTTP request: {msg.rstrip('.')}", "Validation"
            )
        )
        self.transport.close()

    # -- the deadline -----------------------------------------------------------------------

    def _arm(self) -> None:
        self._disarm()
        self._read_deadline = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing():
            return
        READ_TIMEOUTS.inc()
        state = self.conn.their_state
        started = bool(self.conn.trailing_data[0]) or state is h11.SEND_BODY
        cycle = self.cycle if state is h11.SEND_BODY else None
        answered = cycle is not None and cycle.response_started
        log.info(
            "closing a connection: request not received within %ss (--request-read-timeout)",
            self.read_timeout_s,
            extra={
                "fields": {
                    "client": f"{self.client[0]}:{self.client[1]}" if self.client else None,
                    "stage": "body" if state is h11.SEND_BODY else "headers",
                }
            },
        )
        if started and not answered:
            if cycle is not None:
                # The application is waiting for the body: it gets a disconnect, its answer is
                # dropped, and its access line says what the client got.
                cast(dict[str, Any], self.scope)[CLIENT_STATUS_SCOPE_KEY] = 408
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.write(
                _raw_response(
                    408,
                    "Request Timeout",
                    f"the request's headers and body were not received within "
                    f"{self.read_timeout_s:g} s (--request-read-timeout); the connection is closed",
                    "Timeout",
                )
            )
        self.transport.close()


def guarded_protocol(read_timeout_s: float, max_connections: int) -> type[GuardedH11Protocol]:
    """The protocol class for uvicorn's `http=` setting, with these limits."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"read_timeout_s": read_timeout_s, "max_connections": max_connections},
    )
