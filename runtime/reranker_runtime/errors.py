"""Domain errors and their HTTP mapping, in one place.

Bodies follow TEI's error model, `{"error": str, "error_type": str}`; `error_type` uses TEI's
names (Validation, Empty, Tokenizer, Overloaded, Unhealthy, Backend) plus Unauthorized and
NotFound, so TEI clients that branch on it keep working.
"""

from __future__ import annotations


class RerankerError(Exception):
    """Base for every error a client may see. Subclasses fix status and error_type."""

    status_code: int = 500
    error_type: str = "Backend"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def to_body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}


class EmptyInputError(RerankerError):
    """An empty query, an empty list of texts, or an empty text."""

    status_code = 400
    error_type = "Empty"


class ValidationError(RerankerError):
    """A request that is well-formed JSON but asks for something invalid."""

    status_code = 422
    error_type = "Validation"


class TooManyInputsError(ValidationError):
    """More texts/inputs in one request than --max-client-batch-size."""

    status_code = 413


class InputTooLongError(ValidationError):
    """A sequence longer than the model accepts while truncation is off."""

    status_code = 422


class WrongModelKindError(RerankerError):
    """A rerank route called on a classifier (several labels), or the reverse."""

    status_code = 400
    error_type = "Validation"


class TokenizerError(RerankerError):
    status_code = 422
    error_type = "Tokenizer"


class OverloadedError(RerankerError):
    """More requests in flight than --max-concurrent-requests: refused at once, never queued."""

    status_code = 429
    error_type = "Overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class NotReadyError(RerankerError):
    """The model is still loading or warming up, or the server is shutting down."""

    status_code = 503
    error_type = "Unhealthy"

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class EngineError(RerankerError):
    """The forward pass failed. Only the requests in that batch fail; the server keeps serving."""

    status_code = 500
    error_type = "Backend"


class UnauthorizedError(RerankerError):
    status_code = 401
    error_type = "Unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class ModelLoadError(Exception):
    """The model or engine cannot be loaded (raised at start-up, never to a client)."""
