"""Domain errors: what went wrong, in the service's terms.

They carry no HTTP: no status codes, no headers, no CLI flag names. The HTTP layer maps each
kind to its status, TEI's `error_type` and headers in one table (`api/errors.py`), and adds the
advice that names server flags. Errors about a request field carry the field's name as data
(`field="documents"` on the Cohere/Jina routes) so each message names what the client sent.
"""

from __future__ import annotations


class RerankerError(Exception):
    """Base for every error a client may see; `message` is written for the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EmptyInputError(RerankerError):
    """An empty query, an empty list of texts, or an empty text."""


class ValidationError(RerankerError):
    """A request that is well-formed JSON but asks for something invalid."""


class TooManyInputsError(ValidationError):
    """More texts/inputs in one request than the server accepts per request."""

    def __init__(self, field: str, count: int, limit: int) -> None:
        super().__init__(
            f"`{field}` has {count} items but this server accepts at most {limit} per request; "
            "send fewer per request"
        )
        self.field = field
        self.count = count
        self.limit = limit


class InputTooLongError(ValidationError):
    """A sequence longer than the model accepts while truncation is off."""


class WrongModelKindError(ValidationError):
    """A rerank route called on a classifier (several labels), or the reverse."""


class OverloadedError(RerankerError):
    """The server's limit of requests in flight is reached: refused at once, never queued."""

    def __init__(self, in_flight: int, limit: int) -> None:
        super().__init__(f"{in_flight} requests are already in flight, the limit is {limit}")
        self.in_flight = in_flight
        self.limit = limit


class NotReadyError(RerankerError):
    """The server cannot take requests in its current lifecycle state (loading, warming up,
    draining, stopped, failed). The message comes from `lifecycle.not_ready_error`, one per
    state, and says what to do next."""

    def __init__(self, message: str, *, state: str) -> None:
        super().__init__(message)
        self.state = state


class EngineError(RerankerError):
    """The forward pass failed. Only the requests in that batch fail; the server keeps serving."""


class UnauthorizedError(RerankerError):
    """The request does not carry the server's API key."""


class ModelLoadError(Exception):
    """The model or engine cannot be loaded (raised at start-up, never to a client)."""
