"""The request body limit, answered like every other error.

FastAPI's own limiter (`max_body_size`) sits outside the application's middleware: it answers a
body declared too large in plain text and then raises into the middleware that logs and counts
requests, which saw a 500. This one sits inside that middleware: a body declared over the limit
gets TEI's 413 at once (and the connection closes, so the rest is not read); a chunked body that
grows past it gets the same 413 through the app's error handlers.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reranker_runtime.api.errors import HTTP_ERROR_TYPES, plain_error_response

__all__ = ["BodyLimitMiddleware"]


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: str) -> str:
        return (
            f"the request body is {size} bytes but this server accepts at most "
            f"{self.max_bytes:,} ({self.max_bytes // 2**20} MiB); send fewer or shorter texts"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_size(scope)
        if declared is not None and declared > self.max_bytes:
            response = plain_error_response(
                413,
                self._message(f"{declared:,}"),
                HTTP_ERROR_TYPES[413],
                headers={"connection": "close"},  # do not read the rest of it
            )
            await response(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the route's body read: the app's HTTPException handler
                    # answers it.
                    raise HTTPException(413, self._message(f"more than {self.max_bytes:,}"))
            return message

        await self.app(scope, receive_within_limit, send)


def _declared_size(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
