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


class EmptyTokenizerInputError(EmptyInputError):
    """An empty text to tokenize or an empty sequence of token ids to decode (/tokenize,
    /decode): TEI's tokenizer refuses these, and counts them as tokenization failures."""


class ValidationError(RerankerError):
    """A request that is well-formed JSON but asks for something invalid."""


class TooManyInputsError(ValidationError):
    """More texts/inputs in one request than the server accepts per request."""

    def __init__(self, field: str, count: int, limit: int, *, unit: str = "items") -> None:
        # Starts with TEI's message (router/src/http/server.rs), which TEI clients may match.
        super().__init__(
            f"batch size {count} > maximum allowed batch size {limit}: `{field}` has {count} "
            f"{unit}; send fewer per request"
        )
        self.field = field
        self.count = count
        self.limit = limit


class TooManyCharactersError(ValidationError):
    """A request whose texts hold more characters than the server accepts per request."""

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(
            f"the request's texts hold {count:,} characters but this server accepts at most "
            f"{limit:,} per request; send fewer or shorter texts"
        )
        self.count = count
        self.limit = limit


class InputTooLongError(ValidationError):
    """A sequence longer than the model accepts while truncation is off."""


class ScorePairTooLongError(InputTooLongError):
    """The same on vLLM's Score API, whose truncation field is truncate_prompt_tokens."""


class TooManyChunksPerTextError(ValidationError):
    """A text needs more windows than the request's max_chunks_per_doc while truncation is off."""

    def __init__(
        self,
        field: str,
        index: int,
        needed: int,
        window_tokens: int,
        limit: int,
        *,
        at_least: bool = False,  # the text was tokenized only as far as the limit reaches
    ) -> None:
        bound = "at least " if at_least else ""
        super().__init__(
            f"`{field}[{index}]` needs {bound}{needed} windows of up to {window_tokens} text tokens "
            f"to be scored whole, but at most {limit} windows per text are scored "
            "(max_chunks_per_doc)"
        )
        self.field = field
        self.index = index
        self.needed = needed
        self.limit = limit


class TooManyChunksPerRequestError(ValidationError):
    """A chunking request whose texts make more windows than the server scores per request."""

    def __init__(
        self, field: str, texts: int, windows: int, limit: int, at_least: bool = False
    ) -> None:
        super().__init__(
            f"the {texts} `{field}` of this request make {'at least ' if at_least else ''}"
            f"{windows} windows but this server scores at most {limit} per request"
        )
        self.windows = windows
        self.limit = limit


class WrongModelKindError(ValidationError):
    """A rerank route called on a classifier (several labels), or the reverse."""


class OverloadedError(RerankerError):
    """The server's limit of requests in flight is reached: refused at once, never queued."""

    def __init__(self, in_flight: int, limit: int) -> None:
        super().__init__(f"{in_flight} requests are already in flight, the limit is {limit}")
        self.in_flight = in_flight
        self.limit = limit


class TooManyCallsError(OverloadedError):
    """gRPC calls open at once (streams included) reached --max-connections."""

    def __init__(self, open_calls: int, limit: int) -> None:
        super().__init__(open_calls, limit)
        self.message = f"{open_calls} gRPC calls are already open, the limit is {limit}"
        self.args = (self.message,)


class DeadlineExceededError(RerankerError):
    """The request's deadline passed before it was answered; its waiting pairs were dropped."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            f"the request was not answered within its deadline of {timeout_s:g} s; "
            "its pairs still waiting were dropped"
        )
        self.timeout_s = timeout_s


class DeadlineUnreachableError(RerankerError):
    """Refused before queueing: even served next, the request could not finish in time."""

    def __init__(
        self, needed_s: float, ahead_s: float, tokens: int, rate: float, left_s: float
    ) -> None:
        super().__init__(
            f"this request cannot be answered within its deadline: it needs at least "
            f"{needed_s:.3g} s ({ahead_s:.3g} s for the forward passes already running, then "
            f"{tokens} tokens at the recent {rate:.0f} tokens/s) but {left_s:.3g} s remain; "
            "nothing was computed"
        )
        self.needed_s = needed_s
        self.left_s = left_s


class RequestReadTimeoutError(RerankerError):
    """The client did not finish sending its request within --request-read-timeout."""

    def __init__(self, what: str, timeout_s: float) -> None:
        super().__init__(f"{what} did not end within {timeout_s:g} s")
        self.timeout_s = timeout_s


class StreamIdleError(RerankerError):
    """A gRPC stream sent no message for too long and was ended."""

    def __init__(self, idle_s: float) -> None:
        super().__init__(f"the stream sent no message for {idle_s:g} s and was ended")
        self.idle_s = idle_s


class NotReadyError(RerankerError):
    """The server cannot take requests in its current lifecycle state (loading, warming up,
    draining, stopped, failed). The message comes from `lifecycle.not_ready_error`, one per
    state, and says what to do next."""

    def __init__(self, message: str, *, state: str) -> None:
        super().__init__(message)
        self.state = state


class EngineError(RerankerError):
    """The forward pass failed. Only the requests in that batch fail; the server keeps serving."""


class InternalError(RerankerError):
    """A bug in the server itself (e.g. the batcher's owner task crashed), not in the model or the
    request: answered 500, unlike a failed forward pass."""


class UnauthorizedError(RerankerError):
    """The request does not carry the server's API key."""


class ModelLoadError(Exception):
    """The model or engine cannot be loaded (raised at start-up, never to a client)."""
